// CPU fused MLP for nnfast_ext::mlp_fwd / mlp_bwd (float32): each thread walks a block of rows
// through every layer while the block's activations are in cache, instead of streaming every
// (M, width) intermediate through memory once per layer and per elementwise pass.
//
// Forward, per row block: h -> GEMM -> bias + f (vectorized) -> next layer; the saved tensor of a
// hidden layer is written once and, when it is the output, serves directly as the next input.
// Backward, per row block, last layer first: grad_w += g^T x_l and grad_b += colsum(g) into this
// thread's accumulators, g <- (g W_l) * f'(saved) for the layer below, grad_x rows at the end.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../activations.h"
#include "dense_rows.h"

namespace nnfast {
namespace {

// 512 rows x 128 float32 columns = 256 KB per activation block: two of them fit in L2.
constexpr int64_t kMlpRows = 512;

void check_mlp(const at::Tensor& x, const std::vector<at::Tensor>& weights, int64_t act) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat,
              "nnfast_ext::mlp_fwd: x must be a 2-D float32 tensor, got ", x.scalar_type(), " ",
              x.sizes());
  TORCH_CHECK(!weights.empty(), "nnfast_ext::mlp_fwd: no weights");
  TORCH_CHECK(act >= 0 && act < NUM_ACTS && gated_base(static_cast<int>(act)) < 0,
              "nnfast_ext::mlp_fwd: unsupported activation code ", act);
  int64_t width = x.size(1);
  for (size_t i = 0; i < weights.size(); ++i) {
    TORCH_CHECK(weights[i].dim() == 2 && weights[i].size(1) == width &&
                    weights[i].scalar_type() == at::kFloat,
                "nnfast_ext::mlp_fwd: weights[", i, "] must be float32 (out, ", width, "), got ",
                weights[i].scalar_type(), " ", weights[i].sizes());
    width = weights[i].size(0);
  }
}

