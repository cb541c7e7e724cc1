"""Every backend x activation x dtype x bias x shape: forward and all gradients vs float64."""

from __future__ import annotations

import pytest
import torch

import nnfast
from helpers import assert_close, backend_devices, make_weight, skip_unsupported, torch_dense
from nnfast.activations import GATED_NAMES

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _strided(dtype, device):
    # every other column of a wider tensor: row stride 2K, column stride 2
    return torch.randn(13, 2 * 21, device=device).to(dtype)[:, ::2]


def _transposed(dtype, device):
    # column-major (M, K): the kernel reads it through its strides, no copy
    return torch.randn(18, 11, device=device).to(dtype).t()


def _permuted_3d(dtype, device):
    # (4, 5, K) view whose leading dims cannot be flattened without a copy
    return torch.randn(4, 19, 5, device=device).to(dtype).transpose(1, 2)


# name -> (x maker or x shape, out_features)
CASES = {
    "M1": ((1, 33), 17),
    "N1": ((9, 20), 1),
    "K1": ((7, 1), 12),
    "odd": ((37, 67), 129),
    "3d": ((3, 5, 24), 40),
    "4d": ((2, 3, 4, 16), 24),
    "1d": ((19,), 11),
    "strided": (_strided, 23),
    "transposed": (_transposed, 14),
    "permuted3d": (_permuted_3d, 9),
    "empty": ((0, 16), 8),
}


def make_x(case: str, dtype, device) -> torch.Tensor:
    spec, _ = CASES[case]
    if callable(spec):
        return spec(dtype, device)
    return torch.randn(spec, device=device).to(dtype)


def grads(out, inputs, g):
    inputs = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, inputs, g)


