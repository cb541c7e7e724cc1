"""FusedMLP / mlp(): every activation (gated too), checkpointing, memory held, the gated helper."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nnfast
from helpers import assert_close, backend_devices, eager_mlp, skip_unsupported
from nnfast.activations import GATED_NAMES, resolve


def check_mlp(backend, activation, dtype, device, checkpoint, bias=True, widths=(19, 24, 33, 7)):
    act = resolve(activation)
    mult = 2 if act.is_gated else 1
    shapes = [
        (widths[i + 1] * (mult if i < len(widths) - 2 else 1), widths[i])
        for i in range(len(widths) - 1)
    ]
    ws = [(torch.rand(s, device=device) * 2 - 1) / s[1] ** 0.5 for s in shapes]
    bs = [torch.rand(s[0], device=device) * 0.2 - 0.1 if bias else None for s in shapes]
    x = torch.randn(5, 9, widths[0], device=device)

    def leaves(dt):
        return [
            t.detach().to(dt).requires_grad_() if t is not None else None for t in (x, *ws, *bs)
        ]

    def split(ts):
        n = len(ws)
        return ts[0], ts[1 : 1 + n], ts[1 + n :]

    got_in, plain_in, ref_in = leaves(dtype), leaves(dtype), leaves(torch.float64)
    xa, wa, ba = split(got_in)
    out = nnfast.mlp(xa, wa, ba, activation, checkpoint=checkpoint, backend=backend)
    plain = eager_mlp(*split(plain_in), activation)
    ref = eager_mlp(*split(ref_in), activation)
    assert_close(out, plain, ref, "mlp output")
    g = torch.randn_like(ref)
    params = [t for t in got_in if t is not None]
    got = torch.autograd.grad(out, params, g.to(dtype))
    want = torch.autograd.grad(ref, [t for t in ref_in if t is not None], g)
    base = torch.autograd.grad(plain, [t for t in plain_in if t is not None], g.to(dtype))
    for i, (a, r, p) in enumerate(zip(got, want, base)):
        assert_close(a, p, r, f"mlp grad {i}")


@pytest.mark.parametrize("checkpoint", [False, True], ids=["saved", "checkpoint"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("activation", nnfast.ACTIVATIONS + GATED_NAMES)
@pytest.mark.parametrize("backend,device", backend_devices())
def test_mlp_matches_eager(backend, device, activation, dtype, checkpoint):
    skip_unsupported(backend, device, dtype)
    check_mlp(backend, activation, dtype, device, checkpoint)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_mlp_without_bias_and_single_layer(backend, device):
    check_mlp(backend, "tanh", torch.float32, device, False, bias=False)
    check_mlp(backend, "gelu", torch.float32, device, False, widths=(6, 4))
    check_mlp(backend, nn.LeakyReLU(-0.2), torch.float32, device, False)


def _saved_bytes(fn, exclude) -> int:
    """Bytes autograd keeps for backward, each storage once, not counting ``exclude``'s."""
    seen: dict[int, int] = {}
    skip = {t.untyped_storage().data_ptr() for t in exclude}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


