"""Shared test helpers: the tolerance rule, input makers, and the backend/device matrix."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import nnfast
from nnfast.activations import resolve

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICES = ["cpu", "cuda"] if CUDA else ["cpu"]

# Floor added to the tolerance rule, per dtype, relative to the result's magnitude (about four
# units in the last place for the 16-bit dtypes): covers results where plain PyTorch happens to be exact (K=1, M=1) or
# lucky (a reduction whose rounding errors cancel) and the fused kernel rounds once differently.
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def backend_devices() -> list:
    """(backend, device) pairs to test: every available backend on every device it runs."""
    pairs = []
    for name in nnfast._backends.NAMES:
        if name not in nnfast.available_backends():
            continue
        for device in DEVICES:
            if name == "triton" and device == "cpu" and not INTERPRET:
                continue
            if name == "triton" and device == "cuda" and INTERPRET:
                continue
            pairs.append(pytest.param(name, device, id=f"{name}-{device}"))
    return pairs


def skip_unsupported(backend: str, device: str, dtype: torch.dtype) -> None:
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip(
            "Triton interpreter multiplies the raw bits of bfloat16 tl.dot operands"
            " (triton-lang/triton#11584); bfloat16 Triton is covered by CUDA runs"
        )
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend has no float64 kernels")


def max_err(a: Tensor, ref: Tensor) -> float:
    """Largest |a - ref| in float64; NaN anywhere makes it NaN (and so fail any comparison)."""
    if a.numel() == 0:
        return 0.0
    return (a.double() - ref.double()).abs().max().item()


def assert_close(actual: Tensor, same_dtype: Tensor, ref64: Tensor, what: str = "") -> None:
    """The tolerance rule: error vs the float64 reference <= 2x plain PyTorch's error + a floor."""
    assert actual.shape == ref64.shape, (
        f"{what}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    )
    assert actual.dtype == same_dtype.dtype, f"{what}: dtype {actual.dtype} != {same_dtype.dtype}"
    err = max_err(actual, ref64)
    base = max_err(same_dtype, ref64)
    scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    bound = 2 * base + FLOOR[actual.dtype] * scale
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g} (PyTorch's own: {base:.3g})"


def torch_dense(x: Tensor, w: Tensor, b: Tensor | None, activation) -> Tensor:
    """Plain PyTorch: F.linear then the activation, in the inputs' dtype."""
    return resolve(activation)(F.linear(x, w, b))


def make_weight(n: int, k: int, dtype, device, bias: bool = True):
    """nn.Linear-like random parameters (uniform +-1/sqrt(k)), never zeros."""
    bound = 1.0 / max(k, 1) ** 0.5
    w = (torch.rand(n, k, device=device) * 2 - 1) * bound
    b = (torch.rand(n, device=device) * 2 - 1) * bound if bias else None
    return w.to(dtype), (b.to(dtype) if b is not None else None)


def eager_mlp(x, weights, biases, activation):
    """Plain PyTorch: F.linear and the activation, layer by layer."""
    act = resolve(activation)
    for i, (w, b) in enumerate(zip(weights, biases)):
        x = F.linear(x, w, b)
        if i < len(weights) - 1:
            x = act(x)
    return x


def eager_mlp_of(model, x: Tensor) -> Tensor:
    """A FusedMLP's own parameters run as plain PyTorch (gradients reach the model)."""
    layers = model.layers
    return eager_mlp(x, [m.weight for m in layers], [m.bias for m in layers], model.activation)
