// CUDA kernels for nnfast_ext::dense_fwd / dense_bwd.
//
// Forward: cuBLASLt with an epilogue where one matches PyTorch's semantics exactly — BIAS
// (identity), GELU_AUX_BIAS (gelu_tanh: cuBLASLt's GELU is the tanh form, and the aux output is the
// pre-activation backward needs). Not RELU_BIAS: whether it keeps NaN (torch.relu does) has not
// been seen on a GPU. Every other activation, every float32 GEMM (addmm reads PyTorch's TF32
// setting itself, through whichever API the user set it) and every shape cuBLASLt has no algorithm
// for: GEMM with bias (addmm, fp32 accumulate, one rounding) then a vectorized epilogue kernel
// (16-byte accesses) built on activations.h.
// Backward: a vectorized prologue kernel grad_pre = grad_out * f'(saved), then grad_x = grad_pre @ W
// and grad_w = grad_pre^T @ x with the bias gradient fused into that GEMM (cuBLASLt BGRADB).
// DRELU_BGRAD / DGELU_BGRAD apply the derivative to the GEMM that *produces* grad_out, i.e. the
// next layer's grad_x; they need cross-layer fusion and are not used by this single-layer op.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cublasLt.h>
#include <torch/library.h>

#include <ATen/OpMathType.h>

#include <mutex>
#include <sstream>
#include <vector>

#include "../activations.h"
#include "../check.h"

namespace nnfast {
namespace {

// ---- cuBLASLt ------------------------------------------------------------------------------------

#define NNFAST_LT_CHECK(call, what)                                                          \
  do {                                                                                       \
    cublasStatus_t status_ = (call);                                                         \
    TORCH_CHECK(status_ == CUBLAS_STATUS_SUCCESS, "nnfast: ", #call, " failed with status ", \
                static_cast<int>(status_), " (", what, ")");                                 \
  } while (0)

cublasLtHandle_t lt_handle() {
  // One handle per device, created on first use; cuBLASLt handles hold no stream state.
  static std::mutex mu;
  static std::vector<cublasLtHandle_t> handles;
  const int dev = c10::cuda::current_device();
  std::lock_guard<std::mutex> lock(mu);
  if (static_cast<int>(handles.size()) <= dev) handles.resize(dev + 1, nullptr);
  if (handles[dev] == nullptr) NNFAST_LT_CHECK(cublasLtCreate(&handles[dev]), "create handle");
  return handles[dev];
}

cudaDataType_t cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    default: return CUDA_R_32F;
  }
}

