"""The GPU selection (make gpu-check runs this file): every activation x dtype x backend on CUDA
at a few shapes, forward and every gradient vs float64, plus the fused MLP and NaN propagation.

Kept small on purpose: each (activation, dtype, flags) is a Triton compilation on the GPU machine,
which has 10 minutes per command. The whole CPU matrix runs in ``make test``. Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch
from test_dense import check_dense

import nnfast
from helpers import make_weight, skip_unsupported
from nnfast.activations import GATED_NAMES, NAMES

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (make gpu-check runs this file)", allow_module_level=True)

BACKENDS = ["triton", "extension", "reference"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (x shape, out_features): odd sizes, a 3-D input, and a transformer feed-forward tile
SHAPES = [((37, 67), 129), ((2, 16, 64), 96), ((256, 512), 1024)]


def _available(backend: str) -> None:
    if backend not in nnfast.available_backends():
        pytest.skip(f"{backend} is not available here")


@pytest.mark.parametrize("activation", [*NAMES, *GATED_NAMES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_cuda(backend, dtype, activation):
    _available(backend)
    skip_unsupported(backend, "cuda", dtype)
    gated = activation in GATED_NAMES
    for x_shape, n in SHAPES:
        x = torch.randn(x_shape, device="cuda").to(dtype)
        w, b = make_weight(2 * n if gated else n, x_shape[-1], dtype, "cuda")
        check_dense(backend, "cuda", activation, dtype, x, w, b)
    # strided input and a strided bias
    x = torch.randn(40, 2 * 64, device="cuda").to(dtype)[:, ::2]
    w, _ = make_weight(2 * 48 if gated else 48, 64, dtype, "cuda")
    b = torch.randn(2 * w.shape[0], device="cuda").to(dtype)[::2]
    check_dense(backend, "cuda", activation, dtype, x, w, b)


@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh", "swiglu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_mlp_cuda(backend, dtype, activation):
    _available(backend)
    skip_unsupported(backend, "cuda", dtype)
    torch.manual_seed(0)
    widths = [32, 64, 64, 16]
    gated = activation in GATED_NAMES
    ws = [
        make_weight(widths[i + 1] * (2 if gated and i < 2 else 1), widths[i], dtype, "cuda")
        for i in range(3)
    ]
    x = torch.randn(300, 32, device="cuda").to(dtype)
    leaves = [t.detach().requires_grad_() for w, b in ws for t in (w, b)]
    ref = [t.detach().double().requires_grad_() for t in leaves]
    out = nnfast.mlp(x, leaves[0::2], leaves[1::2], activation, backend=backend)
    h = x.double()
    spec = nnfast.activations.resolve(activation)
    for i in range(3):
        h = torch.nn.functional.linear(h, ref[2 * i], ref[2 * i + 1])
        h = spec(h) if i < 2 else h
    tol = {torch.float32: 1e-2, torch.float16: 3e-2, torch.bfloat16: 1e-1}[dtype]
    torch.testing.assert_close(out.double(), h, rtol=tol, atol=tol)
    g = torch.randn_like(h)
    out.backward(g.to(dtype))
    h.backward(g)
    for a, r in zip(leaves, ref):
        scale = r.grad.abs().max().item() + 1e-6
        assert (a.grad.double() - r.grad).abs().max().item() <= tol * scale * 4


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "identity"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates_cuda(backend, activation):
    # NaN in, NaN out, as torch gives (cuBLASLt's RELU_BIAS epilogue is not used for that reason)
    _available(backend)
    x = torch.randn(16, 64, device="cuda", dtype=torch.bfloat16)
    x[3, 5] = float("nan")
    w, b = make_weight(64, 64, torch.bfloat16, "cuda")
    out = nnfast.dense(x, w, b, activation, backend=backend)
    want = nnfast.activations.resolve(activation)(torch.nn.functional.linear(x, w, b))
    assert torch.equal(out.isnan(), want.isnan())
