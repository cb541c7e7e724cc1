// Argument checks shared by the CPU and CUDA implementations.
#pragma once

#include <ATen/ATen.h>

#include "activations.h"

namespace nnfast {

inline void check_fwd_args(const at::Tensor& x, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, int64_t act) {
  TORCH_CHECK(x.dim() == 2, "nnfast_ext::dense_fwd: x must be 2-D (M, K), got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 2, "nnfast_ext::dense_fwd: weight must be 2-D (N, K), got shape ",
              weight.sizes());
  TORCH_CHECK(x.size(1) == weight.size(1), "nnfast_ext::dense_fwd: x has ", x.size(1),
              " columns but weight expects in_features=", weight.size(1), " (weight shape ",
              weight.sizes(), ")");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "nnfast_ext::dense_fwd: x has dtype ",
              x.scalar_type(), " but weight has dtype ", weight.scalar_type());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0),
                "nnfast_ext::dense_fwd: bias must have shape (", weight.size(0), "), got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "nnfast_ext::dense_fwd: x has dtype ",
                x.scalar_type(), " but bias has dtype ", bias->scalar_type());
  }
  TORCH_CHECK(act >= 0 && act < NUM_ACTS, "nnfast_ext: unknown activation code ", act);
  TORCH_CHECK(gated_base(static_cast<int>(act)) < 0 || weight.size(0) % 2 == 0,
              "nnfast_ext::dense_fwd: a gated activation needs a weight with 2 * out_features rows"
              " (gate rows then up rows), got shape ", weight.sizes());
}

}  // namespace nnfast