// 16-bit only: float32 takes addmm, which honours torch's TF32 flags (reading them here raised on
// recent torch once a user had set torch.backends.cuda.matmul.fp32_precision).
bool lt_dtype(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// D (m x n, column-major, ld ldd) = op(A) (m x k) @ op(B) (k x n), with an epilogue.
struct LtGemm {
  bool trans_a, trans_b;
  int64_t m, n, k;
  const void* a;
  int64_t lda;
  const void* b;
  int64_t ldb;
  void* d;
  int64_t ldd;
  cublasLtEpilogue_t epilogue;
  const void* bias = nullptr;  // BIAS-type epilogues: m values; BGRADB: n values written
  void* aux = nullptr;         // GELU_AUX: the pre-activation, m x n with ld aux_ld
  int64_t aux_ld = 0;
};

// Descriptors released on every path, the throwing ones included.
struct LtDescriptors {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  ~LtDescriptors() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

// Runs the GEMM; false (nothing written) when cuBLASLt has no algorithm for it, so the caller
// takes its addmm path instead.
bool run_lt(const LtGemm& g, at::ScalarType dtype, const at::Tensor& like) {
  std::ostringstream what;
  what << "m=" << g.m << " n=" << g.n << " k=" << g.k << " epilogue=" << static_cast<int>(g.epilogue);
  const std::string w = what.str();
  const cudaDataType_t dt = cuda_dtype(dtype);
  LtDescriptors desc;
  NNFAST_LT_CHECK(cublasLtMatmulDescCreate(&desc.op, CUBLAS_COMPUTE_32F, CUDA_R_32F), w);
  const cublasOperation_t ta = g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t tb = g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  NNFAST_LT_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)), w);
  NNFAST_LT_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)), w);
  NNFAST_LT_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &g.epilogue,
                                                 sizeof(g.epilogue)), w);
  if (g.bias != nullptr) {
    NNFAST_LT_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias,
                                                   sizeof(g.bias)), w);
  }
  if (g.aux != nullptr) {
    NNFAST_LT_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER,
                                                   &g.aux, sizeof(g.aux)), w);
    NNFAST_LT_CHECK(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD,
                                                   &g.aux_ld, sizeof(g.aux_ld)), w);
  }
  NNFAST_LT_CHECK(cublasLtMatrixLayoutCreate(&desc.a, dt, g.trans_a ? g.k : g.m, g.trans_a ? g.m : g.k, g.lda), w);
  NNFAST_LT_CHECK(cublasLtMatrixLayoutCreate(&desc.b, dt, g.trans_b ? g.n : g.k, g.trans_b ? g.k : g.n, g.ldb), w);
  NNFAST_LT_CHECK(cublasLtMatrixLayoutCreate(&desc.d, dt, g.m, g.n, g.ldd), w);

  // Workspace from PyTorch's caching allocator (32 MiB: what cuBLASLt asks for on Hopper).
  const size_t ws_size = 32u << 20;
  NNFAST_LT_CHECK(cublasLtMatmulPreferenceCreate(&desc.pref), w);
  NNFAST_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(desc.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                       &ws_size, sizeof(ws_size)), w);
  cublasLtMatmulHeuristicResult_t heur = {};
  int found = 0;
  const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(
      lt_handle(), desc.op, desc.a, desc.b, desc.d, desc.d, desc.pref, 1, &heur, &found);
  if (status == CUBLAS_STATUS_NOT_SUPPORTED || (status == CUBLAS_STATUS_SUCCESS && found == 0)) {
    return false;
  }
  NNFAST_LT_CHECK(status, w);
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_size)}, like.options().dtype(at::kByte));
  const float alpha = 1.f, beta = 0.f;
  NNFAST_LT_CHECK(cublasLtMatmul(lt_handle(), desc.op, &alpha, g.a, desc.a, g.b, desc.b, &beta, g.d,
                                 desc.d, g.d, desc.d, &heur.algo, ws.data_ptr(), ws_size,
                                 c10::cuda::getCurrentCUDAStream()), w);
  return true;
}

// cuBLASLt wants 16-byte aligned pointers and leading dimensions that are multiples of 8 elements
// for its fast (and epilogue-capable) kernels; other shapes take the addmm + kernel path.
bool lt_ok(const at::Tensor& t) {
  return t.dim() == 2 && t.stride(1) == 1 && t.stride(0) % 8 == 0 && aligned16(t.data_ptr());
}

// ---- elementwise kernels ------------------------------------------------------------------------

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

constexpr int kThreads = 256;

int64_t blocks_for(int64_t work) {
  // A grid-stride loop: enough blocks to fill any current GPU, no more.
  return std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, 65535));
}

// out = f(src); pre = src when STORE_PRE (src already holds x @ W^T + b). src may alias out.
template <int ACT, bool STORE_PRE, int VEC, typename scalar_t>
__global__ void fwd_epilogue(const scalar_t* src, scalar_t* out, scalar_t* pre, int64_t packs,
                             double param) {
  using P = Pack<scalar_t, VEC>;
  using acc_t = at::opmath_type<scalar_t>;  // float, or double for float64
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < packs;
       i += int64_t(gridDim.x) * blockDim.x) {
    const P x = reinterpret_cast<const P*>(src)[i];
    P y;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      y.v[j] = static_cast<scalar_t>(
          act_forward<ACT, acc_t>(static_cast<acc_t>(x.v[j]), static_cast<acc_t>(param)));
    }
    if constexpr (STORE_PRE) reinterpret_cast<P*>(pre)[i] = x;
    reinterpret_cast<P*>(out)[i] = y;
  }
}