std::tuple<at::Tensor, std::vector<at::Tensor>> mlp_fwd_cpu(
    const at::Tensor& x, at::TensorList weights_, const c10::List<c10::optional<at::Tensor>>& biases,
    int64_t act, double param, bool save) {
  std::vector<at::Tensor> weights(weights_.begin(), weights_.end());
  check_mlp(x, weights, act);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t m = x.size(0), layers = static_cast<int64_t>(weights.size());
  const bool from_output = grad_reads_output(static_cast<int>(act), static_cast<float>(param));
  at::Tensor out = at::empty({m, weights.back().size(0)}, x.options());
  std::vector<at::Tensor> saved;
  std::vector<at::Tensor> wt, bf;
  for (int64_t l = 0; l < layers; ++l) {
    if (save && l < layers - 1) saved.push_back(at::empty({m, weights[l].size(0)}, x.options()));
    wt.push_back(weights[l].t());
    const c10::optional<at::Tensor> b = biases.get(l);
    bf.push_back(b.has_value() ? b->to(at::kFloat).contiguous() : at::Tensor());
  }
  if (m == 0) return {out, saved};
  const float p = static_cast<float>(param);
  dispatch_act(static_cast<int>(act), [&](auto a) {
    constexpr int ACT = decltype(a)::value;
    const int64_t blocks = (m + kMlpRows - 1) / kMlpRows;
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      at::AutoDispatchBelowADInplaceOrView below;
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t r0 = blk * kMlpRows, rows = std::min(m, r0 + kMlpRows) - r0;
        at::Tensor h = x.narrow(0, r0, rows);
        for (int64_t l = 0; l < layers; ++l) {
          const int64_t n = weights[l].size(0);
          const float* bias = bf[l].defined() ? bf[l].data_ptr<float>() : nullptr;
          if (l == layers - 1) {
            at::Tensor dst = out.narrow(0, r0, rows);
            at::mm_out(dst, h, wt[l]);
            fwd_rows<IDENTITY, float>(dst.data_ptr<float>(), bias, nullptr, dst.data_ptr<float>(),
                                      0, rows, n, p);
            break;
          }
          at::Tensor acc = at::empty({rows, n}, x.options());
          at::mm_out(acc, h, wt[l]);
          float* accp = acc.data_ptr<float>();
          if (save && from_output) {  // the kept output is the next input
            at::Tensor y = saved[l].narrow(0, r0, rows);
            fwd_rows<ACT, float>(accp, bias, nullptr, y.data_ptr<float>(), 0, rows, n, p);
            h = y;
          } else {
            float* pre = save ? saved[l].narrow(0, r0, rows).data_ptr<float>() : nullptr;
            fwd_rows<ACT, float>(accp, bias, pre, accp, 0, rows, n, p);
            h = acc;
          }
        }
      }
    });
  });
  return {out, saved};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> mlp_bwd_cpu(
    const at::Tensor& grad_out_, const at::Tensor& x, at::TensorList weights_,
    c10::List<bool> has_bias, at::TensorList saved_, int64_t act, double param, bool needs_x) {
  std::vector<at::Tensor> weights(weights_.begin(), weights_.end());
  check_mlp(x, weights, act);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor g_all = grad_out_.contiguous();
  std::vector<at::Tensor> saved;
  for (const auto& s : saved_) saved.push_back(s.contiguous());
  const int64_t m = x.size(0), layers = static_cast<int64_t>(weights.size());
  TORCH_CHECK(static_cast<int64_t>(saved.size()) == layers - 1,
              "nnfast_ext::mlp_bwd: expected ", layers - 1, " saved tensors, got ", saved.size());
  const bool from_output = grad_reads_output(static_cast<int>(act), static_cast<float>(param));
  const int threads = at::get_num_threads();
  // per thread and layer: grad_w and grad_b accumulators
  std::vector<std::vector<at::Tensor>> gw_t(threads), gb_t(threads);
  at::Tensor gx = needs_x ? at::empty_like(x, at::MemoryFormat::Contiguous) : at::empty({0}, x.options());
  const float p = static_cast<float>(param);
  if (m > 0) {
    dispatch_act(static_cast<int>(act), [&](auto a) {
      constexpr int ACT = decltype(a)::value;
      const int64_t blocks = (m + kMlpRows - 1) / kMlpRows;
      at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
        at::AutoDispatchBelowADInplaceOrView below;
        const int tid = at::get_thread_num();
        auto& gws = gw_t[tid];
        auto& gbs = gb_t[tid];
        if (gws.empty()) {
          for (int64_t l = 0; l < layers; ++l) {
            gws.push_back(at::zeros_like(weights[l]));
            // float64 totals of per-block (cascade) sums: the bias gradient's error does not
            // grow with the number of row blocks
            gbs.push_back(at::zeros({weights[l].size(0)}, x.options().dtype(at::kDouble)));
          }
        }
        for (int64_t blk = b0; blk < b1; ++blk) {
          const int64_t r0 = blk * kMlpRows, rows = std::min(m, r0 + kMlpRows) - r0;
          at::Tensor g = g_all.narrow(0, r0, rows);  // grad of this layer's pre-activation
          for (int64_t l = layers - 1; l >= 0; --l) {
            at::Tensor xin;
            at::Tensor s_prev;
            if (l == 0) {
              xin = x.narrow(0, r0, rows);
            } else {
              s_prev = saved[l - 1].narrow(0, r0, rows);
              if (from_output) {
                xin = s_prev;
              } else {  // recompute the layer's input f(pre) for this block only
                xin = at::empty_like(s_prev);
                fwd_rows<ACT, float>(s_prev.data_ptr<float>(), nullptr, nullptr,
                                     xin.data_ptr<float>(), 0, rows, s_prev.size(1), p);
              }
            }
            gws[l].addmm_(g.t(), xin);
            if (has_bias.get(l)) gbs[l].add_(g.sum(0, false, at::kDouble));
            if (l == 0) {
              if (needs_x) {
                at::Tensor dst = gx.narrow(0, r0, rows);
                at::mm_out(dst, g, weights[0]);
              }
              break;
            }
            at::Tensor gin = at::mm(g, weights[l]);
            float* gp = gin.data_ptr<float>();
            bwd_rows<ACT, float>(gp, s_prev.data_ptr<float>(), gp, nullptr, 0, rows,
                                 gin.size(1), p);
            g = gin;
          }
        }
      });
    });
  } else if (needs_x) {
    gx.zero_();
  }
  std::vector<at::Tensor> grad_w, grad_b;
  for (int64_t l = 0; l < layers; ++l) {
    at::Tensor w = at::zeros_like(weights[l]);
    at::Tensor b = has_bias.get(l) ? at::zeros({weights[l].size(0)}, x.options().dtype(at::kDouble))
                                   : at::empty({0}, x.options());
    for (int t = 0; t < threads; ++t) {
      if (gw_t[t].empty()) continue;
      w.add_(gw_t[t][l]);
      if (has_bias.get(l)) b.add_(gb_t[t][l]);
    }
    grad_w.push_back(w);
    grad_b.push_back(b.to(x.scalar_type()));
  }
  return {gx, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(nnfast_ext, CPU, m) {
  m.impl("mlp_fwd", &mlp_fwd_cpu);
  m.impl("mlp_bwd", &mlp_bwd_cpu);
}

}  // namespace nnfast
