"""``nnfast.fuse(model)``: run every dense layer whose output feeds only an activation as one nnfast op.

Recognised by structure, not by class name:

- ``nn.Sequential`` runs: ``Linear, act`` becomes one ``FusedDense``; a Sequential that is exactly
  ``Linear, act, Linear, act, ..., Linear`` (one activation) runs as one ``nnfast.mlp`` call.
- Any other module that owns a dense layer and an activation (a transformer feed-forward block:
  BERT/ViT ``intermediate``, CLIP/OPT ``fc1 -> act -> fc2``, Llama/Gemma/Mistral ``act(gate_proj(x))
  * up_proj(x)``, T5 ``wi -> act``, GPT-2's ``Conv1D`` ``c_fc -> act``, timm's ``Mlp``): the pair is
  rewritten, then the module's own forward is run on random inputs before and after, in the module's
  training mode with the same random state (so a dropout between the two tells) and in eval mode;
  if any output changes the rewrite is undone and the pair is reported as left, with the reason.
- A block with one stacked gate-up projection and a down projection (Phi-3's ``down_proj(up *
  act(gate))``) runs as nnfast's gated op on the stacked weight as stored (``FusedGatedBlock``),
  proven by the same probe.
- Activations are recognised by what they compute (on a grid of values, against every row of
  nnfast's activation table), so transformers' ``GELUActivation``, ``NewGELUActivation``,
  ``PytorchGELUTanh``, ``QuickGELUActivation``, ... are known without importing transformers.

Nothing is lost: the fused layers hold the very same Parameter objects (an optimizer built before
``fuse`` keeps working), ``state_dict()`` keys are unchanged (the activation's place holds an
``nn.Identity``), no weight is copied per call (GPT-2's transposed ``Conv1D`` weight is passed as a
strided view), and ``nnfast.unfuse(model)`` puts the original modules back.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from nnfast._backends import chooser
from nnfast.activations import TABLE, ActivationSpec, resolve
from nnfast.functional import dense, mlp
from nnfast.modules import FusedDense

_REPORT_ATTR = "_nnfast_fuse_report"


@dataclass
class Entry:
    path: str  # where in the module tree
    pattern: str  # what was found, e.g. "Linear + GELUActivation"
    fused: bool
    detail: str  # what it became, or why it was left

    def row(self) -> str:
        status = "fused" if self.fused else "left"
        return f"| {self.path or '(model)'} | {self.pattern} | {status} | {self.detail} |"


class FuseReport(list):
    """What ``fuse`` fused and what it left, with the reason; ``str()`` is a markdown table."""

    @property
    def fused(self) -> list[Entry]:
        return [e for e in self if e.fused]

    @property
    def left(self) -> list[Entry]:
        return [e for e in self if not e.fused]

    def __str__(self) -> str:
        head = f"nnfast.fuse: {len(self.fused)} fused, {len(self.left)} left"
        lines = ["| module | found | result | detail |", "|---|---|---|---|"]
        return "\n".join([head, "", *lines, *(e.row() for e in self)])


# ---- recognising activations by what they compute -----------------------------------------------

_PROBE = torch.cat([torch.linspace(-8, 8, 801, dtype=torch.float64), torch.tensor([0.0])])


def activation_of(module: nn.Module) -> ActivationSpec | None:
    """The table row a module computes (elementwise, on float64 values), or None."""
    if module._modules:
        return None  # a block, not an activation
    try:
        spec = resolve(module)  # torch's own modules, including leaky_relu's slope
    except ValueError:
        spec = None
    if spec is not None:
        return None if spec.is_identity else spec
    if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
        return None  # learnable activations (PReLU, ...) are not in the table
    x = _PROBE.clone()
    try:
        with torch.no_grad():
            y = module(x)
    except Exception:
        return None
    if not isinstance(y, Tensor) or y.shape != x.shape or not torch.equal(x, _PROBE):
        return None  # not elementwise, or in place
    for row in TABLE:
        if row.gated_base is not None or row.code == 0:
            continue
        want = row.fn(x, row.default_param)
        if torch.allclose(y.double(), want, rtol=1e-9, atol=1e-12):
            return ActivationSpec(row, row.default_param)
    return None


# ---- the fused modules ---------------------------------------------------------------------------


def _share(linear: nn.Linear, spec: ActivationSpec) -> FusedDense:
    """A FusedDense holding ``linear``'s own Parameter objects (nothing copied)."""
    layer = FusedDense.__new__(FusedDense)
    nn.Module.__init__(layer)
    layer.in_features, layer.out_features = linear.in_features, linear.out_features
    layer.weight = linear.weight
    layer.register_parameter("bias", linear.bias)
    layer.activation = spec
    layer.train(linear.training)
    object.__setattr__(layer, "_nnfast_original", linear)  # not a submodule: no new keys
    return layer


