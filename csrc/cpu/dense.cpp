// CPU kernels for nnfast_ext::dense_fwd / dense_bwd.
//
// Forward: GEMM (MKL/oneDNN through at::mm) then a vectorized epilogue (bias + activation, and the
// pre-activation when backward needs it). When the weight is small enough to stay in cache
// (kSmallWeightBytes), rows are processed in blocks: each thread multiplies a row block and applies
// the epilogue while that output block is still in L2, so the (M, N) output crosses memory once.
// Otherwise one multi-threaded GEMM is followed by one parallel epilogue pass.
//
// Backward: one vectorized pass computes grad_pre = grad_out * f'(saved) together with the bias
// gradient (per-thread column sums), then the two GEMMs. With a small weight (float32/float64),
// the row-block version also does the GEMMs per block: grad_x rows are written and grad_w is
// accumulated per thread while grad_pre is in cache.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../activations.h"
#include "../check.h"
#include "dense_rows.h"

namespace nnfast {

namespace {

// Row blocks are used when the weight fits in this many bytes: the per-block GEMM then re-reads a
// cached weight. 64x64 and 512x512 float weights qualify; 1024x4096 does not (16 MB), and there
// one large GEMM avoids re-packing the weight for every block.
constexpr int64_t kSmallWeightBytes = 1 << 20;
constexpr int64_t kRowBlock = 1024;

int64_t grain_rows(int64_t n) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)); }

bool small_weight(const at::Tensor& w) { return w.numel() * w.element_size() <= kSmallWeightBytes; }

at::Tensor float_bias(const c10::optional<at::Tensor>& bias) {
  return bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
}

// Column sums of grad_pre (the bias gradient). Each thread sums kSumRows rows at a time in acc_t
// and adds that chunk into its own float64 totals, so the rounding error is that of a 256-row sum
// however large M grows: a float32 running sum over 1e6 rows of 0.125/1e6 came to 0.12574.
constexpr int64_t kSumRows = 256;

template <typename acc_t>
class ColSums {
 public:
  ColSums(bool on, int threads, int64_t n) : n_(n), threads_(threads), total_(on ? size_t(threads) * n : 0, 0.0) {}

  // Calls rows(c0, c1, colsum) over [r0, r1) in chunks of kSumRows; colsum is nullptr when off.
  template <typename F>
  void over(int64_t r0, int64_t r1, F&& rows) {
    if (total_.empty()) {
      rows(r0, r1, static_cast<acc_t*>(nullptr));
      return;
    }
    std::vector<acc_t> chunk(n_);
    double* total = total_.data() + size_t(at::get_thread_num()) * n_;
    for (int64_t c0 = r0; c0 < r1; c0 += kSumRows) {
      std::fill(chunk.begin(), chunk.end(), acc_t(0));
      rows(c0, std::min(r1, c0 + kSumRows), chunk.data());
      for (int64_t j = 0; j < n_; ++j) total[j] += static_cast<double>(chunk[j]);
    }
  }

  void write(at::Tensor& gb) const {
    gb.copy_(at::from_blob(const_cast<double*>(total_.data()), {threads_, n_}, at::kDouble).sum(0));
  }

 private:
  int64_t n_;
  int threads_;
  std::vector<double> total_;
};

