"""The custom ops: opcheck, and torch.compile(fullgraph=True) through modules, forward+backward."""

from __future__ import annotations

import pytest
import torch

import nnfast
from helpers import assert_close, backend_devices

OPS = torch.ops.nnfast


def _fwd_samples(device, backend):
    for act, param in (("gelu", 0.0), ("relu", 0.0), ("leaky_relu", -0.1), ("identity", 0.0)):
        for has_bias in (True, False):
            for save in (True, False):  # save_pre=False is the inference contract: no grads
                x = torch.randn(9, 13, device=device, requires_grad=save)
                w = torch.randn(7, 13, device=device, requires_grad=save)
                b = torch.randn(7, device=device, requires_grad=save) if has_bias else None
                yield (x, w, b, act, param, save, backend)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_opcheck_dense_fwd(backend, device):
    for args in _fwd_samples(device, backend):
        torch.library.opcheck(OPS.dense_fwd.default, args)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_opcheck_dense_bwd(backend, device):
    for act, from_output in (("gelu", False), ("tanh", True), ("identity", True)):
        for needs in ((True, True, True), (True, False, False), (False, True, True)):
            go = torch.randn(9, 7, device=device)
            x = torch.randn(9, 13, device=device)
            w = torch.randn(7, 13, device=device)
            saved = torch.randn(9, 7, device=device) if act != "identity" else go.new_empty(0)
            if from_output:
                saved = saved.tanh()
            torch.library.opcheck(
                OPS.dense_bwd.default, (go, x, w, saved, act, 0.0, *needs, backend)
            )


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend,device", backend_devices())
def test_compile_fullgraph_forward_backward(backend, device, compiler, monkeypatch):
    monkeypatch.setenv("NNFAST_BACKEND", backend)
    torch._dynamo.reset()
    mlp = nnfast.FusedMLP(12, [16, 16], 5, activation="gelu", device=device)
    layer = nnfast.FusedDense(5, 3, activation="sigmoid", device=device)
    model = torch.nn.Sequential(mlp, layer)
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    x = torch.randn(6, 12, device=device)
    out = compiled(x)
    eager = model(x)
    g = torch.randn_like(out)
    (gw_c,) = torch.autograd.grad(out, [mlp.layers[0].weight], g)
    (gw_e,) = torch.autograd.grad(eager, [mlp.layers[0].weight], g)
    model64 = torch.nn.Sequential(
        nnfast.FusedMLP(12, [16, 16], 5, activation="gelu", device=device),
        nnfast.FusedDense(5, 3, activation="sigmoid", device=device),
    ).double()
    model64.load_state_dict(model.state_dict())
    monkeypatch.setenv("NNFAST_BACKEND", "reference")
    ref = model64(x.double())
    (gw_r,) = torch.autograd.grad(ref, [model64[0].layers[0].weight], g.double())
    assert_close(out, eager, ref, "compiled output")
    assert_close(gw_c, gw_e, gw_r, "compiled grad_w")
