"""dense() and mlp(): argument checking with clear errors, then the op."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd import forward_ad

from nnfast import _backends, _ops
from nnfast._backends import chooser
from nnfast._backends import extension as _extension
from nnfast.activations import ActivationSpec, resolve


def _check_tensor(fn: str, name: str, t: Any) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}(): {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(
            f"{fn}(): {name} must be a floating-point tensor (float32, float16, bfloat16 or"
            f" float64), got dtype {t.dtype}"
        )


_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_PLAIN = (Tensor, torch.nn.Parameter)  # exact types: subclasses take the full checks


def _valid_x(x: Any) -> bool:
    return type(x) in _PLAIN and x.dtype in _FLOATS and x.dim() > 0


def _valid_layer(x: Tensor, width: int, weight: Any, bias: Any, gated: bool) -> bool:
    """The common valid layer in a few comparisons (x valid, ``width`` its input width)."""
    return (
        type(weight) in _PLAIN
        and (bias is None or type(bias) in _PLAIN)
        and weight.dtype is x.dtype
        and weight.dim() == 2
        and width == weight.shape[1]
        and (
            bias is None
            or (bias.dtype is x.dtype and bias.dim() == 1 and bias.shape[0] == weight.shape[0])
        )
        and (not gated or weight.shape[0] % 2 == 0)
        and weight.device == x.device
        and (bias is None or bias.device == x.device)
    )


def _check_dense_args(x: Tensor, weight: Tensor, bias: Tensor | None, act: ActivationSpec) -> None:
    # The common valid call in a few comparisons; anything else gets the full checks below.
    if _valid_x(x) and _valid_layer(x, x.shape[-1], weight, bias, act.is_gated):
        return
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
    if act.is_gated and out_features % 2 != 0:
        raise ValueError(
            f"dense(): {act.name} needs a weight of shape (2 * out_features, in_features), gate"
            f" rows then up rows; got {tuple(weight.shape)} with an odd number of rows"
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


def _autocast_all(x: Tensor, *params: Tensor | None) -> list:
    """Cast like nn.Linear under torch.autocast: every operand to the autocast dtype."""
    if not torch._C._is_any_autocast_enabled() or not isinstance(x, Tensor):
        return [x, *params]  # (a non-tensor x is reported by the argument checks)
    device_type = x.device.type
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return [x, *params]
    dtype = torch.get_autocast_dtype(device_type)
    return [
        t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t for t in (x, *params)
    ]


# How a call runs: the backend directly (plain eager), plain PyTorch ops, or the custom op.
EAGER, COMPOSITE, OP = 0, 1, 2


def _route(*tensors: Tensor | None) -> int:
    """COMPOSITE under ``torch.func`` transforms (grad, vmap, jvp, jacrev, jacfwd, ...) and
    forward-mode AD (``torch.autograd.forward_ad`` dual tensors): custom ops have no forward-mode
    rule and no torch.func support, so the op would return a zero tangent or fail, while plain
    PyTorch ops (the reference math) work under every transform. OP under torch.compile and under
    dispatch or function modes (FakeTensor, FlopCounter, a device context, ...), which must see the
    custom op; COMPOSITE again under torch.export (and so torch.onnx.export), whose programs must
    run without nnfast. EAGER otherwise: nnfast.dense calls its backend directly.
    """
    if torch.compiler.is_exporting():
        # torch.export / torch.onnx.export: standard ops, so the exported program runs anywhere
        # (ONNX Runtime, ExecuTorch, AOTInductor) without nnfast
        return COMPOSITE
    if torch.compiler.is_compiling():
        return OP
    if torch._C._are_functorch_transforms_active():
        return COMPOSITE
    if forward_ad._current_level >= 0 and any(
        t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors
    ):
        return COMPOSITE
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return OP
    return EAGER


_PATH_FNS: dict[str, tuple] = {}


def _path_fns(path: str) -> tuple:
    """(forward, backward, backend name) of a dispatcher path; ``extension`` is nnfast._C's own
    kernels."""
    fns = _PATH_FNS.get(path)
    if fns is None:
        name = "extension" if path == "onednn" else path
        be = _backends.get(name)
        if path == "onednn":
            fns = (be.forward_onednn, None, name)
        elif path == "extension":
            fns = (be.forward_native, be.backward, name)
        else:
            fns = (be.forward, be.backward, name)
        _PATH_FNS[path] = fns
    return fns


def _apply(forward_fn, backward_fn, backend: str, x, weight, bias, act, training: bool):
    """One dense layer through a backend's functions in eager mode: x (M, K) -> (M, N). Training
    on the extension: its autograd node in C++ (csrc/fast.cpp), else ``EagerDense``."""
    if not training:
        return forward_fn(x, weight, bias, act, False)[0]
    if backend == "extension" and _extension.fast is not None:
        return _extension.fast.extension_dense(x, weight, bias, act)
    return _ops.EagerDense.apply(x, weight, bias, act, forward_fn, backward_fn, backend)[0]


def _run(
    path: str, x: Tensor, weight: Tensor, bias: Tensor | None, act: ActivationSpec, training: bool
):
    """One dense layer through a dispatcher path in eager mode."""
    if path == chooser.UNFUSED:
        return chooser.unfused(x, weight, bias, act)
    return _apply(*_path_fns(path), x, weight, bias, act, training)


def _run_any(
    path: str, x: Tensor, weight: Tensor, bias: Tensor | None, act: ActivationSpec
) -> Tensor:
    """``_run`` for x of any number of dimensions (flattened to rows and back)."""
    needs_grad = _needs_grad(x, weight, bias)
    if x.dim() == 2:
        return _run(path, x, weight, bias, act, needs_grad)
    out = _run(path, x.reshape(-1, x.shape[-1]), weight, bias, act, needs_grad)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _needs_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd records this call: grad mode on and any tensor requiring grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _plain_eager(*tensors: Tensor | None) -> bool:
    """Whether a call with no explicit backend is an automatic call in plain eager mode (no
    autocast, NNFAST_BACKEND, fixed dispatch, transforms or modes): what csrc/fast.cpp's fast
    path may run."""
    return (
        not torch._C._is_any_autocast_enabled()
        and _backends.env_backend() is None
        and _route(*tensors) == EAGER
        and chooser.measuring()
    )


def _explicit(backend: str | None) -> bool:
    return backend is not None or _backends.env_backend() is not None


@torch.compiler.assume_constant_result
def _traced_choice(key: tuple) -> str:
    # under torch.compile: the decision measured in eager mode, if any, as a trace-time constant
    return chooser.cached(key) or ""


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
            such as ``nn.GELU(approximate="tanh")`` or a function such as ``F.silu``; or a gated
            name ("swiglu", "geglu", "reglu"): then weight is ``(2 * out, in)``, gate rows then up
            rows, and the result is ``base(x W_g^T + b_g) * (x W_u^T + b_u)``.
        backend: "reference", "triton" or "extension"; default: the ``NNFAST_BACKEND``
            environment variable, else the best one for the device.

    Returns:
        ``(..., out_features)`` in x's dtype (``out_features = weight.shape[0] // 2`` if gated).
    """
    act = activation if type(activation) is ActivationSpec else resolve(activation)
    # The common call (automatic backend, plain eager mode, a valid layer whose key has a
    # confirmed decision) in one C++ call: the result, or the path for Python to run
    if backend is None and _extension.fast is not None and _plain_eager(x, weight, bias):
        out = _extension.fast.dense(x, weight, bias, act, chooser._decisions)
        if out is not None:
            return out if type(out) is not str else _run_any(out, x, weight, bias, act)
    if torch._C._is_any_autocast_enabled():
        x, weight, bias = _autocast_all(x, weight, bias)
    _check_dense_args(x, weight, bias, act)
    route = _route(x, weight, bias)
    if route == COMPOSITE or x.shape[-1] == 0:  # in_features=0: the bias broadcast, as F.linear
        return chooser.unfused(x, weight, bias, act)
    flat = x.dim() == 2  # no reshape: the output is not a view (FSDP2 warns about views)
    x2 = x if flat else x.reshape(-1, x.shape[-1])  # copies only when dims cannot be flattened
    needs_grad = _needs_grad(x, weight, bias)
    if route == EAGER:
        if _explicit(backend) or not chooser.measuring():
            name = _backends.select(backend, x.device.type, x.dtype)
            be = _backends.get(name)
            out = _apply(be.forward, be.backward, name, x2, weight, bias, act, needs_grad)
        else:
            path = chooser.choose(x2, weight, bias, act, needs_grad, _run)
            out = _run(path, x2, weight, bias, act, needs_grad)
    else:
        name = _backends.select(backend, x.device.type, x.dtype)
        if not _explicit(backend) and all(isinstance(d, int) for d in x2.shape):
            choice = _traced_choice(chooser.key_of(x2, weight, bias, act, needs_grad))
            if choice == chooser.UNFUSED:
                return chooser.unfused(x, weight, bias, act)
            name = {"onednn": "extension", "": name}.get(choice, choice)
        out, _ = _ops.dense_fwd(
            x2, weight, bias, act.name, act.param, needs_grad and act.saves_pre, name
        )
    return out if flat else out.reshape(*x.shape[:-1], out.shape[-1])


