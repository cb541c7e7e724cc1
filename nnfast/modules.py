"""FusedDense (a drop-in nn.Linear with an activation) and FusedMLP."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from nnfast.activations import resolve
from nnfast.functional import dense


class FusedDense(nn.Linear):
    """``activation(x @ weight.T + bias)`` as one fused op.

    Same parameters, initialisation and state_dict keys as ``nn.Linear``, so an ``nn.Linear``
    checkpoint loads with ``strict=True``. x: ``(..., in_features)`` -> ``(..., out_features)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: Any = "gelu",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = resolve(activation)

    @classmethod
    def from_linear(cls, linear: nn.Linear, activation: Any = "gelu") -> FusedDense:
        """A FusedDense with a copy of ``linear``'s parameters (same device and dtype)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(
                f"FusedDense.from_linear(): expected an nn.Linear, got {type(linear).__name__}"
            )
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            activation=activation,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        layer.load_state_dict(linear.state_dict())
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return dense(x, self.weight, self.bias, self.activation)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"


class FusedMLP(nn.Module):
    """A stack of FusedDense layers: ``activation`` after every hidden layer, none after the last.

    x: ``(..., in_features)`` -> ``(..., out_features)``. The layers are ``self.layers[i]``
    (``nn.Linear`` subclasses).
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: Sequence[int],
        out_features: int,
        activation: Any = "gelu",
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(hidden_features, int):
            raise TypeError(
                f"FusedMLP(): hidden_features must be a sequence of widths, got the int"
                f" {hidden_features}; write [{hidden_features}] for one hidden layer"
            )
        widths = [in_features, *hidden_features, out_features]
        act = resolve(activation)
        last = len(widths) - 2
        self.layers = nn.ModuleList(
            FusedDense(
                widths[i],
                widths[i + 1],
                bias=bias,
                activation=act if i < last else None,
                device=device,
                dtype=dtype,
            )
            for i in range(len(widths) - 1)
        )
        self.activation = act

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x
