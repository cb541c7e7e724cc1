// Activation math shared by the CPU and CUDA kernels: one definition of every f and f'.
//
// Codes match nnfast/activations.py (the table) and kernels/activations.py. The functions are
// templates over a value type T with primitives supplied by Math<T>: Math<float> and Math<double>
// here (plain C++, or __host__ __device__ under nvcc); the CPU kernels add Math<Vectorized<float>>
// so the same formulas run 8 or 16 lanes at a time.
#pragma once

#include <cmath>
#include <type_traits>

#if defined(__CUDACC__)
#define NNFAST_HD __host__ __device__ __forceinline__
#else
#define NNFAST_HD inline
#endif

namespace nnfast {

enum Act : int {
  IDENTITY = 0,
  RELU = 1,
  LEAKY_RELU = 2,
  GELU = 3,
  GELU_TANH = 4,
  SILU = 5,
  SIGMOID = 6,
  TANH = 7,
  SQUARED_RELU = 8,
  // Gated rows: y = base(gate) * up, weight (2N, K) with gate rows then up rows.
  SWIGLU = 9,
  GEGLU = 10,
  REGLU = 11,
  // x * sigmoid(1.702 x) (CLIP's quick_gelu); after the gated codes
  QUICK_GELU = 12,
  NUM_ACTS = 13,
};

// The elementwise activation of a gated code, or -1 for an elementwise code.
constexpr int gated_base(int act) {
  return act == SWIGLU ? SILU : act == GEGLU ? GELU : act == REGLU ? RELU : -1;
}

// double constants: exact for the float64 kernels, rounded once when splat into float.
constexpr double kSqrt2OverPi = 0.7978845608028654;
constexpr double kInvSqrt2 = 0.7071067811865476;
constexpr double kInvSqrt2Pi = 0.3989422804014327;
constexpr double kGeluTanhKappa = 0.044715;
constexpr double kQuickGeluAlpha = 1.702;

// Per-type primitives. select_pos(s, a, b) = s > 0 ? a : b and select_neg(s, a, b) = s < 0 ? a : b;
// both pick b for NaN, which is what makes relu(NaN) = NaN and relu'(NaN) = 0, as in PyTorch.
template <typename T>
struct Math;

template <>
struct Math<float> {
  NNFAST_HD static float splat(double v) { return static_cast<float>(v); }
  NNFAST_HD static float exp(float x) { return ::expf(x); }
  NNFAST_HD static float erf(float x) { return ::erff(x); }
  NNFAST_HD static float tanh(float x) { return ::tanhf(x); }
  NNFAST_HD static float select_pos(float s, float a, float b) { return s > 0.f ? a : b; }
  NNFAST_HD static float select_neg(float s, float a, float b) { return s < 0.f ? a : b; }
};

template <>
struct Math<double> {
  NNFAST_HD static double splat(double v) { return v; }
  NNFAST_HD static double exp(double x) { return ::exp(x); }
  NNFAST_HD static double erf(double x) { return ::erf(x); }
  NNFAST_HD static double tanh(double x) { return ::tanh(x); }
  NNFAST_HD static double select_pos(double s, double a, double b) { return s > 0. ? a : b; }
  NNFAST_HD static double select_neg(double s, double a, double b) { return s < 0. ? a : b; }
};

template <typename T>
NNFAST_HD T sigmoid(T x) {
  using M = Math<T>;
  return M::splat(1.f) / (M::splat(1.f) + M::exp(M::splat(0.f) - x));
}

// f(x); param is leaky_relu's negative_slope.
template <int ACT, typename T>
NNFAST_HD T act_forward(T x, T param) {
  using M = Math<T>;
  if constexpr (ACT == RELU) {
    return M::select_neg(x, M::splat(0.f), x);
  } else if constexpr (ACT == LEAKY_RELU) {
    return M::select_pos(x, x, x * param);
  } else if constexpr (ACT == GELU) {
    return M::splat(0.5f) * x * (M::splat(1.f) + M::erf(x * M::splat(kInvSqrt2)));
  } else if constexpr (ACT == GELU_TANH) {
    T u = M::splat(kSqrt2OverPi) * (x + M::splat(kGeluTanhKappa) * x * x * x);
    return M::splat(0.5f) * x * (M::splat(1.f) + M::tanh(u));
  } else if constexpr (ACT == SILU) {
    return x * sigmoid(x);
  } else if constexpr (ACT == SIGMOID) {
    return sigmoid(x);
  } else if constexpr (ACT == TANH) {
    return M::tanh(x);
  } else if constexpr (ACT == SQUARED_RELU) {
    T r = M::select_neg(x, M::splat(0.f), x);
    return r * r;
  } else if constexpr (ACT == QUICK_GELU) {
    return x * sigmoid(M::splat(kQuickGeluAlpha) * x);
  } else {
    return x;
  }
}

// True when f' is evaluated on the output y (else on the pre-activation x); mirrors
// Activation.grad_from_output in nnfast/activations.py (leaky_relu: only for a slope >= 0).
constexpr bool grad_reads_output(int act, float param) {
  return act == IDENTITY || act == RELU || act == SIGMOID || act == TANH ||
         (act == LEAKY_RELU && param >= 0.f);
}

// f'(pre) evaluated on the saved tensor s (the output or the pre-activation, see above).
template <int ACT, typename T>
NNFAST_HD T act_grad(T s, T param) {
  using M = Math<T>;
  if constexpr (ACT == RELU) {
    // relu'(x) = [y > 0]
    return M::select_pos(s, M::splat(1.f), M::splat(0.f));
  } else if constexpr (ACT == LEAKY_RELU) {
    // leaky_relu'(x) = 1 if x > 0 else slope; sign(y) = sign(x) for slope >= 0
    return M::select_pos(s, M::splat(1.f), param);
  } else if constexpr (ACT == GELU) {
    // d/dx gelu(x) = Phi(x) + x * phi(x)
    T cdf = M::splat(0.5f) * (M::splat(1.f) + M::erf(s * M::splat(kInvSqrt2)));
    return cdf + s * M::exp(M::splat(-0.5f) * s * s) * M::splat(kInvSqrt2Pi);
  } else if constexpr (ACT == GELU_TANH) {
    // d/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 kappa x^2), t = tanh(u)
    T t = M::tanh(M::splat(kSqrt2OverPi) * (s + M::splat(kGeluTanhKappa) * s * s * s));
    T du = M::splat(kSqrt2OverPi) * (M::splat(1.f) + M::splat(3.0 * kGeluTanhKappa) * s * s);
    return M::splat(0.5f) * (M::splat(1.f) + t) +
           M::splat(0.5f) * s * (M::splat(1.f) - t * t) * du;
  } else if constexpr (ACT == SILU) {
    // d/dx x sigma(x) = sigma (1 + x (1 - sigma))
    T sg = sigmoid(s);
    return sg * (M::splat(1.f) + s * (M::splat(1.f) - sg));
  } else if constexpr (ACT == SIGMOID) {
    // sigma' = y (1 - y)
    return s * (M::splat(1.f) - s);
  } else if constexpr (ACT == TANH) {
    // tanh' = 1 - y^2
    return M::splat(1.f) - s * s;
  } else if constexpr (ACT == SQUARED_RELU) {
    // d/dx relu(x)^2 = 2 relu(x)
    return M::splat(2.f) * M::select_neg(s, M::splat(0.f), s);
  } else if constexpr (ACT == QUICK_GELU) {
    // d/dx x sigma(a x) = sigma (1 + a x (1 - sigma)), a = 1.702
    T sg = sigmoid(M::splat(kQuickGeluAlpha) * s);
    return sg * (M::splat(1.f) + M::splat(kQuickGeluAlpha) * s * (M::splat(1.f) - sg));
  } else {
    return M::splat(1.f);
  }
}

// Calls f(std::integral_constant<int, ACT>{}) for a runtime activation code, so kernels are
// instantiated once per activation with the switch outside the inner loops.
template <typename F>
void dispatch_act(int act, F&& f) {
  switch (act) {
    case RELU: f(std::integral_constant<int, RELU>{}); break;
    case LEAKY_RELU: f(std::integral_constant<int, LEAKY_RELU>{}); break;
    case GELU: f(std::integral_constant<int, GELU>{}); break;
    case GELU_TANH: f(std::integral_constant<int, GELU_TANH>{}); break;
    case SILU: f(std::integral_constant<int, SILU>{}); break;
    case SIGMOID: f(std::integral_constant<int, SIGMOID>{}); break;
    case TANH: f(std::integral_constant<int, TANH>{}); break;
    case SQUARED_RELU: f(std::integral_constant<int, SQUARED_RELU>{}); break;
    case QUICK_GELU: f(std::integral_constant<int, QUICK_GELU>{}); break;
    default: f(std::integral_constant<int, IDENTITY>{}); break;
  }
}

}  // namespace nnfast
