"""THE activation table: names, aliases, parameters and reference math (f, f' and f'').

Every backend reads this table. A row's ``code`` is the integer the kernels switch on
(``kernels/activations.py`` and ``csrc/activations.h`` use the same numbers), its ``fn`` is the
exact PyTorch semantics, and its ``grad`` is the derivative with respect to the pre-activation,
evaluated from the tensor the layer keeps for backward: the output where ``from_output`` says so
(one tensor serves both as saved state and as the next layer's input), else the pre-activation.
``grad2`` is the derivative of ``grad`` with respect to that same saved tensor (so f''(pre) for rows
that keep the pre-activation): the double backward (``create_graph=True``) reads it.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_TANH_KAPPA = 0.044715


def _gelu_grad(x: Tensor, _: float) -> Tensor:
    # d/dx gelu(x) = Phi(x) + x * phi(x)
    cdf = 0.5 * (1.0 + torch.erf(x * _INV_SQRT_2))
    pdf = torch.exp(-0.5 * x * x) * _INV_SQRT_2PI
    return cdf + x * pdf


def _gelu_tanh_grad(x: Tensor, _: float) -> Tensor:
    # gelu_tanh(x) = 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + kappa x^3)
    # d/dx = 0.5 (1 + tanh(u)) + 0.5 x (1 - tanh(u)^2) sqrt(2/pi) (1 + 3 kappa x^2)
    t = torch.tanh(_SQRT_2_OVER_PI * (x + _GELU_TANH_KAPPA * x * x * x))
    du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_KAPPA * x * x)
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du


def _silu_grad(x: Tensor, _: float) -> Tensor:
    # d/dx x s(x) = s(x) (1 + x (1 - s(x)))
    s = torch.sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


_QUICK_GELU_ALPHA = 1.702


def _quick_gelu_grad(x: Tensor, _: float) -> Tensor:
    # d/dx x s(a x) = s (1 + a x (1 - s)), s = sigmoid(a x)
    s = torch.sigmoid(_QUICK_GELU_ALPHA * x)
    return s * (1.0 + _QUICK_GELU_ALPHA * x * (1.0 - s))


def _quick_gelu_grad2(x: Tensor, _: float) -> Tensor:
    # a s (1 - s) (2 + a x (1 - 2 s))
    a = _QUICK_GELU_ALPHA
    s = torch.sigmoid(a * x)
    return a * s * (1.0 - s) * (2.0 + a * x * (1.0 - 2.0 * s))


def _gelu_grad2(x: Tensor, _: float) -> Tensor:
    # d/dx (Phi(x) + x phi(x)) = 2 phi(x) + x phi'(x) = phi(x) (2 - x^2)
    return torch.exp(-0.5 * x * x) * _INV_SQRT_2PI * (2.0 - x * x)


def _gelu_tanh_grad2(x: Tensor, _: float) -> Tensor:
    # with t = tanh(u), t' = (1 - t^2) u', u' = sqrt(2/pi) (1 + 3 kappa x^2), u'' = 6 sqrt(2/pi) kappa x:
    # f'' = (1 - t^2) (u' - x t u'^2 + x u''/2)
    t = torch.tanh(_SQRT_2_OVER_PI * (x + _GELU_TANH_KAPPA * x * x * x))
    du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_KAPPA * x * x)
    return (1.0 - t * t) * (du - x * t * du * du + 3.0 * _SQRT_2_OVER_PI * _GELU_TANH_KAPPA * x * x)


def _silu_grad2(x: Tensor, _: float) -> Tensor:
    # d/dx s (1 + x (1 - s)) = s (1 - s) (2 + x (1 - 2 s))
    s = torch.sigmoid(x)
    return s * (1.0 - s) * (2.0 + x * (1.0 - 2.0 * s))


@dataclass(frozen=True)
class Activation:
    """One row of the table."""

    name: str
    code: int  # the kernels' switch value; never renumber a row
    fn: Callable[[Tensor, float], Tensor]  # reference forward, PyTorch semantics
    grad: Callable[[Tensor, float], Tensor]  # f'(pre), evaluated on the saved tensor
    from_output: bool = False  # grad reads the output y instead of the pre-activation
    aliases: tuple[str, ...] = ()
    default_param: float = 0.0  # leaky_relu's negative_slope; unused elsewhere
    # grad_out * f'(pre) in one PyTorch kernel (the one eager autograd runs); the reference
    # backend's fast path. None: grad_out * grad(saved).
    vjp: Callable[[Tensor, Tensor, float], Tensor] | None = None
    # Gated rows (swiglu, geglu, reglu): the layer's weight is (2*out, in), gate rows then up rows,
    # and y = base(gate) * up with ``base`` the row named here. fn/grad are the base's.
    gated_base: str | None = None
    # d grad / d saved, on the saved tensor; None where it is zero (almost everywhere)
    grad2: Callable[[Tensor, float], Tensor] | None = None

    def __reduce__(self) -> tuple:
        # by name: the row holds functions (lambdas) that pickle cannot store
        return (_row, (self.name,))

    def grad_from_output(self, param: float) -> bool:
        """Whether backward evaluates ``grad`` on the output.

        leaky_relu reads the sign of y, which matches the sign of x only for a slope >= 0.
        """
        return self.from_output and param >= 0.0


TABLE: tuple[Activation, ...] = (
    Activation(
        "identity",
        0,
        fn=lambda x, p: x,
        grad=lambda s, p: torch.ones_like(s),
        from_output=True,
        aliases=("linear", "none"),
    ),
    Activation(
        "relu",
        1,
        fn=lambda x, p: F.relu(x),
        # relu'(x) = [x > 0] = [y > 0]
        grad=lambda y, p: (y > 0).to(y.dtype),
        from_output=True,
        vjp=lambda g, y, p: torch.ops.aten.threshold_backward(g, y, 0),
    ),
    Activation(
        "leaky_relu",
        2,
        fn=lambda x, p: F.leaky_relu(x, p),
        # leaky_relu'(x) = 1 if x > 0 else slope; with slope >= 0, x > 0 <=> y > 0
        grad=lambda s, p: torch.ones_like(s).masked_fill_(~(s > 0), p),
        from_output=True,
        default_param=0.01,
        vjp=lambda g, s, p: torch.ops.aten.leaky_relu_backward(g, s, p, False),
    ),
    Activation(
        "gelu",
        3,
        fn=lambda x, p: F.gelu(x),
        grad=_gelu_grad,
        grad2=_gelu_grad2,
        vjp=lambda g, x, p: torch.ops.aten.gelu_backward(g, x),
    ),
    Activation(
        "gelu_tanh",
        4,
        fn=lambda x, p: F.gelu(x, approximate="tanh"),
        grad=_gelu_tanh_grad,
        grad2=_gelu_tanh_grad2,
        aliases=("gelu_approx", "gelu_new"),
        vjp=lambda g, x, p: torch.ops.aten.gelu_backward(g, x, approximate="tanh"),
    ),
    Activation(
        "silu",
        5,
        fn=lambda x, p: F.silu(x),
        grad=_silu_grad,
        grad2=_silu_grad2,
        aliases=("swish",),
        vjp=lambda g, x, p: torch.ops.aten.silu_backward(g, x),
    ),
    Activation(
        "sigmoid",
        6,
        fn=lambda x, p: torch.sigmoid(x),
        # s'(x) = y (1 - y)
        grad=lambda y, p: y * (1.0 - y),
        grad2=lambda y, p: 1.0 - 2.0 * y,
        from_output=True,
        vjp=lambda g, y, p: torch.ops.aten.sigmoid_backward(g, y),
    ),
    Activation(
        "tanh",
        7,
        fn=lambda x, p: torch.tanh(x),
        # tanh'(x) = 1 - y^2
        grad=lambda y, p: 1.0 - y * y,
        grad2=lambda y, p: -2.0 * y,
        from_output=True,
        vjp=lambda g, y, p: torch.ops.aten.tanh_backward(g, y),
    ),
    Activation(
        "squared_relu",
        8,
        fn=lambda x, p: torch.square(F.relu(x)),
        # d/dx relu(x)^2 = 2 relu(x); read from x, since y = relu(x)^2 overflows float16 first
        grad=lambda x, p: 2.0 * F.relu(x),
        grad2=lambda x, p: 2.0 * (x > 0).to(x.dtype),
        aliases=("relu2", "relu_squared"),
    ),
    Activation(
        "quick_gelu",
        12,  # after the gated rows' 9-11
        # x * sigmoid(1.702 x): CLIP's activation (transformers' QuickGELUActivation)
        fn=lambda x, p: x * torch.sigmoid(_QUICK_GELU_ALPHA * x),
        grad=_quick_gelu_grad,
        grad2=_quick_gelu_grad2,
    ),
)

_BASE = {a.name: a for a in TABLE}
TABLE = TABLE + tuple(
    Activation(
        name,
        code,
        fn=_BASE[base].fn,
        grad=_BASE[base].grad,
        grad2=_BASE[base].grad2,
        gated_base=base,
        aliases=aliases,
    )
    for name, code, base, aliases in (
        ("swiglu", 9, "silu", ("swish_glu",)),
        ("geglu", 10, "gelu", ()),
        ("reglu", 11, "relu", ()),
    )
)

BY_NAME: dict[str, Activation] = {a.name: a for a in TABLE}


def _row(name: str) -> Activation:
    """The table row called ``name`` (how pickle restores an Activation)."""
    return BY_NAME[name]


_LOOKUP: dict[str, Activation] = {n: a for a in TABLE for n in (a.name, *a.aliases)}
NAMES: tuple[str, ...] = tuple(a.name for a in TABLE if a.gated_base is None)
GATED_NAMES: tuple[str, ...] = tuple(a.name for a in TABLE if a.gated_base is not None)


@dataclass(frozen=True)
class ActivationSpec:
    """A resolved activation: a table row and its parameter (leaky_relu's negative_slope)."""

    act: Activation
    param: float = 0.0

    @property
    def name(self) -> str:
        return self.act.name

    def __call__(self, x: Tensor) -> Tensor:
        """Reference forward with PyTorch semantics; gated: x (..., 2h) -> (..., h)."""
        if self.is_gated:
            gate, up = x.chunk(2, dim=-1)
            return self.act.fn(gate, self.param) * up
        return self.act.fn(x, self.param)

    def grad(self, saved: Tensor) -> Tensor:
        """f'(pre) from the tensor backward keeps (see ``from_output``); elementwise rows only."""
        return self.act.grad(saved, self.param)

    @property
    def is_gated(self) -> bool:
        return self.act.gated_base is not None

    @property
    def base(self) -> ActivationSpec:
        """The elementwise activation of a gated row (the row itself otherwise)."""
        return ActivationSpec(BY_NAME[self.act.gated_base], self.param) if self.is_gated else self

    def out_features(self, weight_rows: int) -> int:
        """Output width for a weight with this many rows: half of them for gated rows."""
        return weight_rows // 2 if self.is_gated else weight_rows

    @property
    def from_output(self) -> bool:
        return not self.is_gated and self.act.grad_from_output(self.param)

    @property
    def is_identity(self) -> bool:
        return self.act.code == 0

    @property
    def saves_pre(self) -> bool:
        """Whether backward needs the pre-activation (else the output, or nothing for identity)."""
        return not self.from_output

    def __repr__(self) -> str:
        if self.act.name == "leaky_relu":
            return f"leaky_relu(negative_slope={self.param})"
        return self.act.name


def _module_spec(m: nn.Module) -> ActivationSpec | None:
    # Exact types only: a subclass may override forward, and computing the parent's math
    # for it would be a silent miscomputation.
    t = type(m)
    if t is nn.GELU:
        return ActivationSpec(BY_NAME["gelu_tanh" if m.approximate == "tanh" else "gelu"])
    if t is nn.LeakyReLU:
        return ActivationSpec(BY_NAME["leaky_relu"], float(m.negative_slope))
    simple = {
        nn.Identity: "identity",
        nn.ReLU: "relu",
        nn.SiLU: "silu",
        nn.Sigmoid: "sigmoid",
        nn.Tanh: "tanh",
    }
    return ActivationSpec(BY_NAME[simple[t]]) if t in simple else None


_FUNCTIONS: dict[Any, str] = {
    F.relu: "relu",
    torch.relu: "relu",
    F.leaky_relu: "leaky_relu",
    F.gelu: "gelu",
    F.silu: "silu",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    torch.tanh: "tanh",
    F.tanh: "tanh",
}


def _unknown(given: Any) -> ValueError:
    names = ", ".join(NAMES + GATED_NAMES)
    hint = ""
    if isinstance(given, str):
        close = difflib.get_close_matches(given.lower(), list(_LOOKUP), n=1, cutoff=0.5)
        if close:
            hint = f" Did you mean {_LOOKUP[close[0]].name!r}?"
    return ValueError(
        f"unsupported activation {given!r}. Supported names: {names} (or None for identity);"
        f" torch modules nn.ReLU(), nn.GELU(approximate='none'|'tanh'), nn.LeakyReLU(slope),"
        f" nn.SiLU(), nn.Sigmoid(), nn.Tanh(), nn.Identity(); and functions F.relu, F.gelu,"
        f" F.silu, F.leaky_relu, torch.sigmoid, torch.tanh.{hint}"
    )


def resolve(activation: Any) -> ActivationSpec:
    """Turn a name, None, torch module or torch function into an ``ActivationSpec``.

    Names are case-insensitive and accept '-' for '_'. Raises ValueError with the supported names
    and the closest match for anything else.
    """
    if isinstance(activation, ActivationSpec):
        return activation
    if activation is None:
        return ActivationSpec(BY_NAME["identity"])
    if isinstance(activation, str):
        act = _LOOKUP.get(activation.strip().lower().replace("-", "_"))
        if act is None:
            raise _unknown(activation)
        return ActivationSpec(act, act.default_param)
    if isinstance(activation, nn.Module):
        spec = _module_spec(activation)
        if spec is None:
            raise _unknown(activation)
        return spec
    try:
        name = _FUNCTIONS.get(activation)
    except TypeError:  # unhashable
        name = None
    if name is None:
        raise _unknown(activation)
    act = BY_NAME[name]
    return ActivationSpec(act, act.default_param)


class Activation(nn.Module):
    """A table row as a module (for the rows torch has no module for: squared_relu, quick_gelu,
    gated rows)."""

    def __init__(self, activation: Any) -> None:
        super().__init__()
        self.spec = resolve(activation)

    def forward(self, x: Tensor) -> Tensor:
        return self.spec(x)

    def extra_repr(self) -> str:
        return repr(self.spec)


def as_module(activation: Any) -> nn.Module:
    """The torch module computing an activation (``nn.GELU()``, ``nn.LeakyReLU(0.2)``, ...), or
    an ``Activation`` module where torch has none."""
    spec = resolve(activation)
    name = spec.name
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "leaky_relu":
        return nn.LeakyReLU(spec.param)
    simple = {
        "identity": nn.Identity,
        "relu": nn.ReLU,
        "gelu": nn.GELU,
        "silu": nn.SiLU,
        "sigmoid": nn.Sigmoid,
        "tanh": nn.Tanh,
    }
    return simple[name]() if name in simple else Activation(spec)
