"""C++/CUDA extension backend: calls the ops of nnfast._C (``torch.ops.nnfast_ext``).

nnfast._C is built by ``pip install`` (setup.py). Where it is not prebuilt (a plain source
checkout, a GPU machine), it is compiled on first use with torch.utils.cpp_extension.load + ninja
into a cache directory (``NNFAST_CACHE``, default ~/.cache/nnfast), saying so once. If that fails,
automatic selection falls back to another backend with one warning; an explicit
``backend="extension"`` raises with the compiler's message.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path

import torch
from torch import Tensor

from nnfast import _build
from nnfast.activations import TABLE, ActivationSpec

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# nnfast._C's Python module once loaded (prebuilt or JIT-built): the front end's fast path
# (csrc/fast.cpp, used by nnfast.functional); None until then, or where the build failed
fast = None


def cache_dir() -> Path:
    base = Path(os.environ.get("NNFAST_CACHE", Path.home() / ".cache" / "nnfast"))
    flavour = f"cuda{torch.version.cuda}" if _build.want_cuda() else "cpu"
    return base / f"torch{torch.__version__.split('+')[0]}-{flavour}"


def jit_build(build_dir: Path | None = None, verbose: bool = False):
    """Compile and load the extension with ninja (cached in ``build_dir``); its Python module."""
    from torch.utils import cpp_extension

    build_dir = Path(build_dir or cache_dir())
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = _build.cpu_sources()
    kwargs = {}
    if _build.want_cuda() and _build.cuda_sources():
        sources += _build.cuda_sources()
        kwargs = {
            "extra_cuda_cflags": _build.nvcc_flags(),
            "extra_include_paths": _build.cublaslt_include_dirs(),
        }
    return cpp_extension.load(
        name="nnfast_C",
        sources=sources,
        extra_cflags=_build.cxx_flags(),
        extra_ldflags=_build.link_flags() + (_build.cublaslt_link_flags() if kwargs else []),
        build_directory=str(build_dir),
        is_python_module=True,
        verbose=verbose,
        **kwargs,
    )


@functools.cache
def _load_error() -> str | None:
    """Load nnfast._C (prebuilt, else JIT-built); the reason it failed, or None."""
    if os.environ.get("NNFAST_FORCE_JIT", "0") != "1":
        try:
            import nnfast._C as module

            return _loaded(module)
        except ImportError:
            pass
    print(
        f"nnfast: compiling the C++ extension (first use; cached in {cache_dir()})...",
        file=sys.stderr,
        flush=True,
    )
    try:
        module = jit_build()
    except Exception as e:  # a compiler error, missing ninja, ...
        msg = f"building nnfast._C failed: {type(e).__name__}: {e}"
        warnings.warn(
            "nnfast: the C++ extension could not be built, so another backend is used;"
            " pass backend='extension' to see the compiler's message",
            RuntimeWarning,
            stacklevel=3,
        )
        return msg
    return _loaded(module)


def _loaded(module) -> str | None:
    global fast
    error = _register_fakes()
    if error is None:
        fast = module
    return error


def _register_fakes() -> None:
    if not hasattr(torch.ops.nnfast_ext, "dense_fwd"):
        return "nnfast._C loaded but registered no nnfast_ext ops"

    gated = {a.code for a in TABLE if a.gated_base is not None}

    @torch.library.register_fake("nnfast_ext::dense_fwd")
    def _(x, weight, bias, act, param, save_pre):
        m, rows = x.shape[0], weight.shape[0]
        n = rows // 2 if act in gated else rows
        return x.new_empty(m, n), (x.new_empty(m, rows) if save_pre else x.new_empty(0))

    @torch.library.register_fake("nnfast_ext::dense_bwd")
    def _(grad_out, x, weight, saved, act, param, needs_x, needs_w, needs_b):
        m, n = grad_out.shape
        n = 2 * n if act in gated else n
        return (
            grad_out.new_empty(m, weight.shape[1]) if needs_x else grad_out.new_empty(0),
            grad_out.new_empty(n, x.shape[1]) if needs_w else grad_out.new_empty(0),
            grad_out.new_empty(n) if needs_b else grad_out.new_empty(0),
        )

    @torch.library.register_fake("nnfast_ext::mlp_fwd")
    def _(x, weights, biases, act, param, save):
        m = x.shape[0]
        saved = [x.new_empty(m, w.shape[0]) for w in weights[:-1]] if save else []
        return x.new_empty(m, weights[-1].shape[0]), saved

    @torch.library.register_fake("nnfast_ext::mlp_bwd")
    def _(grad_out, x, weights, has_bias, saved, act, param, needs_x):
        return (
            x.new_empty(x.shape) if needs_x else x.new_empty(0),
            [w.new_empty(w.shape) for w in weights],
            [w.new_empty(w.shape[0]) if hb else w.new_empty(0) for w, hb in zip(weights, has_bias)],
        )

    return None


def unavailable() -> str | None:
    return _load_error()


def unsupported(device_type: str, dtype: torch.dtype) -> str | None:
    if dtype not in _DTYPES:
        return f"the extension backend supports float32, float64, float16 and bfloat16, got {dtype}"
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None or not _has_kernel("nnfast_ext::dense_fwd", key):
        return f"nnfast._C was built without {device_type} kernels"
    return None


@functools.cache
def _has_kernel(op: str, key: str) -> bool:
    # asked on every call; the answer is fixed once nnfast._C is loaded (it is loaded by then)
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, key)


# oneDNN inner product with the activation as a post-op: on CPU it beats GEMM + epilogue pass
# (65536x64->64 fp32 gelu: 3.0 ms vs 4.6 ms on 2 Xeon cores), but it cannot also store the
# pre-activation, and its relu/leaky_relu turn NaN into 0, so only these rows use it.
_ONEDNN = {
    "identity": ("none", ""),
    "gelu": ("gelu", "none"),
    "gelu_tanh": ("gelu", "tanh"),
    "silu": ("swish", ""),
    "sigmoid": ("sigmoid", ""),
    "tanh": ("tanh", ""),
}


def onednn_supported(x: Tensor, act: ActivationSpec, save: bool) -> bool:
    """Whether ``forward_onednn`` can run this call (inference rows of ``_ONEDNN``)."""
    return (
        not save
        and act.name in _ONEDNN
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and x.shape[1] > 0
        and torch.backends.mkldnn.is_available()
    )


def forward_onednn(
    x: Tensor, weight: Tensor, bias: Tensor | None, act: ActivationSpec, save: bool = False
) -> tuple[Tensor, Tensor]:
    """oneDNN's inner product with the activation as a post-op (see ``_ONEDNN``)."""
    attr, algorithm = _ONEDNN[act.name]
    # oneDNN reads the bias as N consecutive values: copy a strided or expanded one (N
    # elements) instead of letting it read garbage or out of bounds
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    out = torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, [], algorithm)
    return out, x.new_empty(0)