def check_dense(backend, device, activation, dtype, x, w, b):
    """Forward and every gradient of nnfast.dense vs plain PyTorch and the float64 reference."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, w, b)]
    leaves64 = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b)]
    leaves_t = [t.detach().requires_grad_() if t is not None else None for t in (x, w, b)]

    out = nnfast.dense(*leaves, activation, backend=backend)
    ref = torch_dense(*leaves64, activation)
    same = torch_dense(*leaves_t, activation)
    assert_close(out, same, ref, "output")
    if out.numel() == 0 and x.numel() != 0:
        return
    g = torch.randn_like(ref)
    got = grads(out, leaves, g.to(dtype))
    want = grads(ref, leaves64, g)
    plain = grads(same, leaves_t, g.to(dtype))
    for name, a, r, p in zip(("grad_x", "grad_weight", "grad_bias"), got, want, plain):
        assert_close(a, p, r, name)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", nnfast.ACTIVATIONS)
@pytest.mark.parametrize("backend,device", backend_devices())
def test_dense_matches_reference(backend, device, activation, dtype, bias, case):
    skip_unsupported(backend, device, dtype)
    x = make_x(case, dtype, device)
    w, b = make_weight(CASES[case][1], x.shape[-1], dtype, device, bias)
    check_dense(backend, device, activation, dtype, x, w, b)


@pytest.mark.parametrize("case", ["M1", "N1", "odd", "3d", "transposed", "empty"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", GATED_NAMES)
@pytest.mark.parametrize("backend,device", backend_devices())
def test_gated_matches_reference(backend, device, activation, dtype, bias, case):
    # weight (2N, K): gate rows then up rows; y = base(x W_g^T + b_g) * (x W_u^T + b_u)
    skip_unsupported(backend, device, dtype)
    x = make_x(case, dtype, device)
    w, b = make_weight(2 * CASES[case][1], x.shape[-1], dtype, device, bias)
    check_dense(backend, device, activation, dtype, x, w, b)


@pytest.mark.parametrize("which", ["x", "weight", "bias", "weight+bias", "x+bias"])
@pytest.mark.parametrize("backend,device", backend_devices())
def test_only_requested_gradients(backend, device, which):
    x = torch.randn(21, 10, device=device)
    w, b = make_weight(15, 10, torch.float32, device)
    want = set(which.split("+"))
    xs = x.requires_grad_("x" in want)
    ws = w.requires_grad_("weight" in want)
    bs = b.requires_grad_("bias" in want)
    out = nnfast.dense(xs, ws, bs, "silu", backend=backend)
    g = torch.randn_like(out)
    out.backward(g)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = torch_dense(x64, w64, b64, "silu")
    ref.backward(g.double())
    for name, t, t64 in (("x", xs, x64), ("weight", ws, w64), ("bias", bs, b64)):
        assert (t.grad is not None) == (name in want), f"{name}.grad presence"
        if t.grad is not None:
            assert_close(t.grad, t64.grad.float(), t64.grad, f"grad {name}")


@pytest.mark.parametrize("backend,device", backend_devices())
def test_empty_batch_gives_zero_parameter_grads(backend, device):
    x = torch.randn(0, 3, 16, device=device, requires_grad=True)
    w, b = make_weight(8, 16, torch.float32, device)
    w.requires_grad_()
    b.requires_grad_()
    out = nnfast.dense(x, w, b, "gelu", backend=backend)
    assert out.shape == (0, 3, 8)
    out.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))
    assert torch.equal(b.grad, torch.zeros_like(b))
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("activation", nnfast.ACTIVATIONS)
@pytest.mark.parametrize("backend,device", backend_devices())
def test_nan_and_inf_propagate_like_reference(backend, device, activation, train):
    # inference and training forwards take different kernels (the latter stores pre-activations)
    x = torch.randn(6, 12, device=device)
    x[1, 3] = float("nan")
    x[4, 0] = float("inf")
    w, b = make_weight(10, 12, torch.float32, device)
    b[:3] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    out = nnfast.dense(x, w, b.requires_grad_(train), activation, backend=backend)
    same = torch_dense(x, w, b, activation)
    ref = torch_dense(x.double(), w.double(), b.double(), activation)

    # Each non-finite result must match PyTorch in this dtype or in float64: they disagree at
    # times (float32 F.gelu(inf) is NaN, float64 gives inf).
    def kind(t):
        return torch.where(t.isnan(), 2.0, torch.where(t.isinf(), t.sign().double(), 0.0))

    ok = (kind(out) == kind(same)) | (kind(out) == kind(ref))
    assert ok.all(), f"non-finite results differ at {ok.logical_not().nonzero().tolist()}"
    finite = same.isfinite() & ref.isfinite()
    assert_close(out[finite], same[finite], ref[finite], "finite part")


@pytest.mark.parametrize("backend,device", backend_devices())
def test_leaky_relu_slopes(backend, device):
    # a custom slope, a zero slope and a negative slope (whose backward reads the pre-activation)
    for slope in (0.2, 0.0, -0.3):
        x = torch.randn(17, 9, device=device)
        w, b = make_weight(13, 9, torch.float32, device)
        check_dense(backend, device, torch.nn.LeakyReLU(slope), torch.float32, x, w, b)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_float64_gradcheck(backend, device):
    if backend == "triton":  # no float64 kernels: an explicit request must say so
        x = torch.randn(5, 4, device=device, dtype=torch.float64)
        with pytest.raises(RuntimeError, match="float64"):
            nnfast.dense(x, torch.randn_like(x[:3]), backend=backend)
        return
    for activation in nnfast.ACTIVATIONS:
        x = torch.randn(5, 4, device=device, dtype=torch.float64, requires_grad=True)
        w = torch.randn(3, 4, device=device, dtype=torch.float64, requires_grad=True)
        b = torch.randn(3, device=device, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda x, w, b, a=activation: nnfast.dense(x, w, b, a, backend=backend), (x, w, b)
        ), activation


def test_autocast_casts_like_linear():
    x = torch.randn(8, 16)
    w, b = make_weight(4, 16, torch.float32, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = nnfast.dense(x, w, b, "relu")
        want = torch.nn.functional.linear(x, w, b)
    assert out.dtype == want.dtype == torch.bfloat16
    ref = torch_dense(x.double(), w.double(), b.double(), "relu")
    assert_close(out, torch.relu(want), ref, "autocast output")


@pytest.mark.parametrize("case", ["odd", "transposed", "M1"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", nnfast.ACTIVATIONS)
@pytest.mark.parametrize("backend,device", backend_devices())
def test_inference_matches_reference(backend, device, activation, dtype, case):
    # no gradient needed: the forward stores no pre-activation (and may take other fast paths)
    skip_unsupported(backend, device, dtype)
    x = make_x(case, dtype, device)
    w, b = make_weight(CASES[case][1], x.shape[-1], dtype, device)
    with torch.no_grad():
        out = nnfast.dense(x, w, b, activation, backend=backend)
    ref = torch_dense(x.double(), w.double(), b.double(), activation)
    assert_close(out, torch_dense(x, w, b, activation), ref, "inference output")
