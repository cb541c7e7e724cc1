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
from nnfast._backends import reference
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
    spec = _spec(activation, param)
    m, n = x.shape[0], weight.shape[0]
    save = save_pre and spec.saves_pre
    return x.new_empty(m, spec.out_features(n)), (x.new_empty(m, n) if save else x.new_empty(0))


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
    """grad_out: (M, N'), x: (M, K), weight: (N, K), saved: (M, N) or (0,) for identity
    (N' = N, or N/2 for gated activations).

    Returns grad_x (M, K), grad_w (N, K), grad_b (N,); each (0,) when not needed.
    """
    needs = (needs_x, needs_w, needs_b)
    grads = _backends.get(backend).backward(
        grad_out, x, weight, saved, _spec(activation, param), needs
    )
    return tuple(g if need else grad_out.new_empty(0) for g, need in zip(grads, needs))


@dense_bwd.register_fake
def _(grad_out, x, weight, saved, activation, param, needs_x, needs_w, needs_b, backend):
    m = grad_out.shape[0]
    n = 2 * grad_out.shape[1] if _spec(activation, param).is_gated else grad_out.shape[1]
    return (
        grad_out.new_empty(m, weight.shape[1]) if needs_x else grad_out.new_empty(0),
        grad_out.new_empty(n, x.shape[1]) if needs_w else grad_out.new_empty(0),
        grad_out.new_empty(n) if needs_b else grad_out.new_empty(0),
    )


def _kept(spec: ActivationSpec, out: Tensor, pre: Tensor, save_pre: bool) -> Tensor:
    """What a layer keeps for backward: nothing (identity), its output, or its pre-activation."""
    if spec.is_identity:
        return out.new_empty(0)
    if spec.from_output:
        return out
    if save_pre:
        return pre
    raise RuntimeError(
        f"nnfast::dense_fwd was called with save_pre=False for {spec.name!r} while gradients"
        " are required; call nnfast.dense(), which sets it"
    )


