"""Inputs a user can legally pass that once gave wrong numbers or crashed, one test per defect.

Strided and expanded biases, long bias reductions, forward-mode AD and torch.func, in_features=0,
pickling, mixed None/tensor biases, anything that wraps a FusedMLP layer, and tanh near 0.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import nnfast
from helpers import assert_close, backend_devices, make_weight, torch_dense

BACKENDS = backend_devices()


def _check(backend, device, x, w, b, activation, train: bool) -> None:
    """nnfast.dense vs plain PyTorch and float64, forward and (when train) every gradient."""
    leaves = [t.detach().requires_grad_(train) if t is not None else None for t in (x, w, b)]
    plain = [t.detach().requires_grad_(train) if t is not None else None for t in (x, w, b)]
    ref = [t.detach().double().requires_grad_(train) if t is not None else None for t in (x, w, b)]
    out = nnfast.dense(*leaves, activation, backend=backend)
    same = torch_dense(*plain, activation)
    want = torch_dense(*ref, activation)
    assert_close(out, same, want, f"{activation} output")
    if not train:
        return
    g = torch.randn_like(want)
    got = torch.autograd.grad(out, [t for t in leaves if t is not None], g.to(out.dtype))
    exp = torch.autograd.grad(want, [t for t in ref if t is not None], g)
    pt = torch.autograd.grad(same, [t for t in plain if t is not None], g.to(out.dtype))
    for name, a, p, r in zip(("grad_x", "grad_w", "grad_b"), got, pt, exp):
        assert_close(a, p, r, f"{activation} {name}")


def _bias_views(n: int, device) -> dict:
    return {
        "strided": torch.randn(2 * n, device=device)[::2],
        "offset": torch.randn(n + 5, device=device)[5:],
        "expanded": torch.randn(1, device=device).expand(n),
        "reversed": torch.randn(n, device=device).flip(0),  # a copy (flip), kept for coverage
    }


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("activation", ["gelu", "identity", "sigmoid", "tanh", "swiglu"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_bias_views(backend, device, activation, train):
    rows = 48 if activation == "swiglu" else 24
    x = torch.randn(5, 8, device=device)
    w, _ = make_weight(rows, 8, torch.float32, device)
    for kind, b in _bias_views(rows, device).items():
        assert b.shape == (rows,), kind
        _check(backend, device, x, w, b, activation, train)


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] != "triton"])
def test_expanded_bias_wide(backend, device):
    # a stride-0 bias over a million outputs once read out of bounds (segfault)
    n = 1_000_000
    x = torch.randn(2, 3, device=device)
    w = torch.randn(n, 3, device=device)
    b = torch.randn(1, device=device).expand(n)
    out = nnfast.dense(x, w, b, "gelu", backend=backend)
    torch.testing.assert_close(out, F.gelu(F.linear(x, w, b)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_mlp_bias_views(backend, device):
    x = torch.randn(6, 8, device=device)
    ws = [make_weight(n, k, torch.float32, device)[0] for n, k in ((16, 8), (16, 16), (4, 16))]
    bs = [
        _bias_views(w.shape[0], device)[kind]
        for w, kind in zip(ws, ("strided", "expanded", "offset"))
    ]
    out = nnfast.mlp(x, ws, bs, "gelu", backend=backend)
    ref = x.double()
    for i, (w, b) in enumerate(zip(ws, bs)):
        ref = F.linear(ref, w.double(), b.double())
        ref = F.gelu(ref) if i < 2 else ref
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("activation", ["identity", "gelu", "swiglu"])
@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] != "triton"])
def test_bias_grad_long_batch(backend, device, activation):
    # a float32 running sum over 1e6 rows was 0.6% off; the error must not grow with M
    m, n = 1_000_000, 2 if activation == "swiglu" else 1
    x = torch.randn(m, 3, device=device)
    w = torch.randn(n, 3, device=device)
    b = torch.zeros(n, device=device, requires_grad=True)
    b64 = b.detach().double().requires_grad_()
    bt = b.detach().clone().requires_grad_()
    g = torch.rand(m, n // 2 if activation == "swiglu" else n, device=device) / m
    nnfast.dense(x, w, b, activation, backend=backend).backward(g)
    torch_dense(x.double(), w.double(), b64, activation).backward(g.double())
    torch_dense(x, w, bt, activation).backward(g)
    assert_close(b.grad, bt.grad, b64.grad, "grad_bias")
    rel = ((b.grad.double() - b64.grad).abs().max() / b64.grad.abs().max()).item()
    assert rel < 1e-5


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] != "triton"])
def test_mlp_bias_grad_long_batch(backend, device):
    m = 600_000
    x = torch.randn(m, 4, device=device)
    ws = [torch.randn(8, 4, device=device), torch.randn(2, 8, device=device)]
    bs = [
        torch.zeros(8, device=device, requires_grad=True),
        torch.zeros(2, device=device, requires_grad=True),
    ]
    g = torch.rand(m, 2, device=device) / m
    nnfast.mlp(x, ws, bs, "relu", backend=backend).backward(g)
    bs64 = [b.detach().double().requires_grad_() for b in bs]
    h = F.relu(F.linear(x.double(), ws[0].double(), bs64[0]))
    F.linear(h, ws[1].double(), bs64[1]).backward(g.double())
    for b, r in zip(bs, bs64):
        rel = ((b.grad.double() - r.grad).abs().max() / r.grad.abs().max()).item()
        assert rel < 1e-5


# ---- forward-mode AD and torch.func ---------------------------------------------------------------


@pytest.mark.parametrize("activation", ["gelu", "relu", "tanh", "swiglu"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_forward_mode_ad(backend, device, activation):
    rows = 12 if activation == "swiglu" else 6
    x = torch.randn(
        4, 5, device=device, dtype=torch.float64 if backend != "triton" else torch.float32
    )
    w, b = make_weight(rows, 5, x.dtype, device)
    tx, tw, tb = torch.randn_like(x), torch.randn_like(w), torch.randn_like(b)

    def f(x, w, b):
        return nnfast.dense(x, w, b, activation, backend=backend)

    out, tan = torch.func.jvp(f, (x, w, b), (tx, tw, tb))
    out_r, tan_r = torch.func.jvp(lambda *a: torch_dense(*a, activation), (x, w, b), (tx, tw, tb))
    torch.testing.assert_close(out, out_r)
    torch.testing.assert_close(tan, tan_r)
    assert tan.abs().max() > 0
    # the autograd.forward_ad API too
    import torch.autograd.forward_ad as fwAD

    _, want = torch.func.jvp(lambda x: torch_dense(x, w, b, activation), (x,), (tx,))
    with fwAD.dual_level():
        y = f(fwAD.make_dual(x, tx), w, b)
        torch.testing.assert_close(fwAD.unpack_dual(y).tangent, want)
    # jacfwd / jacrev / grad / vmap
    jf = torch.func.jacfwd(f)(x, w, b)
    jr = torch.func.jacrev(f)(x, w, b)
    jref = torch.func.jacrev(lambda *a: torch_dense(*a, activation))(x, w, b)
    torch.testing.assert_close(jf, jref)
    torch.testing.assert_close(jr, jref)
    gx = torch.func.grad(lambda x: f(x, w, b).square().sum())(x)
    gref = torch.func.grad(lambda x: torch_dense(x, w, b, activation).square().sum())(x)
    torch.testing.assert_close(gx, gref)
    batched = torch.func.vmap(f, in_dims=(0, None, None))(x.unsqueeze(1).expand(4, 3, 5), w, b)
    torch.testing.assert_close(
        batched, torch_dense(x, w, b, activation).unsqueeze(1).expand_as(batched)
    )


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_forward_mode_ad_mlp_and_modules(backend, device, monkeypatch):
    monkeypatch.setenv("NNFAST_BACKEND", backend)
    torch.manual_seed(0)
    mlp = nnfast.FusedMLP(3, [8, 8], 2, activation="tanh", device=device)
    x = torch.randn(5, 3, device=device)
    t = torch.randn_like(x)

    def eager(x):
        h = x
        for i, layer in enumerate(mlp.layers):
            h = F.linear(h, layer.weight, layer.bias)
            h = torch.tanh(h) if i < 2 else h
        return h

    _, tan = torch.func.jvp(mlp, (x,), (t,))
    _, tan_r = torch.func.jvp(eager, (x,), (t,))
    torch.testing.assert_close(tan, tan_r, rtol=1e-4, atol=1e-5)
    jac = torch.func.jacrev(mlp)(x[0])
    torch.testing.assert_close(jac, torch.func.jacrev(eager)(x[0]), rtol=1e-4, atol=1e-5)
    layer = nnfast.FusedDense(3, 4, activation="silu", device=device)
    _, tan = torch.func.jvp(layer, (x,), (t,))
    _, tan_r = torch.func.jvp(lambda x: F.silu(F.linear(x, layer.weight, layer.bias)), (x,), (t,))
    torch.testing.assert_close(tan, tan_r, rtol=1e-4, atol=1e-5)


# ---- in_features = 0 -----------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["gelu", "identity", "swiglu"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_in_features_zero(backend, device, activation):
    rows = 10 if activation == "swiglu" else 5
    for bias in (True, False):
        x = torch.randn(3, 0, device=device, requires_grad=True)
        w = torch.randn(rows, 0, device=device, requires_grad=True)
        b = torch.randn(rows, device=device, requires_grad=True) if bias else None
        out = nnfast.dense(x, w, b, activation, backend=backend)
        want = torch_dense(x, w, b, activation)
        torch.testing.assert_close(out, want)
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, [t for t in (x, w, b) if t is not None], g)
        exp = torch.autograd.grad(want, [t for t in (x, w, b) if t is not None], g)
        for a, e in zip(got, exp):
            assert a.shape == e.shape
            torch.testing.assert_close(a, e)


def test_in_features_zero_modules():
    layer = nnfast.FusedDense(0, 5, activation="relu")
    x = torch.randn(4, 0)
    torch.testing.assert_close(layer(x), F.relu(layer.bias).expand(4, 5))
    layer(x).sum().backward()
    torch.testing.assert_close(layer.bias.grad, 4 * (layer.bias > 0).float())
    mlp = nnfast.FusedMLP(0, [6], 2, activation="gelu")
    out = mlp(torch.randn(3, 0))
    h = F.gelu(mlp.layers[0].bias)
    torch.testing.assert_close(
        out, F.linear(h, mlp.layers[1].weight, mlp.layers[1].bias).expand(3, 2)
    )


# ---- pickling and copying ------------------------------------------------------------------------


def test_modules_pickle_and_deepcopy():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        nnfast.FusedDense(4, 8, activation=torch.nn.LeakyReLU(0.2)),
        nnfast.FusedMLP(8, [16], 3, activation="swiglu"),
    )
    x = torch.randn(5, 4)
    want = model(x)
    for clone in (
        pickle.loads(pickle.dumps(model)),
        copy.deepcopy(model),
    ):
        torch.testing.assert_close(clone(x), want)
        assert clone[0].activation.param == pytest.approx(0.2)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    torch.testing.assert_close(loaded(x), want)


# ---- mixed None / tensor biases ------------------------------------------------------------------


@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_mlp_mixed_biases(backend, device, checkpoint):
    ws = [
        torch.randn(6, 4, device=device),
        torch.randn(6, 6, device=device),
        torch.randn(3, 6, device=device),
    ]
    for pattern in ((True, None, True), (None, True, None), (True, True, None)):
        bs = [torch.randn(w.shape[0], device=device) if p else None for w, p in zip(ws, pattern)]
        leaves = (
            [t.clone().requires_grad_() for t in ws],
            [b.clone().requires_grad_() if b is not None else None for b in bs],
        )
        ref = (
            [t.double().requires_grad_() for t in ws],
            [b.double().requires_grad_() if b is not None else None for b in bs],
        )
        x = torch.randn(7, 4, device=device)
        out = nnfast.mlp(x, *leaves, "silu", checkpoint=checkpoint, backend=backend)
        h = x.double()
        for i, (w, b) in enumerate(zip(*ref)):
            h = F.linear(h, w, b)
            h = F.silu(h) if i < 2 else h
        torch.testing.assert_close(out.double(), h, rtol=1e-4, atol=1e-5)
        g = torch.randn_like(h)
        out.backward(g.to(out.dtype))
        h.backward(g)
        for a, r in zip(leaves[0] + leaves[1], ref[0] + ref[1]):
            if r is None:
                continue
            assert a.grad is not None
            torch.testing.assert_close(a.grad.double(), r.grad, rtol=1e-4, atol=1e-5)


# ---- FusedMLP layers that something wraps ---------------------------------------------------------


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_fused_mlp_stays_fused_unless_wrapped():
    torch.manual_seed(0)
    mlp = nnfast.FusedMLP(4, [8, 8], 2, activation="relu")
    x = torch.randn(3, 4)
    want = mlp(x)
    with _OpLog() as log:
        mlp(x)
    assert "nnfast.mlp_fwd" in log.ops and "nnfast.dense_fwd" not in log.ops

    seen = []
    handle = mlp.layers[1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with _OpLog() as log:
        out = mlp(x)
    assert seen == [torch.Size([3, 8])]
    assert "nnfast.mlp_fwd" not in log.ops and log.ops.count("nnfast.dense_fwd") == 3
    torch.testing.assert_close(out, want)
    handle.remove()

    # a hook that changes the output is honoured
    handle = mlp.layers[0].register_forward_hook(lambda m, i, o: o * 0 + 1)
    h = torch.ones(3, 8)
    h = F.relu(F.linear(h, mlp.layers[1].weight, mlp.layers[1].bias))
    torch.testing.assert_close(mlp(x), F.linear(h, mlp.layers[2].weight, mlp.layers[2].bias))
    handle.remove()

    # pre-hooks, backward hooks and parametrizations count as wrappers too
    grads = []
    handle = mlp.layers[2].register_full_backward_hook(lambda m, gi, go: grads.append(go[0].shape))
    mlp(x.requires_grad_()).sum().backward()
    assert grads == [torch.Size([3, 2])]
    handle.remove()
    torch.nn.utils.parametrize.register_parametrization(mlp.layers[0], "weight", _Double())
    h = F.relu(F.linear(x, 2 * mlp.layers[0].parametrizations.weight.original, mlp.layers[0].bias))
    h = F.relu(F.linear(h, mlp.layers[1].weight, mlp.layers[1].bias))
    torch.testing.assert_close(mlp(x), F.linear(h, mlp.layers[2].weight, mlp.layers[2].bias))

    mlp2 = nnfast.FusedMLP(4, [8], 2, activation="gelu", checkpoint=True)
    mlp2.layers[0].register_forward_pre_hook(lambda m, i: None)
    x2 = torch.randn(3, 4, requires_grad=True)
    mlp2(x2).sum().backward()
    assert x2.grad is not None and x2.grad.abs().sum() > 0


class _Double(torch.nn.Module):
    def forward(self, w):
        return 2 * w


# ---- tanh near zero -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_tanh_small_inputs_relative_precision(backend, device):
    vals = torch.tensor(
        [1e-8, -2e-6, 3e-7, 1e-4, -0.01, 0.2, 0.24, 0.26, -0.3, 0.7, 3.0, 12.0, -30.0]
    )
    x = vals.to(device).reshape(-1, 1).repeat(1, 4)
    w = torch.eye(4, device=device)
    for act in ("tanh", "gelu_tanh"):
        # gelu_tanh far below 0 is below float32's range in relative terms (PyTorch gives 0 too)
        xs = x if act == "tanh" else x[x[:, 0].abs() < 1]
        want = torch_dense(xs.double(), w.double(), None, act)
        out = nnfast.dense(xs, w, None, act, backend=backend)
        rel = ((out.double() - want).abs() / want.abs()).max().item()
        assert rel < 1e-6, (act, rel)
    # the fused MLP paths (identity last layer) and layer by layer
    for width in (4, 300):
        eye = torch.eye(width, 4, device=device)
        xw = x if width == 4 else x
        out = nnfast.mlp(
            xw, [eye, torch.eye(4, width, device=device)], None, "tanh", backend=backend
        )
        want = torch.tanh(x.double())
        rel = ((out.double() - want).abs() / want.abs()).max().item()
        assert rel < 1e-6, (width, rel)


@pytest.mark.parametrize("activation", ["tanh", "gelu", "swiglu"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_double_backward_matches_pytorch(backend, device, activation):
    # once_differentiable used to drop the second-order terms silently here
    rows = 10 if activation == "swiglu" else 5
    x0, w0 = torch.randn(3, 4, device=device), torch.randn(rows, 4, device=device) / 2
    results = []
    for fn in (
        lambda x, w: nnfast.dense(x, w, None, activation, backend=backend),
        lambda x, w: torch_dense(x, w, None, activation),
    ):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        (gx,) = torch.autograd.grad(fn(x, w).square().sum(), x, create_graph=True)
        (gx * w.sum()).sum().backward()  # penalty-like: through gx to x and w
        results.append((x.grad, w.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("activation", [*nnfast.ACTIVATIONS, "swiglu", "geglu", "reglu"])
@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] != "triton"])
def test_dense_second_derivatives_float64(backend, device, activation):
    # gradients of gradients through the eager path (gradient penalties, PINNs, SDFs)
    rows = 6 if activation in ("swiglu", "geglu", "reglu") else 3
    x = torch.randn(4, 5, device=device, dtype=torch.float64, requires_grad=True)
    w = torch.randn(rows, 5, device=device, dtype=torch.float64, requires_grad=True)
    b = torch.randn(rows, device=device, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return nnfast.dense(x, w, b, activation, backend=backend)

    assert torch.autograd.gradgradcheck(f, (x, w, b))
