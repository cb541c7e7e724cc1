"""FusedDense as a drop-in nn.Linear, and FusedMLP."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nnfast
from helpers import assert_close, backend_devices


def test_fused_dense_is_a_linear_with_linear_init():
    torch.manual_seed(3)
    lin = nn.Linear(20, 30)
    torch.manual_seed(3)
    fused = nnfast.FusedDense(20, 30, activation="relu")
    assert isinstance(fused, nn.Linear)
    assert torch.equal(lin.weight, fused.weight) and torch.equal(lin.bias, fused.bias)
    assert list(fused.state_dict()) == list(lin.state_dict())


def test_state_dict_round_trip_with_linear():
    lin = nn.Linear(12, 7, bias=True)
    fused = nnfast.FusedDense(12, 7, activation="gelu")
    fused.load_state_dict(lin.state_dict(), strict=True)
    assert torch.equal(fused.weight, lin.weight)
    back = nn.Linear(12, 7)
    back.load_state_dict(fused.state_dict(), strict=True)
    assert torch.equal(back.bias, lin.bias)


def test_no_bias_and_dtype_device_arguments():
    fused = nnfast.FusedDense(5, 6, bias=False, activation=None, dtype=torch.float64, device="cpu")
    assert fused.bias is None and fused.weight.dtype == torch.float64
    x = torch.randn(3, 5, dtype=torch.float64)
    assert torch.allclose(fused(x), x @ fused.weight.T)


def test_extra_repr_shows_activation():
    text = repr(nnfast.FusedDense(4, 5, activation=nn.LeakyReLU(0.2)))
    assert "in_features=4, out_features=5, bias=True" in text
    assert "activation=leaky_relu(negative_slope=0.2)" in text
    assert "activation=gelu_tanh" in repr(nnfast.FusedDense(4, 5, activation="gelu_tanh"))


@pytest.mark.parametrize("backend,device", backend_devices())
def test_from_linear_matches_linear_then_activation(backend, device, monkeypatch):
    monkeypatch.setenv("NNFAST_BACKEND", backend)
    lin = nn.Linear(24, 40, device=device)
    fused = nnfast.FusedDense.from_linear(lin, activation=nn.GELU(approximate="tanh"))
    assert fused.weight is not lin.weight and torch.equal(fused.weight, lin.weight)
    x = torch.randn(3, 9, 24, device=device)
    lin64 = nn.Linear(24, 40).double().to(device)
    lin64.load_state_dict(lin.state_dict())
    ref = nn.functional.gelu(lin64(x.double()), approximate="tanh")
    assert_close(fused(x), nn.functional.gelu(lin(x), approximate="tanh"), ref, "from_linear")


def test_from_linear_rejects_other_modules():
    with pytest.raises(TypeError, match="expected an nn.Linear, got Conv1d"):
        nnfast.FusedDense.from_linear(nn.Conv1d(2, 3, 1))


@pytest.mark.parametrize("backend,device", backend_devices())
def test_fused_mlp_matches_sequential(backend, device, monkeypatch):
    monkeypatch.setenv("NNFAST_BACKEND", backend)
    mlp = nnfast.FusedMLP(10, [32, 16], 3, activation="silu", device=device)
    assert len(mlp.layers) == 3 and all(isinstance(m, nn.Linear) for m in mlp.layers)
    assert [m.activation.name for m in mlp.layers] == ["silu", "silu", "identity"]
    seq = nn.Sequential(
        nn.Linear(10, 32), nn.SiLU(), nn.Linear(32, 16), nn.SiLU(), nn.Linear(16, 3)
    ).to(device)
    for lin, fused in zip([seq[0], seq[2], seq[4]], mlp.layers):
        lin.load_state_dict(fused.state_dict())
    seq64 = (
        nn.Sequential(nn.Linear(10, 32), nn.SiLU(), nn.Linear(32, 16), nn.SiLU(), nn.Linear(16, 3))
        .double()
        .to(device)
    )
    seq64.load_state_dict(seq.state_dict())
    x = torch.randn(7, 10, device=device)
    out, plain, ref = mlp(x), seq(x), seq64(x.double())
    assert_close(out, plain, ref, "mlp output")
    g = torch.randn_like(ref)
    out.backward(g.float())
    plain.backward(g.float())
    ref.backward(g)
    for fused, lin, lin64 in zip(
        mlp.layers, [seq[0], seq[2], seq[4]], [seq64[0], seq64[2], seq64[4]]
    ):
        assert_close(fused.weight.grad, lin.weight.grad, lin64.weight.grad, "mlp grad_w")
        assert_close(fused.bias.grad, lin.bias.grad, lin64.bias.grad, "mlp grad_b")


def test_functional_mlp_matches_module():
    mlp = nnfast.FusedMLP(6, [8], 2, activation="tanh", bias=False)
    x = torch.randn(4, 6)
    out = nnfast.mlp(x, [m.weight for m in mlp.layers], None, "tanh")
    assert torch.equal(out, mlp(x))