def _setup_context(ctx: Any, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    x, weight, bias, activation, param, save_pre, backend = inputs
    out, pre = output
    # The second output (pre) is internal: without this, autograd fills an (M, N) zero gradient
    # for it on every backward.
    ctx.set_materialize_grads(False)
    ctx.activation, ctx.param, ctx.backend = activation, param, backend
    ctx.has_bias = bias is not None
    saved = _kept(_spec(activation, param), out, pre, save_pre)
    # Keep only what the asked-for gradients read: x for grad_w, weight for grad_x.
    needs_x, needs_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    ctx.save_for_backward(
        x if needs_w else None,
        weight if needs_x else None,
        saved,
    )


def _backward(ctx: Any, grad_out: Tensor | None, grad_pre: Tensor | None) -> tuple:
    x, weight, saved = ctx.saved_tensors
    needs = (
        ctx.needs_input_grad[0],
        ctx.needs_input_grad[1],
        ctx.has_bias and ctx.needs_input_grad[2],
    )
    if x is None:
        x = saved.new_empty(0, 0)
    if weight is None:
        weight = saved.new_empty(0, 0)
    grads = [None, None, None]
    if grad_out is not None:
        grads = dense_bwd(
            grad_out, x, weight, saved, ctx.activation, ctx.param, *needs, ctx.backend
        )
    if _is_pre_grad(grad_pre):
        # only a double backward differentiates the kept pre-activation (pre = x W^T + b)
        extra = _linear_grads(grad_pre, x, weight, needs)
        grads = [e if a is None else a if e is None else a + e for a, e in zip(grads, extra)]
    return (*[g if need else None for g, need in zip(grads, needs)], None, None, None, None)


def _linear_grads(g: Tensor, x: Tensor, weight: Tensor, needs) -> list:
    """The gradients of ``x @ weight.T + b`` for the output gradient g, in PyTorch ops."""
    return [
        g @ weight if needs[0] else None,
        g.t() @ x if needs[1] else None,
        g.sum(0) if needs[2] else None,
    ]


def _is_pre_grad(grad_pre: Tensor | None) -> bool:
    # a (0,) placeholder pre-activation (the layer kept its output, or nothing) gets none
    return grad_pre is not None and grad_pre.dim() == 2


def layer_grads(grad_out, grad_pre, x, weight, kept, spec: ActivationSpec, needs, backward_fn):
    """One layer's input gradients from the gradient of its output and (in a double backward)
    of its kept pre-activation. Under create_graph=True in PyTorch ops on the table's f' (so
    PyTorch's engine runs the second-order pass and computes only the terms asked for; a custom
    node must return every input's gradient at once); else the backend's fused backward."""
    graph = torch.is_grad_enabled()
    if _is_pre_grad(grad_pre):
        if grad_out is not None:
            grad_pre = reference.grad_pre(grad_out, kept, spec, differentiable=graph) + grad_pre
        return _linear_grads(grad_pre, x, weight, needs)
    if grad_out is None:
        return [None, None, None]
    if graph:
        return _linear_grads(reference.grad_pre(grad_out, kept, spec, True), x, weight, needs)
    return backward_fn(grad_out, x, weight, kept, spec, needs)


dense_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---- second derivatives: dense_bwd's own autograd formula -----------------------------------------
#
# dense_bwd computes g = grad_out * f'(s) (s: the kept tensor, pre-activation or output; gated: the
# gate/up product rule), then grad_x = g W, grad_w = g^T x, grad_b = sum_rows g. Given the
# gradients (gg_x, gg_w, gg_b) of those outputs, with dg = gg_x W^T + x gg_w^T + gg_b:
#   d grad_out = dg * f'(s),  d s = dg * grad_out * f''(s),  d x = g gg_w,  d W = gg_x^T g.
# d s flows back into the forward op's kept output (its pre-activation or output). The formula is
# PyTorch ops on the table's grad/grad2, so it is differentiable again (third order and up).


def _act_grad_grad(spec: ActivationSpec, grad_out: Tensor, saved: Tensor, dg: Tensor) -> tuple:
    """(d grad_out, d saved) for a gradient dg of the pre-activation gradient; 16-bit dtypes are
    computed in float32, as PyTorch's own activation backward kernels do."""
    if spec.is_identity:
        return dg, None
    dtype = grad_out.dtype
    compute = torch.promote_types(dtype, torch.float32)
    grad_out, saved, dg = grad_out.to(compute), saved.to(compute), dg.to(compute)
    if spec.is_gated:
        base, (gate, up), (dg_gate, dg_up) = spec.base, saved.chunk(2, -1), dg.chunk(2, -1)
        f, df = base(gate), base.grad(gate)
        d_grad_out = dg_gate * up * df + dg_up * f
        d_gate = dg_up * df
        if base.act.grad2 is not None:
            d_gate = d_gate + dg_gate * up * base.act.grad2(gate, base.param)
        d_saved = torch.cat((grad_out * d_gate, grad_out * dg_gate * df), dim=-1)
    else:
        d_grad_out, d_saved = dg * spec.grad(saved), None
        if spec.act.grad2 is not None:
            d_saved = dg * grad_out * spec.act.grad2(saved, spec.param)
    return d_grad_out.to(dtype), (None if d_saved is None else d_saved.to(dtype))


def dense_grad_grad(spec, grad_out, x, weight, saved, gg_x, gg_w, gg_b) -> tuple:
    """(d grad_out, d x, d weight, d saved) of dense_bwd; None where nothing flows."""
    dg = None
    if gg_x is not None:
        dg = gg_x @ weight.t()
    if gg_w is not None:
        dg = x @ gg_w.t() if dg is None else dg + x @ gg_w.t()
    if gg_b is not None:
        dg = gg_b.expand(grad_out.shape[0], -1) if dg is None else dg + gg_b
    g = None
    if gg_x is not None or gg_w is not None:  # differentiable again when a graph is being built
        g = reference.grad_pre(grad_out, saved, spec, differentiable=torch.is_grad_enabled())
    d_x = g @ gg_w if gg_w is not None else None
    d_w = g.t() @ gg_x if gg_x is not None else None
    d_grad_out, d_saved = (None, None) if dg is None else _act_grad_grad(spec, grad_out, saved, dg)
    return d_grad_out, d_x, d_w, d_saved


def _bwd_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    grad_out, x, weight, saved, activation, param, needs_x, needs_w, needs_b, backend = inputs
    ctx.set_materialize_grads(False)
    ctx.spec, ctx.needs = _spec(activation, param), (needs_x, needs_w, needs_b)
    ctx.save_for_backward(grad_out, x, weight, saved)


def _bwd_backward(ctx: Any, gg_x: Tensor | None, gg_w: Tensor | None, gg_b: Tensor | None):
    grad_out, x, weight, saved = ctx.saved_tensors
    # an output that was not asked for is a (0,) placeholder: nothing flows from it
    gg = [g if need else None for g, need in zip((gg_x, gg_w, gg_b), ctx.needs)]
    d_grad_out, d_x, d_w, d_saved = dense_grad_grad(ctx.spec, grad_out, x, weight, saved, *gg)
    return (d_grad_out, d_x, d_w, d_saved, *[None] * 6)


dense_bwd.register_autograd(_bwd_backward, setup_context=_bwd_setup_context)


# ---- eager twin of dense_fwd/dense_bwd: the same backend calls without the op machinery ----------
#
# torch.library's Python custom ops cost ~20-40 us a call on the CPU (schema parsing, the
# autograd wrapper, output structure checks); a layer at 1x64->64 takes ~7 us. In plain eager
# mode (not compiling, no torch.func transform, no dispatch mode) nnfast.dense calls the backend
# through this autograd.Function instead; torch.compile, export, opcheck and dispatch modes see
# the custom ops above.


class EagerDense(torch.autograd.Function):
    """dense_fwd + dense_bwd's autograd without the op machinery. Like the op it returns the
    pre-activation too (an internal output), so that a double backward can reach it."""

    @staticmethod
    def forward(ctx, x, weight, bias, spec: ActivationSpec, forward_fn, backward_fn, backend):
        out, pre = forward_fn(x, weight, bias, spec, spec.saves_pre)
        ctx.set_materialize_grads(False)
        ctx.spec, ctx.backward_fn, ctx.backend = spec, backward_fn, backend
        # x and weight are references to the inputs (no copies)
        ctx.save_for_backward(x, weight, _kept(spec, out, pre, True))
        ctx.has_bias = bias is not None
        return out, pre

    @staticmethod
    def backward(ctx, grad_out, grad_pre):
        x, weight, saved = ctx.saved_tensors
        needs = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            ctx.has_bias and ctx.needs_input_grad[2],
        )
        grads = layer_grads(grad_out, grad_pre, x, weight, saved, ctx.spec, needs, ctx.backward_fn)
        return (*[g if need else None for g, need in zip(grads, needs)], None, None, None, None)