class FusedConv1D(nn.Module):
    """transformers' GPT-2 ``Conv1D`` (y = x @ W + b, W stored (in, out)) with an activation, run
    as ``nnfast.dense`` on the transposed weight view: same parameters, same keys, no copy."""

    def __init__(self, conv: nn.Module, spec: ActivationSpec) -> None:
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.nf = conv.nf
        self.activation = spec
        object.__setattr__(self, "_nnfast_original", conv)

    def forward(self, x: Tensor) -> Tensor:
        return dense(x, self.weight.t(), self.bias, self.activation)

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.weight.shape[0]}, activation={self.activation!r}"


class FusedAway(nn.Identity):
    """Where an activation was: it now runs inside the dense layer named here."""

    def __init__(self, original: nn.Module, into: str) -> None:
        super().__init__()
        self.into = into
        object.__setattr__(self, "_nnfast_original", original)

    def extra_repr(self) -> str:
        return f"fused into {self.into}"


_GATED = {"silu": "swiglu", "gelu": "geglu", "relu": "reglu"}


class FusedGatedBlock(nn.Module):
    """A feed-forward block with one stacked gate-up projection (gate rows, then up rows) and a
    down projection, ``down(act(gate) * up)`` (Phi-3), run as nnfast's gated op on the stacked
    weight as stored; the block's own modules stay its children under their names (same keys)."""

    def __init__(self, block: nn.Module, up: str, down: str, spec: ActivationSpec) -> None:
        super().__init__()
        for name, child in block._modules.items():
            self._modules[name] = child
        self.up_name, self.down_name, self.activation = up, down, spec
        object.__setattr__(self, "_nnfast_original", block)

    def forward(self, x: Tensor) -> Tensor:
        up = self._modules[self.up_name]
        return self._modules[self.down_name](dense(x, up.weight, up.bias, self.activation))

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


def _gated_block(path: str, parent: nn.Module, name: str, report: FuseReport) -> bool:
    """A child block of exactly (stacked gate-up Linear, down Linear, activation) whose forward is
    down(act(gate) * up), as the probe shows: replaced by a FusedGatedBlock. True if fused."""
    block = parent._modules[name]
    children = [(n, m) for n, m in block._modules.items() if m is not None]
    linears = [(n, m) for n, m in children if _is_linear(m) and not _wrapped(m)]
    acts = [(n, activation_of(m)) for n, m in children if not _is_linear(m)]
    if len(children) != 3 or len(linears) != 2 or len(acts) != 1 or _wrapped(block):
        return False
    spec = acts[0][1]
    if spec is None or spec.name not in _GATED:
        return False
    gated = resolve(_GATED[spec.name])
    for (up_name, up), (down_name, down) in (linears, linears[::-1]):
        if up.out_features != 2 * down.in_features:
            continue
        x = torch.randn(2, 3, up.in_features, dtype=up.weight.dtype, device=up.weight.device)
        fused = FusedGatedBlock(block, up_name, down_name, gated)
        try:
            if not _same(_probe_outputs(fused, x), _probe_outputs(block, x)):
                continue
        except Exception:  # noqa: BLE001 - not this structure
            continue
        parent._modules[name] = fused
        where = f"{path}.{name}".lstrip(".")
        report.append(
            Entry(
                where,
                f"{type(block).__name__} (stacked gate-up)",
                True,
                f"FusedGatedBlock({gated!r})",
            )
        )
        return True
    return False


class FusedSequential(nn.Sequential):
    """An ``nn.Sequential`` of ``FusedDense`` layers (activations fused, ``FusedAway`` between
    them) that runs as one ``nnfast.mlp`` call; layer by layer when anything wraps its layers."""

    def forward(self, x: Tensor) -> Tensor:
        layers = [m for m in self if isinstance(m, FusedDense)]
        if any(m._forward_hooks or m._forward_pre_hooks for m in self) or any(
            type(m) not in (FusedDense, FusedAway) for m in self
        ):
            return super().forward(x)
        act = layers[0].activation
        return mlp(x, [m.weight for m in layers], [m.bias for m in layers], act)


