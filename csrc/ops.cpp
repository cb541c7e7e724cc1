// nnfast._C: operator schemas. Device implementations register in cpu/*.cpp and cuda/*.cu;
// fake kernels and autograd live in Python (nnfast/_backends/extension.py, nnfast/_ops.py); the
// Python module itself (the front end's fast path) is fast.cpp.
#include <torch/library.h>

TORCH_LIBRARY(nnfast_ext, m) {
  // x: (M, K) any strides, weight: (N, K), bias: (N,) -> out (M, N), pre (M, N) or (0,).
  // act is the activation table's code; param is leaky_relu's negative_slope.
  m.def(
      "dense_fwd(Tensor x, Tensor weight, Tensor? bias, int act, float param, bool save_pre)"
      " -> (Tensor, Tensor)");
  // saved: the output or the pre-activation (see activations.h grad_reads_output), (0,) for
  // identity. Gradients not needed come back as (0,) tensors.
  m.def(
      "dense_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor saved, int act, float param,"
      " bool needs_x, bool needs_w, bool needs_b) -> (Tensor, Tensor, Tensor)");
  // A whole MLP (act after every layer but the last) walked row block by row block; saved: per
  // hidden layer (M, h_i), its output or pre-activation as in dense_bwd.
  m.def(
      "mlp_fwd(Tensor x, Tensor[] weights, Tensor?[] biases, int act, float param, bool save)"
      " -> (Tensor, Tensor[])");
  m.def(
      "mlp_bwd(Tensor grad_out, Tensor x, Tensor[] weights, bool[] has_bias, Tensor[] saved,"
      " int act, float param, bool needs_x) -> (Tensor, Tensor[], Tensor[])");
}
