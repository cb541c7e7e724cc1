"""Pure PyTorch: the ground truth that defines the semantics, and the fallback on any device."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from nnfast.activations import ActivationSpec


def unavailable() -> str | None:
    return None


def unsupported(device_type: str, dtype: torch.dtype) -> str | None:
    return None


def forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, act: ActivationSpec, save: bool
) -> tuple[Tensor, Tensor]:
    pre = F.linear(x, weight, bias)
    out = act(pre)
    return out, (pre if save else pre.new_empty(0))


def grad_pre(
    grad_out: Tensor, saved: Tensor, act: ActivationSpec, differentiable: bool = False
) -> Tensor:
    """dL/dpre = dL/dy * f'(pre), computed in float32 for 16-bit dtypes, returned in their dtype.

    ``differentiable``: from the table's f' in PyTorch math, never PyTorch's fused activation
    backward kernels (silu_backward has no derivative): for create_graph=True backwards.

    Gated rows: saved is the (M, 2h) pre-activation [gate, up] and y = base(gate) * up, so
    dL/dgate = dL/dy * up * base'(gate) and dL/dup = dL/dy * base(gate).
    """
    if act.is_identity:
        return grad_out
    compute = torch.promote_types(saved.dtype, torch.float32)
    if act.is_gated:
        gate, up = saved.to(compute).chunk(2, dim=-1)
        g = grad_out.to(compute)
        base = act.base
        return torch.cat([g * up * base.grad(gate), g * base(gate)], dim=-1).to(grad_out.dtype)
    if act.act.vjp is not None and not differentiable:
        return act.act.vjp(grad_out, saved, act.param)
    return (grad_out.to(compute) * act.grad(saved.to(compute))).to(grad_out.dtype)


def backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    saved: Tensor,
    act: ActivationSpec,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    g = grad_pre(grad_out, saved, act)
    grad_x = g @ weight if needs[0] else None
    grad_w = g.t() @ x if needs[1] else None
    grad_b = g.sum(0) if needs[2] else None
    return grad_x, grad_w, grad_b