# ---- fuse / unfuse -------------------------------------------------------------------------------


def _is_linear(m: nn.Module) -> bool:
    return type(m) is nn.Linear


def _is_conv1d(m: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D, by what it holds (no import of transformers)
    w = getattr(m, "weight", None)
    return (
        type(m).__name__ == "Conv1D"
        and isinstance(w, nn.Parameter)
        and w.dim() == 2
        and getattr(m, "nf", None) == w.shape[1]
    )


def _in_features(m: nn.Module) -> int:
    return m.in_features if _is_linear(m) else m.weight.shape[0]


def _wrapped(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks)


def _replace(parent: nn.Module, name: str, new: nn.Module) -> None:
    parent._modules[name] = new


def _fused_layer(m: nn.Module, spec: ActivationSpec) -> nn.Module:
    return _share(m, spec) if _is_linear(m) else FusedConv1D(m, spec)


def _sequential(path: str, seq: nn.Sequential, report: FuseReport) -> None:
    items = list(seq._modules.items())
    specs = [activation_of(m) for _, m in items]
    # the whole Sequential as one MLP: Linear, act, Linear, act, ..., Linear, one activation
    lin = [m for _, m in items[0::2]]
    acts = specs[1::2]
    if (
        len(items) >= 3
        and len(items) % 2 == 1
        and all(_is_linear(m) and not _wrapped(m) for m in lin)
        and all(a is not None and a == acts[0] for a in acts)
        and not any(_wrapped(m) for _, m in items[1::2])
        and all(a.out_features == b.in_features for a, b in zip(lin, lin[1:]))
        and len({(m.weight.dtype, m.weight.device) for m in lin}) == 1
        and len({m.bias is None for m in lin}) == 1
    ):
        for i, (name, m) in enumerate(items):
            if i % 2 == 0:
                _replace(seq, name, _share(m, acts[0] if i < len(items) - 1 else resolve(None)))
            else:
                _replace(seq, name, FusedAway(m, f"{path}.{items[i - 1][0]}".lstrip(".")))
        object.__setattr__(seq, "_nnfast_class", type(seq))
        seq.__class__ = FusedSequential
        report.append(
            Entry(path, f"Sequential MLP, {len(lin)} Linear + {acts[0]!r}", True, "nnfast.mlp")
        )
        return
    for i, ((name, m), (act_name, a)) in enumerate(zip(items, items[1:])):
        spec = specs[i + 1]
        if not (_is_linear(m) or _is_conv1d(m)) or spec is None:
            continue
        where = f"{path}.{name}".lstrip(".")
        pattern = f"{type(m).__name__} + {type(a).__name__}"
        if _wrapped(m) or _wrapped(a):
            report.append(Entry(where, pattern, False, "hooks on the layer or activation"))
            continue
        fused = _fused_layer(m, spec)
        _replace(seq, name, fused)
        _replace(seq, act_name, FusedAway(a, where))
        report.append(Entry(where, pattern, True, f"{type(fused).__name__}({spec!r})"))


def _probe_outputs(module: nn.Module, x: Tensor) -> list:
    """The module's outputs on x in its training mode (a fixed random state) and in eval mode,
    with its buffers restored afterwards (batch-norm statistics must not move)."""
    buffers = {n: b.detach().clone() for n, b in module.named_buffers()}
    modes = {m: m.training for m in module.modules()}
    outs = []
    try:
        with torch.no_grad(), chooser.fixed():  # no dispatcher decisions at the probe's shape
            for train in (True, False):
                for m, was in modes.items():
                    m.train(was and train)
                with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
                    torch.manual_seed(1234)
                    outs.append(module(x))
    finally:
        for m, was in modes.items():
            m.train(was)
        with torch.no_grad():
            for n, b in module.named_buffers():
                b.copy_(buffers[n])
    return outs


def _same(a, b) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        scale = b.detach().double().abs().max().item() if b.numel() else 0.0
        tol = {torch.float64: 1e-9, torch.float32: 2e-5}.get(b.dtype, 2e-2)
        return bool(((a.double() - b.double()).abs().max() <= tol * max(scale, 1.0)).item())
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b):
        return all(_same(u, v) for u, v in zip(a, b))
    if hasattr(a, "to_tuple") and hasattr(b, "to_tuple"):  # transformers ModelOutput
        return _same(a.to_tuple(), b.to_tuple())
    return a == b