def _mlp_unfused(x: Tensor, weights, biases, act: ActivationSpec) -> Tensor:
    """PyTorch itself, layer by layer (a bias that is None or empty: none)."""
    last = len(weights) - 1
    for i, (w, b) in enumerate(zip(weights, biases)):
        x = torch.nn.functional.linear(x, w, None if b is None or b.numel() == 0 else b)
        x = act(x) if i < last else x
    return x


def _mlp_runner(backend: str, save: bool):
    """run(path, x, weights, biases, act, training) for the MLP's dispatcher paths in eager mode:
    ``fused`` (the backend's MLP; biases are tensors, empty for none) or ``unfused``."""

    def run(path, x, weights, biases, act, training):
        if path == chooser.UNFUSED:
            return _mlp_unfused(x, weights, biases, act)
        if not training:
            return _ops._mlp_forward_impl(x, weights, biases, act.name, act.param, False, backend)[
                0
            ]
        n = len(weights)
        return _ops.EagerMLP.apply(x, act.name, act.param, save, backend, n, *weights, *biases)[0]

    return run


_IDENTITY = resolve(None)


def _valid_mlp(x, weights: list, biases: list, act: ActivationSpec) -> bool:
    """The common valid MLP call, layer widths chained, in a few comparisons per layer."""
    if not _valid_x(x):
        return False
    width, last = x.shape[-1], len(weights) - 1
    for i, (w, b) in enumerate(zip(weights, biases)):
        gated = act.is_gated and i < last
        if not _valid_layer(x, width, w, b, gated):
            return False
        width = w.shape[0] // 2 if gated else w.shape[0]
    return True


