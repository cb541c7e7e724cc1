"""torch.library custom ops: schemas, fake kernels and autograd.

``nnfast::dense_fwd`` returns the output and, when backward needs it, the pre-activation
(activations whose derivative is a function of the output keep the output instead, so a layer holds
one activation-sized tensor). ``nnfast::dense_bwd`` computes only the gradients asked for; the
others come back as empty tensors, since custom ops cannot return None.

Autocast is applied in ``functional.dense`` before the op (the op sees one dtype).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from nnfast import _backends
from nnfast.activations import BY_NAME, ActivationSpec


def _spec(activation: str, param: float) -> ActivationSpec:
    return ActivationSpec(BY_NAME[activation], param)


@torch.library.custom_op("nnfast::dense_fwd", mutates_args=())
def dense_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    activation: str,
    param: float,
    save_pre: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """x: (M, K), weight: (N, K), bias: (N,) or None -> out (M, N), pre (M, N) or (0,).

    ``save_pre`` must be true whenever a gradient will be asked for and the activation's
    derivative reads the pre-activation; ``functional.dense`` decides it.
    """
    spec = _spec(activation, param)
    save = save_pre and spec.saves_pre  # the output serves activations that read it
    return _backends.get(backend).forward(x, weight, bias, spec, save)


@dense_fwd.register_fake
def _(x, weight, bias, activation, param, save_pre, backend):
    m, n = x.shape[0], weight.shape[0]
    save = save_pre and _spec(activation, param).saves_pre
    return x.new_empty(m, n), (x.new_empty(m, n) if save else x.new_empty(0))


@torch.library.custom_op("nnfast::dense_bwd", mutates_args=())
def dense_bwd(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    saved: Tensor,
    activation: str,
    param: float,
    needs_x: bool,
    needs_w: bool,
    needs_b: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """grad_out: (M, N), x: (M, K), weight: (N, K), saved: (M, N) or (0,) for identity.

    Returns grad_x (M, K), grad_w (N, K), grad_b (N,); each (0,) when not needed.
    """
    needs = (needs_x, needs_w, needs_b)
    grads = _backends.get(backend).backward(
        grad_out, x, weight, saved, _spec(activation, param), needs
    )
    return tuple(g if need else grad_out.new_empty(0) for g, need in zip(grads, needs))


@dense_bwd.register_fake
def _(grad_out, x, weight, saved, activation, param, needs_x, needs_w, needs_b, backend):
    m, n = grad_out.shape
    return (
        grad_out.new_empty(m, weight.shape[1]) if needs_x else grad_out.new_empty(0),
        grad_out.new_empty(n, x.shape[1]) if needs_w else grad_out.new_empty(0),
        grad_out.new_empty(n) if needs_b else grad_out.new_empty(0),
    )


def _setup_context(ctx: Any, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    x, weight, bias, activation, param, save_pre, backend = inputs
    out, pre = output
    spec = _spec(activation, param)
    # The second output (pre) is internal: without this, autograd fills an (M, N) zero gradient
    # for it on every backward.
    ctx.set_materialize_grads(False)
    ctx.activation, ctx.param, ctx.backend = activation, param, backend
    ctx.has_bias = bias is not None
    if spec.is_identity:
        saved = out.new_empty(0)
    elif spec.from_output:
        saved = out
    elif save_pre:
        saved = pre
    else:
        raise RuntimeError(
            f"nnfast::dense_fwd was called with save_pre=False for {activation!r} while gradients"
            " are required; call nnfast.dense(), which sets it"
        )
    # Keep only what the asked-for gradients read: x for grad_w, weight for grad_x.
    needs_x, needs_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    ctx.save_for_backward(
        x if needs_w else None,
        weight if needs_x else None,
        saved,
    )


def _backward(ctx: Any, grad_out: Tensor | None, grad_pre_unused: Tensor | None) -> tuple:
    if grad_out is None:
        return (None,) * 7
    x, weight, saved = ctx.saved_tensors
    needs_x, needs_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    needs_b = ctx.has_bias and ctx.needs_input_grad[2]
    if x is None:
        x = grad_out.new_empty(0, 0)
    if weight is None:
        weight = grad_out.new_empty(0, 0)
    gx, gw, gb = dense_bwd(
        grad_out,
        x,
        weight,
        saved,
        ctx.activation,
        ctx.param,
        needs_x,
        needs_w,
        needs_b,
        ctx.backend,
    )
    return (
        gx if needs_x else None,
        gw if needs_w else None,
        gb if needs_b else None,
        None,
        None,
        None,
        None,
    )


dense_fwd.register_autograd(_backward, setup_context=_setup_context)