def _block(path: str, module: nn.Module, report: FuseReport) -> None:
    """Pairs (dense layer, activation) among a module's children, each checked by a probe."""
    children = [(n, m) for n, m in module._modules.items() if m is not None]
    layers = [(n, m) for n, m in children if _is_linear(m) or _is_conv1d(m)]
    names = {n for n, _ in layers}
    for act_name, act in children:
        spec = None if act_name in names else activation_of(act)
        if spec is None:
            continue
        where = f"{path}.{act_name}".lstrip(".")
        pattern = f"{type(act).__name__} ({spec!r})"
        reason = (
            "hooks on the activation"
            if _wrapped(act)
            else _pair(path, module, act_name, spec, report)
        )
        if reason is None:
            continue
        report.append(Entry(where, pattern, False, reason))


def _pair(path, module: nn.Module, act_name: str, spec: ActivationSpec, report) -> str | None:
    """Fuses the activation child ``act_name`` into the one dense child whose output it alone
    takes, as the module's probe proves; None when done, else why it was left."""
    act = module._modules[act_name]
    reason = "no dense layer of this module feeds it alone (the probe of its forward changed)"
    for name, layer in list(module._modules.items()):
        if layer is None or not (_is_linear(layer) or _is_conv1d(layer)):
            continue
        where = f"{path}.{name}".lstrip(".")
        if _wrapped(layer):
            reason = f"hooks on {where}"
            continue
        x = torch.randn(
            2, 3, _in_features(layer), dtype=layer.weight.dtype, device=layer.weight.device
        )
        try:
            before = _probe_outputs(module, x)
        except Exception as e:  # noqa: BLE001 - a forward that cannot be probed is left alone
            return f"{type(module).__name__}.forward(x) could not be probed: {type(e).__name__}"
        fused = _fused_layer(layer, spec)
        _replace(module, name, fused)
        _replace(module, act_name, FusedAway(act, where))
        try:
            if _same(_probe_outputs(module, x), before):
                pattern = f"{type(layer).__name__} + {type(act).__name__}"
                report.append(Entry(where, pattern, True, f"{type(fused).__name__}({spec!r})"))
                return None
        except Exception:  # noqa: BLE001, S110 - this pair is not act(layer(x)): undo, try the next
            pass
        _replace(module, name, layer)
        _replace(module, act_name, act)
    return reason


def fuse(model: nn.Module, *, verbose: bool = False) -> nn.Module:
    """Rewrites ``model`` in place so that each dense layer followed only by an activation runs as
    one nnfast op, and returns it. ``nnfast.fuse_report(model)`` (or ``verbose=True``) tells what
    was fused and what was left, with the reason; ``nnfast.unfuse(model)`` undoes it."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse(): expected an nn.Module, got {type(model).__name__}")
    report = FuseReport()
    for path, module in list(model.named_modules()):
        for name in list(module._modules):  # blocks replaced whole first (stacked gated blocks)
            child = module._modules[name]
            if child is not None and type(child) is not nn.Sequential and child._modules:
                _gated_block(path, module, name, report)
    for path, module in list(model.named_modules()):
        if isinstance(
            module, (FusedDense, FusedConv1D, FusedAway, FusedSequential, FusedGatedBlock)
        ):
            continue
        if type(module) is nn.Sequential:
            _sequential(path, module, report)
        elif module._modules:
            _block(path, module, report)
    previous = getattr(model, _REPORT_ATTR, None) or FuseReport()
    object.__setattr__(model, _REPORT_ATTR, FuseReport([*previous, *report]))
    if not report.fused and not previous:
        warnings.warn(
            "nnfast.fuse(): nothing was fused: no dense layer (nn.Linear, GPT-2 Conv1D) feeds only"
            " an activation nnfast has (see nnfast.fuse_report(model) for what was found)",
            stacklevel=2,
        )
    if verbose:
        print(report)
    return model


def fuse_report(model: nn.Module) -> FuseReport:
    """What ``fuse`` did to this model (empty if it was never fused)."""
    return getattr(model, _REPORT_ATTR, None) or FuseReport()


def unfuse(model: nn.Module) -> nn.Module:
    """Puts back the modules ``fuse`` replaced (the same objects, holding the same parameters)."""
    for module in list(model.modules()):
        for name, child in list(module._modules.items()):
            original = getattr(child, "_nnfast_original", None)
            if original is not None:
                module._modules[name] = original
        cls = module.__dict__.pop("_nnfast_class", None)
        if cls is not None:
            module.__class__ = cls
    model.__dict__.pop(_REPORT_ATTR, None)
    return model