def forward_native(
    x: Tensor, weight: Tensor, bias: Tensor | None, act: ActivationSpec, save: bool
) -> tuple[Tensor, Tensor]:
    """nnfast._C's own kernels: GEMM + vectorized epilogue (CPU), cuBLASLt/addmm + epilogue (CUDA)."""
    return torch.ops.nnfast_ext.dense_fwd(x, weight, bias, act.act.code, act.param, save)


def forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, act: ActivationSpec, save: bool
) -> tuple[Tensor, Tensor]:
    # the fixed choice; the measuring dispatcher picks between the two itself
    if onednn_supported(x, act, save):
        return forward_onednn(x, weight, bias, act)
    return forward_native(x, weight, bias, act, save)


def backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    saved: Tensor,
    act: ActivationSpec,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor, Tensor]:
    return torch.ops.nnfast_ext.dense_bwd(
        grad_out, x, weight, saved, act.act.code, act.param, *needs
    )


# ---- fused MLP on the CPU (csrc/cpu/mlp.cpp) ---------------------------------------------------

MAX_FUSED_WIDTH = 256  # row blocks of this width stay in L2 with the weights beside them


def fused_mlp_supported(
    act: ActivationSpec, widths: list[int], dtype: torch.dtype, device_type: str
) -> bool:
    """Whether mlp_forward/mlp_backward take the whole stack (NNFAST_FUSED_MLP=0 turns it off)."""
    from nnfast._backends import fused_mlp_enabled

    return (
        fused_mlp_enabled()
        and device_type == "cpu"
        and not act.is_gated
        and len(widths) >= 3
        and max(widths) <= MAX_FUSED_WIDTH
        and dtype == torch.float32
        and _has_kernel("nnfast_ext::mlp_fwd", "CPU")
    )


def mlp_forward(
    x: Tensor, weights: list[Tensor], biases: list[Tensor | None], act: ActivationSpec, save: bool
) -> tuple[Tensor, list[Tensor]]:
    return torch.ops.nnfast_ext.mlp_fwd(x, weights, biases, act.act.code, act.param, save)


def mlp_backward(
    grad_out: Tensor,
    x: Tensor,
    weights: list[Tensor],
    has_bias: list[bool],
    saved: list[Tensor],
    act: ActivationSpec,
    needs_x: bool,
) -> tuple[Tensor | None, list[Tensor], list[Tensor | None]]:
    gx, gws, gbs = torch.ops.nnfast_ext.mlp_bwd(
        grad_out, x, weights, has_bias, saved, act.act.code, act.param, needs_x
    )
    return (gx if needs_x else None), gws, [gb if hb else None for gb, hb in zip(gbs, has_bias)]