// gp = g * f'(s)
template <int ACT, int VEC, typename scalar_t>
__global__ void bwd_prologue(const scalar_t* g, const scalar_t* s, scalar_t* gp, int64_t packs,
                             double param) {
  using P = Pack<scalar_t, VEC>;
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < packs;
       i += int64_t(gridDim.x) * blockDim.x) {
    const P gv = reinterpret_cast<const P*>(g)[i];
    const P sv = reinterpret_cast<const P*>(s)[i];
    P r;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      r.v[j] = static_cast<scalar_t>(
          static_cast<acc_t>(gv.v[j]) *
          act_grad<ACT, acc_t>(static_cast<acc_t>(sv.v[j]), static_cast<acc_t>(param)));
    }
    reinterpret_cast<P*>(gp)[i] = r;
  }
}

// Gated: pre (rows, 2n) = [gate, up] -> out (rows, n) = f(gate) * up.
template <int ACT, typename scalar_t>
__global__ void gated_fwd(const scalar_t* pre, scalar_t* out, int64_t numel, int64_t n, double param) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < numel;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / n, c = i % n;
    const acc_t gate = static_cast<acc_t>(pre[r * 2 * n + c]);
    const acc_t up = static_cast<acc_t>(pre[r * 2 * n + n + c]);
    out[i] = static_cast<scalar_t>(act_forward<ACT, acc_t>(gate, static_cast<acc_t>(param)) * up);
  }
}

// Gated: g_gate = g * up * f'(gate), g_up = g * f(gate), into gp (rows, 2n).
template <int ACT, typename scalar_t>
__global__ void gated_bwd(const scalar_t* g, const scalar_t* pre, scalar_t* gp, int64_t numel,
                          int64_t n, double param) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < numel;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / n, c = i % n;
    const acc_t gv = static_cast<acc_t>(g[i]);
    const acc_t gate = static_cast<acc_t>(pre[r * 2 * n + c]);
    const acc_t up = static_cast<acc_t>(pre[r * 2 * n + n + c]);
    const acc_t p = static_cast<acc_t>(param);
    gp[r * 2 * n + c] = static_cast<scalar_t>(gv * up * act_grad<ACT, acc_t>(gate, p));
    gp[r * 2 * n + n + c] = static_cast<scalar_t>(gv * act_forward<ACT, acc_t>(gate, p));
  }
}

// 16-byte packs when every pointer is aligned for them, else one element at a time.
template <typename scalar_t>
int pack_width(int64_t numel, std::initializer_list<const void*> ptrs) {
  constexpr int vec = 16 / sizeof(scalar_t);
  if (numel % vec != 0) return 1;
  for (const void* p : ptrs)
    if (p != nullptr && !aligned16(p)) return 1;
  return vec;
}

