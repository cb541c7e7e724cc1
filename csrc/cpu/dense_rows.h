// Vectorized row primitives of the CPU kernels (dense.cpp, mlp.cpp): the activation math of
// activations.h on at::vec::Vectorized<float>, applied to rows of float32, or of float64 and
// 16-bit dtypes through conversion.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../activations.h"

namespace nnfast {

using at::vec::Vectorized;

template <>
struct Math<Vectorized<float>> {
  using V = Vectorized<float>;
  static V splat(double v) { return V(static_cast<float>(v)); }
  // Sleef's exp, not exp_u20: exp_u20 is ~4% faster in the gelu backward here but turns NaN
  // into a number (sigmoid(NaN) came out 0)
  static V exp(const V& x) { return x.exp(); }
  static V erf(const V& x) { return x.erf(); }
  // tanh(x) = t / (t + 2), t = expm1(2x): about as fast as the exp form that was 2.4x faster than
  // Sleef's tanh here (65536x64 fp32 epilogue on 2 Xeon cores), and without its cancellation:
  // 1 - 2 / (exp(2x) + 1) gave tanh(1e-8) = 0. x is capped at 9 (tanh(9) rounds to 1) so that t
  // stays finite; -inf gives t = -1 and -1; NaN stays NaN (minimum propagates it).
  static V tanh(const V& x) {
    const V t = (at::vec::minimum(x, V(9.f)) * V(2.f)).expm1();
    return t / (t + V(2.f));
  }
  static V select_pos(const V& s, const V& a, const V& b) {
    return V::blendv(b, a, s > V(0.f));
  }
  static V select_neg(const V& s, const V& a, const V& b) {
    return V::blendv(b, a, s < V(0.f));
  }
};


// ---- float rows: the vectorized primitives every dtype goes through ----------------------------

// dst = f(src + bias); pre = src + bias when pre != nullptr. dst may alias src.
template <int ACT>
inline void fwd_row(const float* src, const float* bias, float* pre, float* dst, int64_t n, float param) {
  using V = Vectorized<float>;
  const V p(param);
  int64_t j = 0;
  for (; j < n; j += V::size()) {
    const int64_t c = std::min<int64_t>(V::size(), n - j);
    V x = V::loadu(src + j, c);
    if (bias) x = x + V::loadu(bias + j, c);
    if (pre) x.store(pre + j, c);
    act_forward<ACT>(x, p).store(dst + j, c);
  }
}

// gp = g * f'(s); colsum += gp.
template <int ACT>
inline void bwd_row(const float* g, const float* s, float* gp, float* colsum, int64_t n, float param) {
  using V = Vectorized<float>;
  const V p(param);
  for (int64_t j = 0; j < n; j += V::size()) {
    const int64_t c = std::min<int64_t>(V::size(), n - j);
    V d = V::loadu(g + j, c);
    if constexpr (ACT != IDENTITY) d = d * act_grad<ACT>(V::loadu(s + j, c), p);
    d.store(gp + j, c);
    if (colsum) (V::loadu(colsum + j, c) + d).store(colsum + j, c);
  }
}

// Gated: dst = f(gate) * up.
template <int ACT>
inline void gated_fwd_row(const float* gate, const float* up, float* dst, int64_t n, float param) {
  using V = Vectorized<float>;
  const V p(param);
  for (int64_t j = 0; j < n; j += V::size()) {
    const int64_t c = std::min<int64_t>(V::size(), n - j);
    (act_forward<ACT>(V::loadu(gate + j, c), p) * V::loadu(up + j, c)).store(dst + j, c);
  }
}

// Gated: g_gate = g * up * f'(gate), g_up = g * f(gate).
template <int ACT>
inline void gated_bwd_row(const float* g, const float* gate, const float* up, float* g_gate, float* g_up,
                   int64_t n, float param) {
  using V = Vectorized<float>;
  const V p(param);
  for (int64_t j = 0; j < n; j += V::size()) {
    const int64_t c = std::min<int64_t>(V::size(), n - j);
    const V gv = V::loadu(g + j, c), gt = V::loadu(gate + j, c);
    (gv * V::loadu(up + j, c) * act_grad<ACT>(gt, p)).store(g_gate + j, c);
    (gv * act_forward<ACT>(gt, p)).store(g_up + j, c);
  }
}

// ---- per-dtype row adapters ----------------------------------------------------------------------

// Per-thread float scratch rows for 16-bit dtypes (converted in, computed, converted out).
struct Scratch {
  std::vector<float> a, b, c;
  void ensure(int64_t n) {
    if (static_cast<int64_t>(a.size()) < n) a.resize(n), b.resize(n), c.resize(n);
  }
};
inline thread_local Scratch scratch;

template <int ACT, typename scalar_t>
inline void fwd_rows(const scalar_t* acc, const float* bias, scalar_t* pre, scalar_t* out, int64_t r0,
              int64_t r1, int64_t n, double param) {
  for (int64_t i = r0; i < r1; ++i) {
    const scalar_t* src = acc + i * n;
    scalar_t* dst = out + i * n;
    scalar_t* pr = pre ? pre + i * n : nullptr;
    if constexpr (std::is_same_v<scalar_t, float>) {
      fwd_row<ACT>(src, bias, pr, dst, n, static_cast<float>(param));
    } else if constexpr (std::is_same_v<scalar_t, double>) {
      for (int64_t j = 0; j < n; ++j) {
        double x = src[j];  // float64 bias is added by the GEMM
        if (pr) pr[j] = x;
        dst[j] = act_forward<ACT>(x, param);
      }
    } else {
      scratch.ensure(n);
      at::vec::convert(src, scratch.a.data(), n);
      fwd_row<ACT>(scratch.a.data(), bias, pr ? scratch.b.data() : nullptr, scratch.a.data(), n,
                   static_cast<float>(param));
      at::vec::convert(scratch.a.data(), dst, n);
      if (pr) at::vec::convert(scratch.b.data(), pr, n);
    }
  }
}

template <int ACT, typename scalar_t>
inline void bwd_rows(const scalar_t* g, const scalar_t* s, scalar_t* gp, at::opmath_type<scalar_t>* colsum,
              int64_t r0,
              int64_t r1, int64_t n, double param) {
  for (int64_t i = r0; i < r1; ++i) {
    const scalar_t* gi = g + i * n;
    const scalar_t* si = s ? s + i * n : nullptr;
    scalar_t* gpi = gp + i * n;
    if constexpr (std::is_same_v<scalar_t, float>) {
      bwd_row<ACT>(gi, si, gpi, colsum, n, static_cast<float>(param));
    } else if constexpr (std::is_same_v<scalar_t, double>) {
      for (int64_t j = 0; j < n; ++j) {
        double d = gi[j];
        if constexpr (ACT != IDENTITY) d *= act_grad<ACT>(static_cast<double>(si[j]), param);
        gpi[j] = d;
        if (colsum) colsum[j] += d;
      }
    } else {
      scratch.ensure(n);
      at::vec::convert(gi, scratch.a.data(), n);
      if (si) at::vec::convert(si, scratch.b.data(), n);
      bwd_row<ACT>(scratch.a.data(), scratch.b.data(), scratch.c.data(), nullptr, n,
                   static_cast<float>(param));
      // round grad_pre to the dtype first: the bias gradient sums what the GEMMs see
      at::vec::convert(scratch.c.data(), gpi, n);
      if (colsum) {
        at::vec::convert(gpi, scratch.c.data(), n);
        for (int64_t j = 0; j < n; ++j) colsum[j] += scratch.c[j];
      }
    }
  }
}

// Gated rows through float: pre (rows, 2n) -> out (rows, n); 16-bit and float64 via conversion.
template <int ACT, typename scalar_t>
inline void gated_fwd_rows(const scalar_t* pre, scalar_t* out, int64_t r0, int64_t r1, int64_t n,
                    double param) {
  for (int64_t i = r0; i < r1; ++i) {
    const scalar_t* pi = pre + i * 2 * n;
    scalar_t* oi = out + i * n;
    if constexpr (std::is_same_v<scalar_t, float>) {
      gated_fwd_row<ACT>(pi, pi + n, oi, n, static_cast<float>(param));
    } else if constexpr (std::is_same_v<scalar_t, double>) {
      for (int64_t j = 0; j < n; ++j) oi[j] = act_forward<ACT>(pi[j], param) * pi[n + j];
    } else {
      scratch.ensure(2 * n);
      at::vec::convert(pi, scratch.a.data(), 2 * n);
      gated_fwd_row<ACT>(scratch.a.data(), scratch.a.data() + n, scratch.b.data(), n,
                         static_cast<float>(param));
      at::vec::convert(scratch.b.data(), oi, n);
    }
  }
}

template <int ACT, typename scalar_t>
inline void gated_bwd_rows(const scalar_t* g, const scalar_t* pre, scalar_t* gp,
                    at::opmath_type<scalar_t>* colsum, int64_t r0, int64_t r1, int64_t n,
                    double param) {
  for (int64_t i = r0; i < r1; ++i) {
    const scalar_t* gi = g + i * n;
    const scalar_t* pi = pre + i * 2 * n;
    scalar_t* gpi = gp + i * 2 * n;
    if constexpr (std::is_same_v<scalar_t, float>) {
      gated_bwd_row<ACT>(gi, pi, pi + n, gpi, gpi + n, n, static_cast<float>(param));
    } else if constexpr (std::is_same_v<scalar_t, double>) {
      for (int64_t j = 0; j < n; ++j) {
        gpi[j] = gi[j] * pi[n + j] * act_grad<ACT>(pi[j], param);
        gpi[n + j] = gi[j] * act_forward<ACT>(pi[j], param);
      }
    } else {
      scratch.ensure(2 * n);
      at::vec::convert(gi, scratch.c.data(), n);
      at::vec::convert(pi, scratch.a.data(), 2 * n);
      gated_bwd_row<ACT>(scratch.c.data(), scratch.a.data(), scratch.a.data() + n,
                         scratch.b.data(), scratch.b.data() + n, n, static_cast<float>(param));
      at::vec::convert(scratch.b.data(), gpi, 2 * n);
    }
    if (colsum) {
      for (int64_t j = 0; j < 2 * n; ++j) colsum[j] += static_cast<at::opmath_type<scalar_t>>(gpi[j]);
    }
  }
}

}  // namespace nnfast