// ---- forward ---------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> dense_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                 const c10::optional<at::Tensor>& bias,
                                                 int64_t act, double param, bool save_pre) {
  check_fwd_args(x, weight, bias, act);
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the op has no autograd of its own
  const int base = gated_base(static_cast<int>(act));
  const int64_t m = x.size(0), rows = weight.size(0), n = base >= 0 ? rows / 2 : rows;
  at::Tensor out = at::empty({m, n}, x.options());
  at::Tensor pre = save_pre ? at::empty({m, rows}, x.options()) : at::empty({0}, x.options());
  if (m == 0 || n == 0) return {out, pre};
  if (base >= 0) {
    // Gated: one GEMM for gate and up rows (bias inside), then y = f(gate) * up per row.
    at::Tensor acc = save_pre ? pre : at::empty({m, rows}, x.options());
    if (bias.has_value()) {
      at::addmm_out(acc, *bias, x, weight.t());
    } else {
      at::mm_out(acc, x, weight.t());
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gated_fwd_cpu", [&] {
      dispatch_act(base, [&](auto a) {
        constexpr int ACT = decltype(a)::value;
        const scalar_t* src = acc.data_ptr<scalar_t>();
        scalar_t* dst = out.data_ptr<scalar_t>();
        at::parallel_for(0, m, grain_rows(rows), [&](int64_t r0, int64_t r1) {
          gated_fwd_rows<ACT>(src, dst, r0, r1, n, param);
        });
      });
    });
    return {out, pre};
  }
  const at::Tensor wt = weight.t();
  // 16-bit outputs: the GEMM adds the bias to its float accumulator before the single rounding
  // (as addmm does in eager PyTorch); adding it after a rounded GEMM result loses bits to
  // cancellation. float64 keeps its bias in float64 the same way. float32 adds it in the
  // epilogue, which saves addmm's bias-fill pass over the output.
  const bool bias_in_gemm = bias.has_value() && x.scalar_type() != at::kFloat;
  const at::Tensor bf = bias_in_gemm ? at::Tensor() : float_bias(bias);
  const float* bptr = bf.defined() ? bf.data_ptr<float>() : nullptr;
  auto gemm = [&](at::Tensor& dst, const at::Tensor& a) {
    if (bias_in_gemm) {
      at::addmm_out(dst, *bias, a, wt);
    } else {
      at::mm_out(dst, a, wt);
    }
  };

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dense_fwd_cpu", [&] {
    scalar_t* optr = out.data_ptr<scalar_t>();
    scalar_t* pptr = save_pre ? pre.data_ptr<scalar_t>() : nullptr;
    dispatch_act(static_cast<int>(act), [&](auto a) {
      constexpr int ACT = decltype(a)::value;
      if (small_weight(weight)) {
        // Row blocks: GEMM into the output block, epilogue while it is in cache.
        const int64_t blocks = (m + kRowBlock - 1) / kRowBlock;
        at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
          // Worker threads do not inherit the caller's below-autograd dispatch state.
          at::AutoDispatchBelowADInplaceOrView below_autograd;
          for (int64_t b = b0; b < b1; ++b) {
            const int64_t r0 = b * kRowBlock, r1 = std::min(m, r0 + kRowBlock);
            at::Tensor blk = out.narrow(0, r0, r1 - r0);
            gemm(blk, x.narrow(0, r0, r1 - r0));
            fwd_rows<ACT>(optr, bptr, pptr, optr, r0, r1, n, param);
          }
        });
      } else {
        gemm(out, x);
        at::parallel_for(0, m, grain_rows(n), [&](int64_t r0, int64_t r1) {
          fwd_rows<ACT>(optr, bptr, pptr, optr, r0, r1, n, param);
        });
      }
    });
  });
  return {out, pre};
}

// ---- backward --------------------------------------------------------------------------------