@pytest.mark.parametrize(
    "activation,bound", [("gelu", 0.55), ("silu", 0.55), ("relu", 1.0), ("tanh", 1.0)]
)
def test_memory_held_for_backward(activation, bound, monkeypatch):
    # the fused MLP op's memory (the dispatcher may measure PyTorch's layer-by-layer path faster
    # and take it, which keeps what PyTorch keeps; "fixed" always runs the op)
    monkeypatch.setattr(nnfast._backends.chooser, "_mode", "fixed")
    torch.manual_seed(0)
    fused = nnfast.FusedMLP(64, [128] * 3, 32, activation=activation)
    act = {"gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU, "tanh": nn.Tanh}[activation]
    layers = []
    for i, lin in enumerate(fused.layers):
        eager_lin = nn.Linear(lin.in_features, lin.out_features)
        eager_lin.load_state_dict(lin.state_dict())
        layers += [eager_lin] + ([act()] if i < len(fused.layers) - 1 else [])
    eager = nn.Sequential(*layers)
    x = torch.randn(512, 64)
    fused_held, out = _saved_bytes(lambda: fused(x), [x, *fused.parameters()])
    eager_held, ref = _saved_bytes(lambda: eager(x), [x, *eager.parameters()])
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    ratio = fused_held / eager_held
    assert ratio <= bound, f"{activation}: fused keeps {ratio:.2f}x of eager's activations"
    ckpt = nnfast.FusedMLP(64, [128] * 3, 32, activation=activation, checkpoint=True)
    ckpt.load_state_dict(fused.state_dict())
    ckpt_held, _ = _saved_bytes(lambda: ckpt(x), [x, *ckpt.parameters()])
    assert ckpt_held <= 0.2 * eager_held


def test_from_gated_linears_is_a_llama_feed_forward():
    gate, up, down = nn.Linear(16, 40), nn.Linear(16, 40), nn.Linear(40, 16)
    mlp = nnfast.FusedMLP.from_gated_linears(gate, up, down, activation="swiglu")
    assert mlp.layers[0].weight.shape == (80, 16) and mlp.layers[0].out_features == 40
    x = torch.randn(3, 7, 16)
    want = down(nn.functional.silu(gate(x)) * up(x))
    torch.testing.assert_close(mlp(x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="activation must be gated"):
        nnfast.FusedMLP.from_gated_linears(gate, up, down, activation="silu")
    with pytest.raises(ValueError, match="gate and up of one shape"):
        nnfast.FusedMLP.from_gated_linears(gate, nn.Linear(16, 8), down)


def test_fused_dense_gated_shapes_and_state_dict():
    layer = nnfast.FusedDense(12, 20, activation="geglu")
    assert layer.weight.shape == (40, 12) and layer.out_features == 20
    assert layer(torch.randn(3, 12)).shape == (3, 20)
    lin = nn.Linear(12, 40)
    layer.load_state_dict(lin.state_dict(), strict=True)
    assert nnfast.FusedDense.from_linear(lin, activation="reglu").out_features == 20


def test_mlp_chain_errors_name_the_layer():
    with pytest.raises(ValueError, match=r"mlp\(\): layer 1: x has last dimension 8"):
        nnfast.mlp(torch.randn(2, 4), [torch.randn(8, 4), torch.randn(3, 5)])


def _fused_backend_devices():
    # backends with a fused small-width MLP kernel (Triton; the extension's CPU row-block walk)
    return [p for p in backend_devices() if p.values[0] in ("triton", "extension")]


@pytest.mark.parametrize(
    "widths,batch",
    [
        ((16, 16, 16), 1),
        ((32, 32, 32, 32), 37),
        ((64, 64, 64, 64, 64), 300),
        ((128, 128, 3), 65),
        ((2, 50, 50, 50, 50, 50, 1), 129),  # 6 layers, odd widths, padded to 64
        ((24, 40, 8), 0),
    ],
)
@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh", "squared_relu"])
@pytest.mark.parametrize("backend,device", _fused_backend_devices())
def test_fused_small_mlp_matches_layer_by_layer(
    backend, device, activation, widths, batch, monkeypatch
):
    # the fused kernel is picked automatically for widths <= 128; compare it with the
    # layer-by-layer path (NNFAST_FUSED_MLP=0) and with float64 eager
    torch.manual_seed(batch)
    mlp = nnfast.FusedMLP(widths[0], list(widths[1:-1]), widths[-1], activation=activation)
    mlp = mlp.to(device)
    x = torch.randn(batch, widths[0], device=device)
    results = []
    for fused in ("1", "0"):
        monkeypatch.setenv("NNFAST_FUSED_MLP", fused)
        xs = x.clone().requires_grad_()
        out = nnfast.mlp(
            xs,
            [m.weight for m in mlp.layers],
            [m.bias for m in mlp.layers],
            activation,
            backend=backend,
        )
        params = [xs, *mlp.parameters()]
        g = (
            torch.ones_like(out)
            if batch == 0
            else torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
        )
        results.append((out, *torch.autograd.grad(out, params, g)))
    for fused_t, plain_t in zip(*results):
        assert fused_t.shape == plain_t.shape
        torch.testing.assert_close(fused_t, plain_t, rtol=1e-4, atol=1e-4)
    check_mlp(backend, activation, torch.float32, device, checkpoint=False, widths=widths)


@pytest.mark.parametrize("backend,device", _fused_backend_devices())
def test_fused_small_mlp_float16_and_checkpoint(backend, device):
    for checkpoint in (False, True):
        check_mlp(backend, "silu", torch.float16, device, checkpoint, widths=(64, 64, 64, 64, 10))
        check_mlp(
            backend, "relu", torch.float32, device, checkpoint, bias=False, widths=(16, 128, 16)
        )


@pytest.mark.parametrize("activation", nnfast.ACTIVATIONS)
@pytest.mark.parametrize("backend,device", backend_devices())
def test_mlp_nan_and_inf_propagate(backend, device, activation):
    # the MLP paths run their own activation kernels (fused or not): NaN stays NaN, inf as in torch
    mlp = nnfast.FusedMLP(6, [16, 16], 4, activation=activation).to(device)
    x = torch.randn(40, 6, device=device)
    x[3, 0], x[7, 2] = float("nan"), float("inf")
    with torch.no_grad():
        mlp.layers[0].bias[:3] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    ws, bs = [m.weight for m in mlp.layers], [m.bias for m in mlp.layers]
    out = nnfast.mlp(x.requires_grad_(), ws, bs, activation, backend=backend)
    want = eager_mlp(x.detach(), ws, bs, activation)
    assert torch.equal(out.isnan(), want.isnan())
    finite = want.isfinite()
    torch.testing.assert_close(out[finite], want[finite], rtol=1e-4, atol=1e-4)
