"""dense() and mlp(): argument checking with clear errors, then the op."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from nnfast import _backends, _ops
from nnfast.activations import ActivationSpec, resolve


def _check_tensor(fn: str, name: str, t: Any) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}(): {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(
            f"{fn}(): {name} must be a floating-point tensor (float32, float16, bfloat16 or"
            f" float64), got dtype {t.dtype}"
        )


def _check_dense_args(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    _check_tensor("dense", "x", x)
    _check_tensor("dense", "weight", weight)
    if bias is not None:
        _check_tensor("dense", "bias", bias)
    if weight.dim() != 2:
        raise ValueError(
            f"dense(): weight must be 2-D (out_features, in_features), got {weight.dim()}-D"
            f" shape {tuple(weight.shape)}"
        )
    out_features, in_features = weight.shape
    if x.dim() == 0:
        raise ValueError(
            f"dense(): x must have at least 1 dimension (..., in_features={in_features}),"
            " got a 0-d tensor"
        )
    if x.shape[-1] != in_features:
        raise ValueError(
            f"dense(): x has last dimension {x.shape[-1]} but weight expects"
            f" in_features={in_features} (weight shape {tuple(weight.shape)})"
        )
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(
            f"dense(): bias must have shape ({out_features},) to match weight shape"
            f" {tuple(weight.shape)}, got {tuple(bias.shape)}"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(
                f"dense(): x has dtype {x.dtype} but {name} has dtype {t.dtype}; cast them to"
                " one dtype (or run under torch.autocast)"
            )
        if t.device != x.device:
            raise ValueError(
                f"dense(): x is on {x.device} but {name} is on {t.device}; move them to one device"
            )


def _autocast(x: Tensor, weight: Tensor, bias: Tensor | None):
    """Cast like nn.Linear under torch.autocast: every operand to the autocast dtype."""
    if not isinstance(x, Tensor):
        return x, weight, bias  # reported by the argument checks
    device_type = x.device.type
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    cast = [
        t.to(dtype) if t is not None and t.is_floating_point() else t for t in (x, weight, bias)
    ]
    return cast[0], cast[1], cast[2]


def dense(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: Any = "gelu",
    *,
    backend: str | None = None,
) -> Tensor:
    """``activation(x @ weight.T + bias)`` in one fused pass, forward and backward.

    Args:
        x: ``(..., in_features)``.
        weight: ``(out_features, in_features)``, the ``nn.Linear`` layout.
        bias: ``(out_features,)`` or None.
        activation: a name (see ``nnfast.activations.NAMES``), None for identity, a torch module
            such as ``nn.GELU(approximate="tanh")`` or a function such as ``F.silu``.
        backend: "reference", "triton" or "extension"; default: the ``NNFAST_BACKEND``
            environment variable, else the best one for the device.

    Returns:
        ``(..., out_features)`` in x's dtype.
    """
    act = resolve(activation)
    x, weight, bias = _autocast(x, weight, bias)
    _check_dense_args(x, weight, bias)
    name = _backends.select(backend, x.device.type, x.dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # copies only when the leading dims cannot be flattened
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias)
    )
    out, _ = _ops.dense_fwd(
        x2, weight, bias, act.name, act.param, needs_grad and act.saves_pre, name
    )
    return out.reshape(*lead, weight.shape[0])


def mlp(
    x: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None] | None = None,
    activation: Any = "gelu",
    *,
    backend: str | None = None,
) -> Tensor:
    """A stack of dense layers: ``activation`` after every layer but the last.

    Args:
        x: ``(..., in_features)``.
        weights: ``[(h1, in_features), (h2, h1), ..., (out_features, hn)]``.
        biases: one ``(h_i,)`` tensor or None per weight; None means no bias anywhere.
    """
    if len(weights) == 0:
        raise ValueError("mlp(): weights is empty; expected at least one (out, in) weight")
    if biases is None:
        biases = [None] * len(weights)
    if len(biases) != len(weights):
        raise ValueError(
            f"mlp(): got {len(weights)} weights but {len(biases)} biases; pass one bias (or None)"
            " per weight"
        )
    act: ActivationSpec = resolve(activation)
    last = len(weights) - 1
    for i, (w, b) in enumerate(zip(weights, biases)):
        x = dense(x, w, b, act if i < last else None, backend=backend)
    return x