// Gated layers: grad_pre (m, 2n) and its column sums in one pass, then the two GEMMs.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_bwd_cpu(const at::Tensor& g,
                                                             const at::Tensor& x,
                                                             const at::Tensor& weight,
                                                             const at::Tensor& pre, int base,
                                                             double param, bool needs_x,
                                                             bool needs_w, bool needs_b) {
  const int64_t m = g.size(0), n = g.size(1), rows = 2 * n;
  const int64_t k = needs_x ? weight.size(1) : x.size(1);
  TORCH_CHECK(pre.dim() == 2 && pre.size(0) == m && pre.size(1) == rows,
              "nnfast_ext::dense_bwd: a gated layer keeps its (M, 2N) pre-activation; got shape ",
              pre.sizes(), " for grad_out of shape ", g.sizes());
  auto opts = g.options();
  at::Tensor gx = needs_x ? at::empty({m, k}, opts) : at::empty({0}, opts);
  at::Tensor gw = needs_w ? at::empty({rows, k}, opts) : at::empty({0}, opts);
  at::Tensor gb = needs_b ? at::empty({rows}, opts) : at::empty({0}, opts);
  if (m == 0 || n == 0) return {gx.zero_(), gw.zero_(), gb.zero_()};
  at::Tensor gp = at::empty({m, rows}, opts);
  const int threads = at::get_num_threads();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "gated_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ColSums<acc_t> sums(needs_b, threads, rows);
    dispatch_act(base, [&](auto a) {
      constexpr int ACT = decltype(a)::value;
      at::parallel_for(0, m, grain_rows(rows), [&](int64_t r0, int64_t r1) {
        sums.over(r0, r1, [&](int64_t c0, int64_t c1, acc_t* cs) {
          gated_bwd_rows<ACT>(g.data_ptr<scalar_t>(), pre.data_ptr<scalar_t>(),
                              gp.data_ptr<scalar_t>(), cs, c0, c1, n, param);
        });
      });
    });
    if (needs_b) sums.write(gb);
  });
  if (needs_x) at::mm_out(gx, gp, weight);
  if (needs_w) at::mm_out(gw, gp.t(), x);
  return {gx, gw, gb};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_bwd_cpu(
    const at::Tensor& grad_out_, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& saved_, int64_t act, double param, bool needs_x, bool needs_w,
    bool needs_b) {
  TORCH_CHECK(act >= 0 && act < NUM_ACTS, "nnfast_ext: unknown activation code ", act);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor g = grad_out_.contiguous();
  const at::Tensor saved = act == IDENTITY ? saved_ : saved_.contiguous();
  const int base = gated_base(static_cast<int>(act));
  if (base >= 0) return gated_bwd_cpu(g, x, weight, saved, base, param, needs_x, needs_w, needs_b);
  const int64_t m = g.size(0), n = g.size(1);
  const int64_t k = needs_x ? weight.size(1) : x.size(1);
  TORCH_CHECK(act == IDENTITY || saved.sizes() == g.sizes(),
              "nnfast_ext::dense_bwd: saved tensor has shape ", saved.sizes(),
              " but grad_out has shape ", g.sizes());
  auto opts = g.options();
  at::Tensor gx = needs_x ? at::empty({m, k}, opts) : at::empty({0}, opts);
  at::Tensor gw = needs_w ? at::empty({n, k}, opts) : at::empty({0}, opts);
  at::Tensor gb = needs_b ? at::empty({n}, opts) : at::empty({0}, opts);
  if (m == 0 || n == 0) {  // empty batch (or no outputs): zero gradients
    return {gx.zero_(), gw.zero_(), gb.zero_()};
  }
  const int threads = at::get_num_threads();
  const bool blocked = small_weight(weight) &&
                       (g.scalar_type() == at::kFloat || g.scalar_type() == at::kDouble);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "dense_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;  // float, or double for float64
    // Per-thread column sums of grad_pre: the bias gradient without atomics or a second pass.
    ColSums<acc_t> sums(needs_b, threads, n);
    const scalar_t* gptr = g.data_ptr<scalar_t>();
    const scalar_t* sptr = act == IDENTITY ? nullptr : saved.data_ptr<scalar_t>();
    dispatch_act(static_cast<int>(act), [&](auto a) {
      constexpr int ACT = decltype(a)::value;
      if (blocked) {
        // Row blocks: grad_pre block -> grad_x rows and this thread's grad_w, while in cache.
        const int64_t blocks = (m + kRowBlock - 1) / kRowBlock;
        std::vector<at::Tensor> gw_parts(threads);
        at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
          at::AutoDispatchBelowADInplaceOrView below_autograd;
          const int tid = at::get_thread_num();
          at::Tensor gp = at::empty({kRowBlock, n}, opts);
          at::Tensor& gwt = gw_parts[tid];
          if (needs_w && !gwt.defined()) gwt = at::zeros({n, k}, opts);
          for (int64_t b = b0; b < b1; ++b) {
            const int64_t r0 = b * kRowBlock, rows = std::min(m, r0 + kRowBlock) - r0;
            at::Tensor gpb = gp.narrow(0, 0, rows);
            sums.over(0, rows, [&](int64_t c0, int64_t c1, acc_t* cs) {
              bwd_rows<ACT>(gptr + r0 * n, sptr ? sptr + r0 * n : nullptr,
                            gpb.data_ptr<scalar_t>(), cs, c0, c1, n, param);
            });
            if (needs_x) {
              at::Tensor gxb = gx.narrow(0, r0, rows);
              at::mm_out(gxb, gpb, weight);
            }
            if (needs_w) gwt.addmm_(gpb.t(), x.narrow(0, r0, rows));
          }
        });
        if (needs_w) {
          gw.zero_();
          for (auto& part : gw_parts)
            if (part.defined()) gw.add_(part);
        }
      } else {
        at::Tensor gp = ACT == IDENTITY && !needs_b ? g : at::empty({m, n}, opts);
        if (!(ACT == IDENTITY && !needs_b)) {
          at::parallel_for(0, m, grain_rows(n), [&](int64_t r0, int64_t r1) {
            sums.over(r0, r1, [&](int64_t c0, int64_t c1, acc_t* cs) {
              bwd_rows<ACT>(gptr, sptr, gp.data_ptr<scalar_t>(), cs, c0, c1, n, param);
            });
          });
        }
        if (needs_x) at::mm_out(gx, gp, weight);
        if (needs_w) at::mm_out(gw, gp.t(), x);
      }
    });
    if (needs_b) sums.write(gb);
  });
  return {gx, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(nnfast_ext, CPU, m) {
  m.impl("dense_fwd", &dense_fwd_cpu);
  m.impl("dense_bwd", &dense_bwd_cpu);
}

}  // namespace nnfast