# ---- the whole MLP as one op: one saved tensor per hidden layer, or none with recompute ----------
#
# Hidden layer i keeps what its backward reads: its output y_i when f' is a function of the output
# (relu, sigmoid, tanh, ...), else its pre-activation p_i. Layer i+1 keeps nothing of its own: its
# input is y_i, which backward takes from what layer i kept (recomputing f(p_i) when needed), so no
# layer holds both a pre-activation and a post-activation. The last layer has no activation.


def _layer_specs(spec: ActivationSpec, n: int) -> list[ActivationSpec]:
    return [spec] * (n - 1) + [_spec("identity", 0.0)]


def _fused(backend: str, spec: ActivationSpec, x: Tensor, weights: list[Tensor]) -> bool:
    """Whether the backend runs the whole stack in one fused kernel (it keeps the same tensors as
    the layer-by-layer path, so either backward can read them)."""
    supported = getattr(_backends.get(backend), "fused_mlp_supported", None)
    widths = [x.shape[1]] + [w.shape[0] for w in weights]
    return supported is not None and supported(spec, widths, x.dtype, x.device.type)


def _present(weights: list[Tensor], biases: list[Tensor]) -> list[Tensor | None]:
    """The op's bias list with None where a layer has no bias (passed as an empty tensor; one of
    shape (0,) for a layer with no outputs adds nothing either way)."""
    return [b if b.shape == (w.shape[0],) else None for w, b in zip(weights, biases)]


@torch.library.custom_op("nnfast::mlp_fwd", mutates_args=())
def mlp_fwd(
    x: Tensor,
    weights: list[Tensor],
    biases: list[Tensor],
    activation: str,
    param: float,
    save: bool,
    backend: str,
) -> tuple[Tensor, list[Tensor]]:
    """x: (M, K) -> out (M, N_last), and per hidden layer the tensor its backward reads.

    biases: one (N_i,) tensor per layer, or an empty tensor where the layer has no bias.
    """
    return _mlp_forward_impl(x, weights, biases, activation, param, save, backend)