def _check_mlp_args(x, weights: list, biases: list, act: ActivationSpec) -> None:
    """The per-layer checks with dense()'s messages, naming the layer."""
    last = len(weights) - 1
    probe = x
    for i, (w, b) in enumerate(zip(weights, biases)):
        layer_act = act if i < last else _IDENTITY
        try:
            _check_dense_args(probe, w, b, layer_act)
        except (ValueError, TypeError) as e:
            raise type(e)(str(e).replace("dense():", f"mlp(): layer {i}:", 1)) from None
        probe = probe.new_empty(0, layer_act.out_features(w.shape[0]))


def mlp(
    x: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None] | None = None,
    activation: Any = "gelu",
    *,
    checkpoint: bool = False,
    backend: str | None = None,
) -> Tensor:
    """A stack of dense layers, ``activation`` after every layer but the last, as one op.

    Each hidden layer keeps one activation-sized tensor for backward (its output, or its
    pre-activation from which backward recomputes the output); ``checkpoint=True`` keeps only x
    and reruns the forward in backward.

    Args:
        x: ``(..., in_features)``.
        weights: ``[(h1, in_features), (h2, h1), ..., (out_features, hn)]``; with a gated
            activation the hidden weights have twice the rows: ``(2 * h1, in_features)``, ...
        biases: one ``(rows_i,)`` tensor or None per weight; None means no bias anywhere.
    """
    weights = list(weights)
    if len(weights) == 0:
        raise ValueError("mlp(): weights is empty; expected at least one (out, in) weight")
    biases = [None] * len(weights) if biases is None else list(biases)
    if len(biases) != len(weights):
        raise ValueError(
            f"mlp(): got {len(weights)} weights but {len(biases)} biases; pass one bias (or None)"
            " per weight"
        )
    act: ActivationSpec = activation if type(activation) is ActivationSpec else resolve(activation)
    # As in dense(): the common call in one C++ call
    if (
        backend is None
        and not checkpoint
        and _extension.fast is not None
        and _plain_eager(x, *weights, *biases)
    ):
        out = _extension.fast.mlp(x, weights, biases, act, chooser._decisions)
        if out is not None:
            if type(out) is not str:
                return out
            name = _backends.select(None, x.device.type, x.dtype)
            return _mlp_path(out, x, weights, biases, act, name, False)
    if torch._C._is_any_autocast_enabled():
        x, *params = _autocast_all(x, *weights, *biases)
        weights, biases = params[: len(weights)], params[len(weights) :]
    if not _valid_mlp(x, weights, biases, act):
        _check_mlp_args(x, weights, biases, act)
    name = _backends.select(backend, x.device.type, x.dtype)
    route = _route(x, *weights, *biases)
    if any(0 in w.shape for w in weights) or route == COMPOSITE:
        return _mlp_unfused(x, weights, biases, act)
    if route == EAGER:
        path = chooser.FUSED
        if not checkpoint and not _explicit(backend) and chooser.measuring():
            path = None  # measured
        return _mlp_path(path, x, weights, biases, act, name, checkpoint)
    needs_grad = _needs_grad(x, *weights, *biases)
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    biases = [x.new_empty(0) if b is None else b for b in biases]
    out, _ = _ops.mlp_fwd(
        x2, weights, biases, act.name, act.param, needs_grad and not checkpoint, name
    )
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], out.shape[-1])


def _mlp_path(path, x, weights, biases, act, backend: str, checkpoint: bool) -> Tensor:
    """An MLP in eager mode through ``path`` (None: the dispatcher's measured choice) on x of any
    number of dimensions (flattened to rows and back)."""
    flat = x.dim() == 2
    x2 = x if flat else x.reshape(-1, x.shape[-1])
    needs_grad = _needs_grad(x, *weights, *biases)
    # a missing bias is an empty tensor: the op's autograd needs a list of tensors to return one
    # gradient per bias (a list holding None is a single leaf to it)
    biases = [x.new_empty(0) if b is None else b for b in biases]
    run = _mlp_runner(backend, needs_grad and not checkpoint)
    if path is None:
        path = chooser.choose_mlp(x2, weights, biases, act, chooser.mlp_mode(x, needs_grad), run)
    out = run(path, x2, weights, biases, act, needs_grad)
    return out if flat else out.reshape(*x.shape[:-1], out.shape[-1])