template <int ACT, typename scalar_t>
void launch_fwd_epilogue(const at::Tensor& src, at::Tensor& out, at::Tensor* pre, double param) {
  const int64_t numel = out.numel();
  auto stream = c10::cuda::getCurrentCUDAStream();
  const scalar_t* s = src.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  scalar_t* p = pre ? pre->data_ptr<scalar_t>() : nullptr;
  constexpr int V = 16 / sizeof(scalar_t);
  if (pack_width<scalar_t>(numel, {s, o, p}) == V) {
    const int64_t packs = numel / V;
    if (p) {
      fwd_epilogue<ACT, true, V><<<blocks_for(packs), kThreads, 0, stream>>>(s, o, p, packs, param);
    } else {
      fwd_epilogue<ACT, false, V><<<blocks_for(packs), kThreads, 0, stream>>>(s, o, p, packs, param);
    }
  } else if (p) {
    fwd_epilogue<ACT, true, 1><<<blocks_for(numel), kThreads, 0, stream>>>(s, o, p, numel, param);
  } else {
    fwd_epilogue<ACT, false, 1><<<blocks_for(numel), kThreads, 0, stream>>>(s, o, p, numel, param);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int ACT, typename scalar_t>
void launch_bwd_prologue(const at::Tensor& g, const at::Tensor& s, at::Tensor& gp, double param) {
  const int64_t numel = g.numel();
  auto stream = c10::cuda::getCurrentCUDAStream();
  const scalar_t* gptr = g.data_ptr<scalar_t>();
  const scalar_t* sptr = s.data_ptr<scalar_t>();
  scalar_t* out = gp.data_ptr<scalar_t>();
  constexpr int V = 16 / sizeof(scalar_t);
  if (pack_width<scalar_t>(numel, {gptr, sptr, out}) == V) {
    const int64_t packs = numel / V;
    bwd_prologue<ACT, V><<<blocks_for(packs), kThreads, 0, stream>>>(gptr, sptr, out, packs, param);
  } else {
    bwd_prologue<ACT, 1><<<blocks_for(numel), kThreads, 0, stream>>>(gptr, sptr, out, numel, param);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- ops -------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> dense_fwd_cuda(const at::Tensor& x_, const at::Tensor& weight,
                                                  const c10::optional<at::Tensor>& bias_,
                                                  int64_t act, double param, bool save_pre) {
  check_fwd_args(x_, weight, bias_, act);
  // cuBLASLt reads the bias as N consecutive values: a strided or expanded (stride-0) bias is
  // copied (N elements) rather than read out of bounds.
  const c10::optional<at::Tensor> bias =
      bias_.has_value() ? c10::optional<at::Tensor>(bias_->contiguous()) : c10::nullopt;
  c10::cuda::OptionalCUDAGuard guard(x_.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int base = gated_base(static_cast<int>(act));
  const int64_t m = x_.size(0), rows = weight.size(0), k = x_.size(1);
  const int64_t n = base >= 0 ? rows / 2 : rows;
  at::Tensor out = at::empty({m, n}, x_.options());
  at::Tensor pre = save_pre ? at::empty({m, rows}, x_.options()) : at::empty({0}, x_.options());
  if (m == 0 || n == 0) return {out, pre};
  const at::Tensor x = x_.stride(1) == 1 ? x_ : x_.contiguous();
  const at::Tensor w = weight.contiguous();

  if (base >= 0) {  // gated: one GEMM for the gate and up rows, then f(gate) * up
    at::Tensor acc = save_pre ? pre : at::empty({m, rows}, x.options());
    if (bias.has_value()) {
      at::addmm_out(acc, *bias, x, w.t());
    } else {
      at::mm_out(acc, x, w.t());
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gated_fwd_cuda", [&] {
      dispatch_act(base, [&](auto a) {
        constexpr int ACT = decltype(a)::value;
        const int64_t numel = m * n;
        gated_fwd<ACT, scalar_t><<<blocks_for(numel), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            acc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), numel, n, param);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
    return {out, pre};
  }

  // cuBLASLt epilogues (see the top of this file for which activations and why).
  const bool lt_act = act == IDENTITY || act == GELU_TANH;
  if (lt_act && k > 0 && lt_dtype(x.scalar_type()) && lt_ok(x) && lt_ok(w) && n % 8 == 0 &&
      (!bias.has_value() || aligned16(bias->data_ptr()))) {
    const bool has_bias = bias.has_value();
    cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_DEFAULT;
    if (act == IDENTITY) epi = has_bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
    if (act == GELU_TANH) {
      epi = save_pre ? (has_bias ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX)
                     : (has_bias ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_GELU);
    }
    // Row-major out (m, n) = x (m, k) @ W^T is column-major out^T (n x m) = W (n x k) @ x^T.
    LtGemm g{true, false, n, m, k, w.data_ptr(), k, x.data_ptr(), x.stride(0), out.data_ptr(), n,
             epi};
    if (has_bias) g.bias = bias->data_ptr();
    if (act == GELU_TANH && save_pre) {
      g.aux = pre.data_ptr();
      g.aux_ld = n;
    }
    if (run_lt(g, x.scalar_type(), x)) return {out, pre};
  }

  // GEMM with bias (one rounding of the fp32 accumulator), then the epilogue kernel.
  at::Tensor& acc = save_pre ? pre : out;
  if (bias.has_value()) {
    at::addmm_out(acc, *bias, x, w.t());
  } else {
    at::mm_out(acc, x, w.t());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dense_fwd_cuda", [&] {
    dispatch_act(static_cast<int>(act), [&](auto a) {
      constexpr int ACT = decltype(a)::value;
      launch_fwd_epilogue<ACT, scalar_t>(acc, out, save_pre ? &pre : nullptr, param);
    });
  });
  return {out, pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& x_, const at::Tensor& weight,
    const at::Tensor& saved, int64_t act, double param, bool needs_x, bool needs_w,
    bool needs_b) {
  TORCH_CHECK(act >= 0 && act < NUM_ACTS, "nnfast_ext: unknown activation code ", act);
  c10::cuda::OptionalCUDAGuard guard(grad_out.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor g = grad_out.contiguous();
  const int base = gated_base(static_cast<int>(act));
  const int64_t m = g.size(0), n = base >= 0 ? 2 * g.size(1) : g.size(1);  // n: weight rows
  const int64_t k = needs_x ? weight.size(1) : x_.size(1);
  auto opts = g.options();
  at::Tensor gx = needs_x ? at::empty({m, k}, opts) : at::empty({0}, opts);
  at::Tensor gw = needs_w ? at::empty({n, k}, opts) : at::empty({0}, opts);
  at::Tensor gb = needs_b ? at::empty({n}, opts) : at::empty({0}, opts);
  if (m == 0 || n == 0) return {gx.zero_(), gw.zero_(), gb.zero_()};

  at::Tensor gp = g;
  if (base >= 0) {
    TORCH_CHECK(saved.dim() == 2 && saved.size(0) == m && saved.size(1) == n,
                "nnfast_ext::dense_bwd: a gated layer keeps its (M, 2N) pre-activation; got shape ",
                saved.sizes(), " for grad_out of shape ", g.sizes());
    gp = at::empty({m, n}, opts);
    const at::Tensor s = saved.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "gated_bwd_cuda", [&] {
      dispatch_act(base, [&](auto a) {
        constexpr int ACT = decltype(a)::value;
        const int64_t numel = g.numel();
        gated_bwd<ACT, scalar_t><<<blocks_for(numel), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            g.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), gp.data_ptr<scalar_t>(), numel,
            g.size(1), param);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  } else if (act != IDENTITY) {
    TORCH_CHECK(saved.sizes() == g.sizes(), "nnfast_ext::dense_bwd: saved tensor has shape ",
                saved.sizes(), " but grad_out has shape ", g.sizes());
    gp = at::empty({m, n}, opts);
    const at::Tensor s = saved.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "dense_bwd_cuda", [&] {
      dispatch_act(static_cast<int>(act), [&](auto a) {
        constexpr int ACT = decltype(a)::value;
        launch_bwd_prologue<ACT, scalar_t>(g, s, gp, param);
      });
    });
  }
  if (needs_x) at::mm_out(gx, gp, weight);
  if (needs_w) {
    const at::Tensor x = x_.stride(1) == 1 ? x_ : x_.contiguous();
    if (needs_b && lt_dtype(g.scalar_type()) && lt_ok(x) && lt_ok(gp) && k % 8 == 0 &&
        aligned16(gw.data_ptr()) && aligned16(gb.data_ptr())) {
      // grad_w (n, k) row-major = column-major (k x n) = x^T (k x m) @ grad_pre (m x n); BGRADB
      // sums op(B) = grad_pre over m into grad_b in the same pass.
      LtGemm lt{false, true, k, n, m, x.data_ptr(), x.stride(0), gp.data_ptr(), gp.stride(0),
                gw.data_ptr(), k, CUBLASLT_EPILOGUE_BGRADB};
      lt.bias = gb.data_ptr();
      if (run_lt(lt, g.scalar_type(), g)) return {gx, gw, gb};
    }
    at::mm_out(gw, gp.t(), x);
  }
  if (needs_b) at::sum_out(gb, gp, {0});
  return {gx, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(nnfast_ext, CUDA, m) {
  m.impl("dense_fwd", &dense_fwd_cuda);
  m.impl("dense_bwd", &dense_bwd_cuda);
}

}  // namespace nnfast
