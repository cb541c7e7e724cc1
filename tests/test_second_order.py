"""Second derivatives (create_graph=True) through nnfast.dense, nnfast.mlp, FusedDense and FusedMLP:
gradient penalties, PINNs, SDF eikonal terms. float64 gradgradcheck per activation and backend, on
the eager path and on the custom-op path (the one torch.compile, export and dispatch modes see);
fp32/bf16 first- and second-order results vs the eager MLP under the 2x rule; torch.func."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import nnfast
from helpers import assert_close, backend_devices, eager_mlp_of, skip_unsupported, torch_dense
from nnfast.activations import GATED_NAMES, resolve

BACKENDS = backend_devices()
# the triton backend has no float64 kernels: its second order is checked in float32 below
BACKENDS64 = [p for p in BACKENDS if p.values[0] != "triton"]
ACTIVATIONS = [*nnfast.ACTIVATIONS, "leaky_relu(0.2)", "leaky_relu(-0.3)", *GATED_NAMES]


def _act(name: str):
    """A name, or leaky_relu with an explicit slope (a negative one keeps the pre-activation)."""
    if name.startswith("leaky_relu("):
        return torch.nn.LeakyReLU(float(name[11:-1]))
    return name


class _Passthrough(TorchDispatchMode):
    """Any dispatch mode routes nnfast through its custom ops (as torch.compile does)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


ROUTES = ["eager", "op"]


def _route(route: str):
    return (
        _Passthrough()
        if route == "op"
        else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
    )


