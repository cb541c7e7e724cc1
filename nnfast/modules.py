"""FusedDense (a drop-in nn.Linear with an activation) and FusedMLP."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.nn.modules import module as _module

from nnfast.activations import resolve
from nnfast.functional import dense, mlp


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
        act = resolve(activation)
        # gated activations: weight (2 * out_features, in_features), gate rows then up rows
        rows = 2 * out_features if act.is_gated else out_features
        super().__init__(in_features, rows, bias=bias, device=device, dtype=dtype)
        self.out_features = out_features
        self.activation = act

    @classmethod
    def from_linear(cls, linear: nn.Linear, activation: Any = "gelu") -> FusedDense:
        """A FusedDense with a copy of ``linear``'s parameters (same device and dtype)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(
                f"FusedDense.from_linear(): expected an nn.Linear, got {type(linear).__name__}"
            )
        layer = cls(
            linear.in_features,
            resolve(activation).out_features(linear.out_features),
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
    (``nn.Linear`` subclasses). Training keeps one activation-sized tensor per hidden layer;
    ``checkpoint=True`` keeps only the input and recomputes the rest in backward. With a gated
    activation ("swiglu", "geglu", "reglu") each hidden layer's weight has 2 * width rows (a
    Llama-style feed-forward for one hidden layer; see ``from_gated_linears``).
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
        checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.checkpoint = checkpoint
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
        layers = list(self.layers._modules.values())
        if self._layers_wrapped(layers):
            # Call the layers, as nn.Sequential would, so that whatever wraps them runs.
            if self.checkpoint and torch.is_grad_enabled():
                return torch.utils.checkpoint.checkpoint(self._each_layer, x, use_reentrant=False)
            return self._each_layer(x)
        # nothing wraps the layers (checked above): their parameters read directly, without
        # nn.Module.__getattr__ per tensor (a small MLP's call is a few tens of microseconds)
        params = [layer._parameters for layer in layers]
        return mlp(
            x,
            [p["weight"] for p in params],
            [p["bias"] for p in params],
            self.activation,
            checkpoint=self.checkpoint,
        )

    def _each_layer(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def _layers_wrapped(self, layers: list[nn.Module]) -> bool:
        """Whether anything stands between this module and its layers' parameters: hooks (module
        or global), FSDP2's ``fully_shard`` (which swaps the layer's class and gathers DTensor
        shards in a pre-forward hook), parametrizations, a replaced ``forward`` or layer. The fused
        op reads the parameters directly and would bypass all of them."""
        if (
            _module._global_forward_hooks
            or _module._global_forward_pre_hooks
            or _module._global_backward_hooks
            or _module._global_backward_pre_hooks
        ):
            return True
        for layer in layers:
            if (
                type(layer) is not FusedDense
                or layer._forward_hooks
                or layer._forward_pre_hooks
                or layer._backward_hooks
                or layer._backward_pre_hooks
                or "forward" in layer.__dict__
            ):
                return True
        return False

    @classmethod
    def from_sequential(cls, seq: nn.Sequential, checkpoint: bool = False) -> FusedMLP:
        """A FusedMLP with a copy of the weights of ``nn.Sequential(Linear, act, Linear, act, ...,
        Linear)`` (one activation throughout; any module nnfast recognises, see nnfast.fuse)."""
        from nnfast.fuse import activation_of

        mods = list(seq)
        linears, acts = mods[0::2], [activation_of(m) for m in mods[1::2]]
        if (
            len(mods) < 3
            or len(mods) % 2 == 0
            or any(type(m) is not nn.Linear for m in linears)
            or any(a is None or a != acts[0] for a in acts)
            or len({m.bias is None for m in linears}) != 1
        ):
            found = ", ".join(type(m).__name__ for m in mods) or "nothing"
            raise ValueError(
                "FusedMLP.from_sequential(): expected nn.Sequential(Linear, act, Linear, act, ...,"
                f" Linear) with one activation nnfast has and biases on all or none; got {found}"
            )
        first = linears[0]
        model = cls(
            first.in_features,
            [m.out_features for m in linears[:-1]],
            linears[-1].out_features,
            activation=acts[0],
            bias=first.bias is not None,
            device=first.weight.device,
            dtype=first.weight.dtype,
            checkpoint=checkpoint,
        )
        for dst, src in zip(model.layers, linears):
            dst.load_state_dict(src.state_dict())
        return model

    def to_sequential(self) -> nn.Sequential:
        """``nn.Sequential(Linear, act, ..., Linear)`` with a copy of the weights (plain PyTorch
        modules; an activation torch has no module for runs as ``nnfast.activations.Activation``)."""
        from nnfast.activations import as_module

        mods: list[nn.Module] = []
        for i, layer in enumerate(self.layers):
            linear = nn.Linear(
                layer.in_features,
                layer.weight.shape[0],
                bias=layer.bias is not None,
                device=layer.weight.device,
                dtype=layer.weight.dtype,
            )
            linear.load_state_dict(layer.state_dict())
            mods.append(linear)
            if i < len(self.layers) - 1:
                mods.append(as_module(self.activation))
        return nn.Sequential(*mods)

    @classmethod
    def from_gated_linears(
        cls, gate: nn.Linear, up: nn.Linear, down: nn.Linear, activation: Any = "swiglu"
    ) -> FusedMLP:
        """A gated feed-forward ``down(act(gate(x)) * up(x))`` from its three nn.Linear layers
        (weights copied: gate rows then up rows form the first layer)."""
        spec = resolve(activation)
        if not spec.is_gated:
            raise ValueError(
                f"FusedMLP.from_gated_linears(): activation must be gated (swiglu, geglu, reglu),"
                f" got {spec!r}"
            )
        if gate.weight.shape != up.weight.shape or down.in_features != gate.out_features:
            raise ValueError(
                "FusedMLP.from_gated_linears(): expected gate and up of one shape (h, in) and"
                f" down of shape (out, h); got gate {tuple(gate.weight.shape)}, up"
                f" {tuple(up.weight.shape)}, down {tuple(down.weight.shape)}"
            )
        if (gate.bias is None) != (up.bias is None) or (gate.bias is None) != (down.bias is None):
            raise ValueError(
                "FusedMLP.from_gated_linears(): gate, up and down must all have biases or none"
            )
        model = cls(
            gate.in_features,
            [gate.out_features],
            down.out_features,
            activation=spec,
            bias=gate.bias is not None,
            device=gate.weight.device,
            dtype=gate.weight.dtype,
        )
        with torch.no_grad():
            model.layers[0].weight.copy_(torch.cat([gate.weight, up.weight]))
            model.layers[1].weight.copy_(down.weight)
            if gate.bias is not None:
                model.layers[0].bias.copy_(torch.cat([gate.bias, up.bias]))
                model.layers[1].bias.copy_(down.bias)
        return model