def _mlp_forward_impl(x, weights, biases, activation, param, save, backend):
    be = _backends.get(backend)
    biases = _present(weights, biases)
    if _fused(backend, _spec(activation, param), x, weights):
        return be.mlp_forward(x, weights, biases, _spec(activation, param), save)
    h, saved = x, []
    for i, (w, b, a) in enumerate(
        zip(weights, biases, _layer_specs(_spec(activation, param), len(weights)))
    ):
        out, pre = be.forward(h, w, b, a, save and a.saves_pre)
        if save and i < len(weights) - 1:
            saved.append(pre if a.saves_pre else out)
        h = out
    return h, saved


@mlp_fwd.register_fake
def _(x, weights, biases, activation, param, save, backend):
    spec = _spec(activation, param)
    m, last = x.shape[0], len(weights) - 1
    saved = []
    for w in weights[:last]:
        rows = w.shape[0]
        if save:
            saved.append(x.new_empty(m, rows if spec.saves_pre else spec.out_features(rows)))
    return x.new_empty(m, weights[last].shape[0]), saved


def _layer_input(spec: ActivationSpec, kept: Tensor) -> Tensor:
    """A hidden layer's output from what it kept: the output itself, or f(pre) recomputed."""
    return kept if spec.from_output else spec(kept)