def _rows(activation: str, n: int) -> int:
    return 2 * n if activation in GATED_NAMES else n


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("backend,device", BACKENDS64)
def test_dense_gradgradcheck_float64(backend, device, activation, route):
    act = _act(activation)
    x = torch.randn(4, 5, device=device, dtype=torch.float64, requires_grad=True)
    w = torch.randn(_rows(activation, 3), 5, device=device, dtype=torch.float64)
    b = torch.randn(w.shape[0], device=device, dtype=torch.float64)
    w.requires_grad_(), b.requires_grad_()

    def f(x, w, b):
        with _route(route):
            return nnfast.dense(x, w, b, act, backend=backend)

    assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_dense_second_order_float32_vs_pytorch(backend, device, activation, route):
    # every backend, Triton too (it has no float64 kernels): an eikonal-like penalty on the input
    # gradient, differentiated to x, weight and bias; the 2x rule against float64
    skip_unsupported(backend, device, torch.float32)
    act = _act(activation)
    x0 = torch.randn(6, 5, device=device)
    w0 = torch.randn(_rows(activation, 4), 5, device=device) / 2
    b0 = torch.randn(w0.shape[0], device=device) / 4
    results = []
    for fn, dtype in (
        (lambda *a: nnfast.dense(*a, act, backend=backend), torch.float32),
        (lambda *a: torch_dense(*a, act), torch.float32),
        (lambda *a: torch_dense(*a, act), torch.float64),
    ):
        leaves = [t.to(dtype).requires_grad_() for t in (x0, w0, b0)]
        with _route(route):
            y = fn(*leaves)
            (gx,) = torch.autograd.grad(y.square().sum(), leaves[0], create_graph=True)
            penalty = ((gx.square().sum(1) + 1e-3).sqrt() - 1).square().sum()
            grads = torch.autograd.grad(penalty, leaves, allow_unused=True)
        results.append(
            [gx] + [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
        )
    for i, (got, plain, ref) in enumerate(zip(*results)):
        assert_close(got, plain, ref, f"{activation} second-order result {i}")


@pytest.mark.parametrize("checkpoint", [False, True], ids=["saved", "checkpoint"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("backend,device", BACKENDS64)
def test_mlp_gradgradcheck_float64(backend, device, activation, checkpoint):
    act = _act(activation)
    x = torch.randn(4, 3, device=device, dtype=torch.float64, requires_grad=True)
    shapes = [(_rows(activation, 4), 3), (_rows(activation, 5), 4), (2, 5)]
    ws = [torch.randn(s, device=device, dtype=torch.float64, requires_grad=True) for s in shapes]
    b0 = torch.randn(shapes[0][0], device=device, dtype=torch.float64, requires_grad=True)
    b2 = torch.randn(2, device=device, dtype=torch.float64, requires_grad=True)

    def f(x, w0, w1, w2, b0, b2):  # the middle layer without a bias
        return nnfast.mlp(
            x, [w0, w1, w2], [b0, None, b2], act, checkpoint=checkpoint, backend=backend
        )

    assert torch.autograd.gradgradcheck(f, (x, *ws, b0, b2))


def _first_and_second(model, forward, x0, dtype):
    """(y, dy/dx, d penalty / d every parameter) with penalty = eikonal-like term on dy/dx."""
    x = x0.to(dtype).requires_grad_()
    y = forward(model, x)
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    penalty = (gx.float().norm(dim=1) - 1).square().mean()
    params = list(model.parameters())
    grads = torch.autograd.grad(penalty, params, allow_unused=True)  # the last bias: unused
    return [y, gx, *[torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]]


@pytest.mark.parametrize("checkpoint", [False, True], ids=["saved", "checkpoint"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["silu", "tanh", "gelu", "relu", "swiglu"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_fused_mlp_first_and_second_order_vs_eager(
    backend, device, activation, dtype, checkpoint, monkeypatch
):
    skip_unsupported(backend, device, dtype)
    monkeypatch.setenv("NNFAST_BACKEND", backend)
    model = nnfast.FusedMLP(3, [32, 32], 1, activation=activation).to(device)
    ref_model = nnfast.FusedMLP(3, [32, 32], 1, activation=activation).to(device).double()
    ref_model.load_state_dict(model.state_dict())
    plain_model = nnfast.FusedMLP(3, [32, 32], 1, activation=activation).to(device, dtype)
    plain_model.load_state_dict(model.state_dict())
    model = model.to(dtype)
    model.checkpoint = checkpoint
    x0 = torch.rand(64, 3, device=device) * 2 - 1
    got = _first_and_second(model, lambda m, x: m(x), x0, dtype)
    plain = _first_and_second(plain_model, eager_mlp_of, x0, dtype)
    ref = _first_and_second(ref_model, eager_mlp_of, x0, torch.float64)
    for i, (a, p, r) in enumerate(zip(got, plain, ref)):
        assert_close(a, p, r, f"FusedMLP result {i}")


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] != "reference"])
def test_second_order_keeps_the_fused_mlp_forward(backend, device, monkeypatch):
    # the whole-MLP kernel still runs the forward; only the backward goes layer by layer
    be = nnfast._backends.get(backend)
    calls = {"forward": 0, "backward": 0}
    forward, backward = be.mlp_forward, be.mlp_backward

    def counting_forward(*a, **k):
        calls["forward"] += 1
        return forward(*a, **k)

    def counting_backward(*a, **k):
        calls["backward"] += 1
        return backward(*a, **k)

    monkeypatch.setattr(be, "mlp_forward", counting_forward)
    monkeypatch.setattr(be, "mlp_backward", counting_backward)
    monkeypatch.setenv("NNFAST_BACKEND", backend)
    model = nnfast.FusedMLP(2, [16, 16], 1, activation="silu").to(device)
    x = torch.randn(32, 2, device=device, requires_grad=True)
    (gx,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
    assert calls == {"forward": 1, "backward": 0}
    gx.square().sum().backward()
    *reached, last_bias = model.parameters()  # the last bias does not change dy/dx
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in reached)
    # first order alone stays fully fused both ways
    model(x).sum().backward()
    assert calls == {"forward": 2, "backward": 1}


def test_torch_func_second_order_matches_pytorch():
    torch.manual_seed(0)
    model = nnfast.FusedMLP(3, [16, 16], 1, activation="silu")
    x = torch.randn(3)

    def f(x):
        return model(x).squeeze(-1)

    def plain(x):
        return eager_mlp_of(model, x).squeeze(-1)

    for transform in (torch.func.hessian, lambda f: torch.func.jacrev(torch.func.grad(f))):
        torch.testing.assert_close(transform(f)(x), transform(plain)(x))
    xs = torch.randn(5, 3)
    batched = torch.func.vmap(torch.func.grad(f))(xs)
    torch.testing.assert_close(batched, torch.func.vmap(torch.func.grad(plain))(xs))
    lap = torch.func.vmap(lambda x: torch.func.hessian(f)(x).trace())(xs)
    torch.testing.assert_close(
        lap, torch.func.vmap(lambda x: torch.func.hessian(plain)(x).trace())(xs)
    )


@pytest.mark.parametrize("route", ROUTES)
def test_third_order_through_dense(route):
    # the second-order formula is PyTorch ops on the table's f' and f'', so it differentiates again
    # (silu: PyTorch's silu_backward has no derivative; the formula must not use it then)
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def first(x, w, b, act):
        with _route(route):
            y = nnfast.dense(x, w, b, act, backend="reference")  # explicit: the op, not a choice
            return torch.autograd.grad(y.sum(), x, create_graph=True)[0]

    for act in ("gelu", "tanh", "silu", "swiglu"):
        assert torch.autograd.gradgradcheck(lambda x, w, b, act=act: first(x, w, b, act), (x, w, b))


def test_activation_table_second_derivatives():
    # grad2 = d grad / d saved, for every row that has one, vs autograd of grad
    for name in nnfast.ACTIVATIONS:
        for param in (0.0, 0.2, -0.3) if name == "leaky_relu" else (resolve(name).param,):
            spec = type(resolve(name))(resolve(name).act, param)
            pre = torch.linspace(-4, 4, 101, dtype=torch.float64)
            pre = pre[pre.abs() > 1e-3]  # away from the kinks
            saved = (spec(pre) if spec.from_output else pre).requires_grad_()
            grad = spec.grad(saved)
            (want,) = (
                torch.autograd.grad(grad.sum(), saved, allow_unused=True)
                if grad.requires_grad
                else (None,)  # piecewise constant (relu, leaky_relu, identity)
            )
            want = torch.zeros_like(pre) if want is None else want
            got = spec.act.grad2(saved, param) if spec.act.grad2 else torch.zeros_like(pre)
            torch.testing.assert_close(got, want, msg=name)


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("backend,device", BACKENDS64)
def test_second_order_strided_inputs_float64(backend, device, m):
    # transposed x, a transposed weight view, an expanded (stride-0) bias; M = 1 and odd
    for activation in ("gelu", "tanh", "swiglu"):
        rows = _rows(activation, 3)
        x = torch.randn(5, m, device=device, dtype=torch.float64).t().requires_grad_()
        w = torch.randn(5, rows, device=device, dtype=torch.float64).requires_grad_()
        b = torch.randn(1, device=device, dtype=torch.float64).requires_grad_()
        for route in ROUTES:

            def f(x, w, b, route=route, activation=activation, rows=rows):
                with _route(route):
                    return nnfast.dense(x, w.t(), b.expand(rows), activation, backend=backend)

            assert torch.autograd.gradgradcheck(f, (x, w, b)), (activation, route)


@pytest.mark.parametrize("backend,device", BACKENDS64)
def test_second_order_empty_batch(backend, device):
    x = torch.randn(0, 4, device=device, requires_grad=True)
    w = torch.randn(3, 4, device=device, requires_grad=True)
    b = torch.randn(3, device=device, requires_grad=True)
    for fn in (
        lambda: nnfast.dense(x, w, b, "gelu", backend=backend),
        lambda: nnfast.mlp(x, [w, torch.randn(2, 3)], [b, None], "silu", backend=backend),
    ):
        (gx,) = torch.autograd.grad(fn().sum(), x, create_graph=True)
        assert gx.shape == (0, 4)
        gw, gb = torch.autograd.grad(gx.sum(), (w, b), allow_unused=True)
        assert gw is None or (gw == 0).all()
