"""Backend registry and selection: explicit argument > NNFAST_BACKEND > automatic.

A backend is a module with:

- ``unavailable() -> str | None``: why it cannot run at all on this machine (None when it can);
- ``unsupported(device_type, dtype) -> str | None``: why it cannot run tensors of this device type
  and dtype;
- ``forward(x, weight, bias, act, save) -> (out, pre)``: x ``(M, K)`` (any strides), weight
  ``(N, K)``, bias ``(N,)`` or None; ``pre`` is the pre-activation when ``save`` is true, else an
  empty tensor;
- ``backward(grad_out, x, weight, saved, act, needs) -> (grad_x, grad_w, grad_b)``: ``saved`` is the
  output or the pre-activation (``act.from_output``); gradients not in ``needs`` may be None.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

NAMES: tuple[str, ...] = ("reference", "triton", "extension")
ENV_VAR = "NNFAST_BACKEND"
_ENCODED: dict[str, object] = {}


def getenv(name: str) -> str | None:
    """``os.environ.get(name)``, as set now, for the per-call path: os.environ.get encodes its key
    on every call (~1.5 us on a slow core, a tenth of a small layer's whole call)."""
    key = _ENCODED.get(name)
    if key is None:
        key = _ENCODED[name] = os.environ.encodekey(name)
    value = os.environ._data.get(key)
    return None if value is None else os.environ.decodevalue(value)


def env_backend() -> str | None:
    """NNFAST_BACKEND's value as set now (None when unset or empty)."""
    return getenv(ENV_VAR) or None


# Automatic choice, best first, by device type.
_AUTO: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "extension", "reference"),
    "cpu": ("extension", "reference"),
}


def fused_mlp_enabled() -> bool:
    """NNFAST_FUSED_MLP=0 makes every backend run MLPs layer by layer."""
    return getenv("NNFAST_FUSED_MLP") != "0"


_MODULES: dict[str, ModuleType] = {}


def get(name: str) -> ModuleType:
    """The backend module called ``name`` (imported on first use: triton is slow to import)."""
    module = _MODULES.get(name)
    if module is None:
        if name not in NAMES:
            raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(NAMES)}")
        module = _MODULES[name] = importlib.import_module(f"nnfast._backends.{name}")
    return module


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine."""
    return [n for n in NAMES if get(n).unavailable() is None]


def why_not(name: str, device_type: str, dtype: torch.dtype) -> str | None:
    """Why backend ``name`` cannot run these inputs, or None when it can."""
    backend = get(name)
    return backend.unavailable() or backend.unsupported(device_type, dtype)


# A constant for torch.compile: traced once per (request, device type, dtype), so the choice costs
# nothing in compiled graphs (NNFAST_BACKEND is read at trace time there).
@torch.compiler.assume_constant_result
def select(requested: str | None, device_type: str, dtype: torch.dtype) -> str:
    """Pick the backend for one call; an explicit request that cannot run raises and says why."""
    source = "backend="
    if requested is None and env_backend():
        requested, source = env_backend(), f"{ENV_VAR}="
    if requested is not None:
        name = requested.strip().lower()
        if name not in NAMES:
            raise ValueError(
                f"{source}{requested!r} is not a backend; expected one of {', '.join(NAMES)}"
            )
        reason = why_not(name, device_type, dtype)
        if reason is not None:
            raise RuntimeError(f"{source}{requested!r} cannot run these inputs: {reason}")
        return name
    order = _AUTO.get(device_type, ("reference",))
    if device_type == "cuda" and dtype == torch.float32 and not get("triton").tf32_enabled():
        # float32 without TF32: cuBLAS's SIMT GEMMs (the extension) rather than Triton's small
        # ieee tiles, which exist so that backend="triton" works but are not tuned for speed
        order = ("extension", "triton", "reference")
    for name in order:
        if why_not(name, device_type, dtype) is None:
            return name
    return "reference"