@torch.library.custom_op("nnfast::mlp_bwd", mutates_args=())
def mlp_bwd(
    grad_out: Tensor,
    x: Tensor,
    weights: list[Tensor],
    has_bias: list[bool],
    saved: list[Tensor],
    activation: str,
    param: float,
    needs_x: bool,
    needs_w: bool,
    needs_b: bool,
    backend: str,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Layer by layer from the last: grad_x (M, K) and per layer grad_w, grad_b ((0,) if unused)."""
    return _mlp_backward_impl(
        grad_out, x, weights, has_bias, saved, activation, param, needs_x, needs_w, needs_b, backend
    )


def _mlp_backward_impl(
    grad_out, x, weights, has_bias, saved, activation, param, needs_x, needs_w, needs_b, backend
):
    be = _backends.get(backend)
    if _fused(backend, _spec(activation, param), x, weights):
        gx, gws, gbs = be.mlp_backward(
            grad_out, x, weights, has_bias, saved, _spec(activation, param), needs_x
        )
        return (
            gx if needs_x else grad_out.new_empty(0),
            [gw if needs_w else grad_out.new_empty(0) for gw in gws],
            [gb if (needs_b and gb is not None) else grad_out.new_empty(0) for gb in gbs],
        )
    specs = _layer_specs(_spec(activation, param), len(weights))
    g = grad_out
    # distinct empty placeholders: custom op outputs may not alias each other
    grad_ws = [grad_out.new_empty(0) for _ in weights]
    grad_bs = [grad_out.new_empty(0) for _ in weights]
    for i in reversed(range(len(weights))):
        x_i = x if i == 0 else _layer_input(specs[i - 1], saved[i - 1])
        kept = saved[i] if i < len(weights) - 1 else g.new_empty(0)
        need_x = needs_x if i == 0 else True
        gx, gw, gb = be.backward(
            g, x_i, weights[i], kept, specs[i], (need_x, needs_w, needs_b and has_bias[i])
        )
        if needs_w:
            grad_ws[i] = gw
        if needs_b and has_bias[i]:
            grad_bs[i] = gb
        g = gx
    return (g if needs_x else grad_out.new_empty(0)), grad_ws, grad_bs


@mlp_bwd.register_fake
def _(grad_out, x, weights, has_bias, saved, activation, param, needs_x, needs_w, needs_b, backend):
    m = grad_out.shape[0]
    return (
        grad_out.new_empty(m, weights[0].shape[1]) if needs_x else grad_out.new_empty(0),
        [grad_out.new_empty(w.shape) if needs_w else grad_out.new_empty(0) for w in weights],
        [
            grad_out.new_empty(w.shape[0]) if needs_b and hb else grad_out.new_empty(0)
            for w, hb in zip(weights, has_bias)
        ],
    )


def _mlp_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, weights, biases, activation, param, save, backend = inputs
    _, saved = output
    ctx.set_materialize_grads(False)
    ctx.activation, ctx.param, ctx.backend = activation, param, backend
    ctx.num_layers = len(weights)
    biases = _present(weights, biases)
    ctx.has_bias = [b is not None for b in biases]
    ctx.needs = (
        x.requires_grad,
        any(w.requires_grad for w in weights),
        any(b is not None and b.requires_grad for b in biases),
    )
    # Without saved tensors (checkpoint), backward reruns the forward from x.
    ctx.recompute = not save and ctx.num_layers > 1
    ctx.eager = False  # EagerMLP: backward calls the implementations, not the ops
    ctx.save_for_backward(x, *weights, *[b for b in biases if b is not None], *saved)


def _mlp_backward(ctx: Any, grad_out: Tensor | None, grad_saved: list | None) -> tuple:
    n = ctx.num_layers
    tensors = ctx.saved_tensors
    x, weights = tensors[0], list(tensors[1 : 1 + n])
    it = iter(tensors[1 + n : 1 + n + sum(ctx.has_bias)])
    biases = [next(it) if hb else None for hb in ctx.has_bias]
    saved = list(tensors[1 + n + sum(ctx.has_bias) :])
    grad_saved = [g for g in grad_saved or [] if g is not None] and grad_saved
    if grad_out is None and not grad_saved:
        return None, [None] * n, [None] * n, None, None, None, None
    if ctx.recompute:
        # under create_graph the rerun goes through the op, whose graph carries the second-order
        # terms to x and the weights; else (EagerMLP) the implementation without the op machinery
        placeholders = [x.new_empty(0) if b is None else b for b in biases]
        rerun = _mlp_forward_impl if ctx.eager and not torch.is_grad_enabled() else mlp_fwd
        _, saved = rerun(x, weights, placeholders, ctx.activation, ctx.param, True, ctx.backend)
    needs_x, needs_w, needs_b = ctx.needs
    if torch.is_grad_enabled() or grad_saved:
        # create_graph=True, or the double backward reaching the kept tensors: layer by layer
        gx, gws, gbs = _mlp_backward_layers(ctx, grad_out, grad_saved, x, weights, saved)
    else:
        gx, gws, gbs = (_mlp_backward_impl if ctx.eager else mlp_bwd)(
            grad_out,
            x,
            weights,
            ctx.has_bias,
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
        [gw if needs_w else None for gw in gws],
        [gb if (needs_b and hb) else None for gb, hb in zip(gbs, ctx.has_bias)],
        None,
        None,
        None,
        None,
    )


def _mlp_backward_layers(ctx, grad_out, grad_saved, x, weights, saved) -> tuple:
    """The MLP's backward layer by layer (see ``layer_grads``), plus the gradients that a
    double backward sends to each hidden layer's kept tensor: to its output (added to the
    gradient flowing into the layer) or to its pre-activation (a linear layer's gradients)."""
    n, (needs_x, needs_w, needs_b) = len(weights), ctx.needs
    specs = _layer_specs(_spec(ctx.activation, ctx.param), n)
    grad_saved = grad_saved or [None] * (n - 1)
    g, grad_ws, grad_bs = grad_out, [None] * n, [None] * n
    be = _backends.get(ctx.backend)
    for i in reversed(range(n)):
        x_i = x if i == 0 else _layer_input(specs[i - 1], saved[i - 1])
        extra = grad_saved[i] if i < n - 1 else None
        if extra is not None and specs[i].from_output:
            g, extra = (extra if g is None else g + extra), None
        needs = (needs_x if i == 0 else True, needs_w, needs_b and ctx.has_bias[i])
        kept = saved[i] if i < n - 1 else x.new_empty(0)
        gx, grad_ws[i], grad_bs[i] = layer_grads(
            g, extra, x_i, weights[i], kept, specs[i], needs, be.backward
        )
        g = gx if needs[0] else None
    return g, grad_ws, grad_bs


mlp_fwd.register_autograd(_mlp_backward, setup_context=_mlp_setup_context)


class EagerMLP(torch.autograd.Function):
    """mlp_fwd and its autograd without the op machinery (plain eager mode; see EagerDense).
    Flat arguments: ``apply(x, activation, param, save, backend, n, *weights, *biases)`` (an
    empty tensor for a missing bias); returns the output and, like the op, the kept tensors."""

    @staticmethod
    def forward(ctx, x, activation, param, save, backend, n, *params):
        weights, biases = list(params[:n]), list(params[n:])
        out, saved = _mlp_forward_impl(x, weights, biases, activation, param, save, backend)
        _mlp_setup_context(
            ctx, (x, weights, biases, activation, param, save, backend), (out, saved)
        )
        ctx.eager = True
        return (out, *saved)

    @staticmethod
    def backward(ctx, grad_out, *grad_saved):
        gx, gws, gbs, *_ = _mlp_backward(ctx, grad_out, list(grad_saved))
        return (gx, None, None, None, None, None, *gws, *gbs)
