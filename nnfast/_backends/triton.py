"""Triton backend: launches the kernels in ``nnfast.kernels.dense``.

Runs CUDA tensors, or CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``, set before
Triton is imported), which is how it is tested on machines without a GPU.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from nnfast.activations import ActivationSpec

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


@functools.cache
def _import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising anything else
        return f"triton cannot be imported ({type(e).__name__}: {e}); install it with pip install triton"
    return None


def unavailable() -> str | None:
    reason = _import_error()
    if reason is not None:
        return reason
    if not _interpreting() and not torch.cuda.is_available():
        return (
            "Triton kernels need a CUDA GPU and none is available; set TRITON_INTERPRET=1 before"
            " importing triton to run them on CPU tensors with the (slow) interpreter"
        )
    return None


def unsupported(device_type: str, dtype: torch.dtype) -> str | None:
    if device_type != "cuda" and not (_interpreting() and device_type == "cpu"):
        return (
            f"the triton backend runs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got"
            f" {device_type} tensors"
        )
    if dtype not in _DTYPES:
        return f"the triton backend supports float32, float16 and bfloat16, got {dtype}"
    return None


def tf32_enabled() -> bool:
    """Whether float32 matmuls may use TF32, as torch.mm decides it: the newer
    ``fp32_precision`` settings when set (reading the legacy ``allow_tf32`` after them raises on
    recent torch), else the legacy flag."""
    matmul = torch.backends.cuda.matmul
    new = getattr(matmul, "fp32_precision", None)
    if new is None:  # torch without the fp32_precision API
        return bool(matmul.allow_tf32)
    if new == "none":  # inherit the global setting
        new = getattr(torch.backends, "fp32_precision", "none")
    if new != "none":
        return new == "tf32"
    return bool(matmul.allow_tf32)


def _input_precision(dtype: torch.dtype) -> str:
    # float32 honours PyTorch's TF32 setting, as torch.mm does.
    if dtype == torch.float32 and not tf32_enabled():
        return "ieee"
    return "tf32"


def _kernel_module():
    """nnfast.kernels.dense: installed (setup.py maps kernels/ there) or, in a plain source
    checkout on sys.path, loaded from the repository's kernels/ folder."""
    import importlib
    import importlib.util
    import sys
    from pathlib import Path

    try:
        return importlib.import_module("nnfast.kernels.dense")
    except ModuleNotFoundError:
        folder = Path(__file__).resolve().parents[2] / "kernels"
        spec = importlib.util.spec_from_file_location(
            "nnfast.kernels", folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules["nnfast.kernels"] = package
        sys.modules["nnfast"].kernels = package
        spec.loader.exec_module(package)
        return importlib.import_module("nnfast.kernels.dense")


def _autotune() -> bool:
    # NNFAST_TRITON_AUTOTUNE=0 uses one fixed config: the GPU test suite sets it, since tuning
    # every (activation, dtype, shape) it meets would take longer than the tests themselves.
    return not _interpreting() and os.environ.get("NNFAST_TRITON_AUTOTUNE", "1") != "0"


# ---- tile configurations and the one launch point ----------------------------------------------
#
# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps). Forward: Triton tutorial 03's tiles plus small-M
# tiles (M <= 64 is common in inference). Backward: BLOCK_N is the reduction (out_features), BLOCK_K
# the grad_x columns. Every candidate is compiled before it is tried and dropped when it needs more
# shared memory than the device has per block or spills registers (``_prune``), so a gated layer
# never inherits a tile that only fits the plain one; tools/check_triton.py compiles them all for
# sm_90 and sm_80 and shows which survive.
TILES = {
    # the first four span large to small M, for bounded tuning (NNFAST_TRITON_AUTOTUNE=4)
    "fwd": (
        (128, 256, 64, 3, 8),
        (128, 128, 32, 4, 4),
        (64, 64, 64, 4, 4),
        (16, 128, 64, 4, 4),
        (256, 128, 64, 3, 8),
        (128, 128, 64, 4, 8),
        (64, 256, 32, 4, 4),
        (128, 64, 32, 4, 4),
        (64, 128, 32, 4, 4),
        (32, 64, 64, 5, 2),
        (16, 64, 128, 4, 4),
    ),
    "bwd": (
        (128, 64, 128, 3, 8),
        (64, 64, 128, 4, 4),
        (32, 64, 64, 4, 4),
        (16, 64, 64, 4, 4),
        (128, 32, 128, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 32, 64, 4, 4),
    ),
}
# float32 without TF32 (input_precision="ieee") is another kernel: FMA loops whose operands live
# in registers. The big tensor-core tiles spilled 9-150 KB per thread there (and took 7-100 s to
# compile), so it gets small tiles of its own. Automatic selection sends such float32 to the
# extension (cuBLAS) on CUDA; these serve backend="triton".
TILES_IEEE = {
    "fwd": ((32, 32, 32, 3, 4), (64, 32, 32, 3, 4), (32, 64, 32, 3, 4), (16, 64, 32, 3, 4)),
    "bwd": ((32, 32, 32, 3, 4), (64, 32, 32, 3, 4), (32, 32, 64, 3, 4), (16, 32, 32, 3, 4)),
}
# NNFAST_TRITON_AUTOTUNE=0 (and the interpreter): one tile that fits every variant.
FIXED_TILE = (64, 64, 32, 3, 4)
INTERPRETER_TILE = (32, 32, 32, 1, 4)
# Autotuning keys: every constexpr that changes resource use, and M rounded up to a power of two,
# so that a growing batch does not re-tune on every new size (dtypes are added by Triton).
KEYS = {
    "fwd": ["M_BUCKET", "N", "K", "ACT", "HAS_BIAS", "STORE_PRE", "GATED", "INPUT_PRECISION"],
    "bwd": [
        "M_BUCKET",
        "N",
        "K",
        "ACT",
        "COMPUTE_GX",
        "STORE_GP",
        "HAS_BIAS",
        "GATED",
        "INPUT_PRECISION",
    ],
}
# Spills (bytes per thread) above which a tile is not used: a few hundred bytes of local memory
# stay in L1; tens of KB made the fp32 kernels crawl.
MAX_SPILL_BYTES = 256


def tile_meta(tile: tuple) -> dict:
    """A tile tuple as the kernels' meta-parameters and launch options."""
    bm, bn, bk, stages, warps = tile
    return {
        "BLOCK_M": bm,
        "BLOCK_N": bn,
        "BLOCK_K": bk,
        "GROUP_M": 8,
        "num_stages": stages,
        "num_warps": warps,
    }


def candidate_tiles(kind: str, precision: str) -> tuple:
    """The tiles a launch of ``kind`` ("fwd"/"bwd") may use: autotuned over, or the fixed one."""
    if _interpreting():
        return (INTERPRETER_TILE,)
    if not _autotune():
        return (FIXED_TILE,)
    tiles = (TILES_IEEE if precision == "ieee" else TILES)[kind]
    limit = os.environ.get("NNFAST_TRITON_AUTOTUNE", "1")
    # an integer above 1 bounds tuning to that many candidates, first listed first
    return tiles[: int(limit)] if limit.isdigit() and int(limit) > 1 else tiles


def m_bucket(m: int) -> int:
    return 1 << max(0, (m - 1).bit_length())


def fits(shared_bytes: int, spill_bytes: int | None, max_shared: int) -> bool:
    """Whether a compiled tile can run well: within the block's shared memory, not spilling."""
    return shared_bytes <= max_shared and (spill_bytes or 0) <= MAX_SPILL_BYTES


def _prune(kernel, configs, named_args, **kwargs):
    """early_config_prune: compile each candidate (Triton caches it for the timing runs) and keep
    those that fit this device."""
    import triton

    args = {k: v for k, v in {**named_args, **kwargs}.items() if k in kernel.arg_names}
    device = next(v for v in args.values() if isinstance(v, Tensor)).device
    props = triton.runtime.driver.active.utils.get_device_properties(device.index or 0)
    keep = []
    for config in configs:
        compiled = kernel.warmup(**args, **config.all_kwargs(), grid=(1,))
        try:
            compiled._init_handles()  # loads the cubin: registers and spills become known
            spills = compiled.n_spills
        except Exception:  # a Triton without these attributes: judge by shared memory alone
            spills = None
        if fits(compiled.metadata.shared, spills, props["max_shared_mem"]):
            keep.append(config)
    # none fits: the fixed tile, which tools/check_triton.py checks fits every variant
    return keep or [_config(FIXED_TILE)]


def _config(tile: tuple):
    import triton

    meta = tile_meta(tile)
    stages, warps = meta.pop("num_stages"), meta.pop("num_warps")
    return triton.Config(meta, num_stages=stages, num_warps=warps)


@functools.cache
def _tuner(kind: str, precision: str):
    import triton

    k = _kernel_module()
    kernel = k.dense_fwd_kernel if kind == "fwd" else k.dense_bwd_kernel
    return triton.autotune(
        [_config(t) for t in candidate_tiles(kind, precision)],
        key=KEYS[kind],
        # the bias partials accumulate into a zeroed buffer: restore it after each timed config
        restore_value=["gb_ptr"] if kind == "bwd" else None,
        prune_configs_by={"early_config_prune": functools.partial(_prune, kernel)},
    )(kernel)


def launch(kind: str, grid, args: dict) -> None:
    """Every dense-kernel launch goes through here: the fixed tile, or autotuned over the
    candidates that fit. tools/check_triton.py replaces it with a recorder to learn every variant
    the backend launches."""
    tiles = candidate_tiles(kind, args["INPUT_PRECISION"])
    args = {**args, "M_BUCKET": m_bucket(args["M"])}
    if len(tiles) == 1:
        k = _kernel_module()
        kernel = k.dense_fwd_kernel if kind == "fwd" else k.dense_bwd_kernel
        kernel[grid](**args, **tile_meta(tiles[0]))
    else:
        _tuner(kind, args["INPUT_PRECISION"])[grid](**args)


def launch_mlp(kind: str, grid, args: list, meta: dict) -> None:
    """Every fused-MLP kernel launch goes through here (see ``launch``)."""
    _kernel_module()  # makes nnfast.kernels importable from a source checkout
    from nnfast.kernels import mlp as k

    kernel = k.mlp_fused_fwd_kernel if kind == "mlp_fwd" else k.mlp_fused_bwd_kernel
    kernel[grid](*args, **meta)


def _min_block_m(kind: str, precision: str) -> int:
    return min(t[0] for t in candidate_tiles(kind, precision))


def forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, act: ActivationSpec, save: bool
) -> tuple[Tensor, Tensor]:
    import triton

    (m, k), rows = x.shape, weight.shape[0]
    n = act.out_features(rows)
    out = x.new_empty(m, n)
    pre = x.new_empty(m, rows) if save else x.new_empty(0)
    if m == 0 or n == 0:
        return out, pre
    if k == 0:  # nothing to multiply: f(bias)
        z = x.new_zeros(m, rows) if bias is None else bias.expand(m, rows)
        out.copy_(act(z))
        if save:
            pre.copy_(z)
        return out, pre
    launch(
        "fwd",
        lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),),
        dict(
            x_ptr=x,
            w_ptr=weight,
            b_ptr=bias if bias is not None else out,
            out_ptr=out,
            pre_ptr=pre if save else out,
            M=m,
            N=n,
            K=k,
            stride_xm=x.stride(0),
            stride_xk=x.stride(1),
            stride_wn=weight.stride(0),
            stride_wk=weight.stride(1),
            stride_b=bias.stride(0) if bias is not None else 0,
            param=act.param,
            ACT=act.base.act.code,
            HAS_BIAS=bias is not None,
            STORE_PRE=save,
            GATED=act.is_gated,
            INPUT_PRECISION=_input_precision(x.dtype),
        ),
    )
    return out, pre


def backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    saved: Tensor,
    act: ActivationSpec,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    import triton

    need_x, need_w, need_b = needs
    m, n = grad_out.shape
    k = weight.shape[1] if need_x else x.shape[1]
    if act.is_identity or m == 0 or n == 0 or k == 0:
        gp = grad_out if act.is_identity else _reference_grad_pre(grad_out, saved, act)
        grad_x = gp @ weight if need_x else None
        grad_b = gp.sum(0) if need_b else None
    else:
        precision = _input_precision(grad_out.dtype)
        min_bm = _min_block_m("bwd", precision)
        rows = 2 * n if act.is_gated else n  # weight rows: gate and up rows for gated layers
        grad_x = grad_out.new_empty(m, k) if need_x else None
        gp = grad_out.new_empty(m, rows) if need_w else None
        partial = (
            torch.zeros(triton.cdiv(m, min_bm), rows, device=grad_out.device, dtype=torch.float32)
            if need_b
            else None
        )
        placeholder = grad_out
        launch(
            "bwd",
            lambda meta: (
                triton.cdiv(m, meta["BLOCK_M"])
                * (triton.cdiv(k, meta["BLOCK_K"]) if need_x else 1),
            ),
            dict(
                go_ptr=grad_out,
                s_ptr=saved,
                w_ptr=weight if need_x else placeholder,
                gx_ptr=grad_x if need_x else placeholder,
                gp_ptr=gp if need_w else placeholder,
                gb_ptr=partial if need_b else placeholder,
                M=m,
                N=n,
                K=k,
                stride_gom=grad_out.stride(0),
                stride_gon=grad_out.stride(1),
                stride_wn=weight.stride(0) if need_x else 0,
                stride_wk=weight.stride(1) if need_x else 0,
                param=act.param,
                ACT=act.base.act.code,
                COMPUTE_GX=need_x,
                STORE_GP=need_w,
                HAS_BIAS=need_b,
                GATED=act.is_gated,
                INPUT_PRECISION=precision,
            ),
        )
        grad_b = partial.sum(0).to(grad_out.dtype) if need_b else None
    # grad_w = grad_pre^T @ x through cuBLAS: a reduction over M (the long batch dimension), where
    # cuBLAS picks split-K itself; a Triton version is to be measured against it on a GPU.
    grad_w = gp.t() @ x if need_w else None
    return grad_x, grad_w, grad_b


def _reference_grad_pre(grad_out: Tensor, saved: Tensor, act: ActivationSpec) -> Tensor:
    from nnfast._backends.reference import grad_pre

    return grad_pre(grad_out, saved, act)


# ---- fully fused small-width MLP (kernels/mlp.py) ---------------------------------------------

MAX_FUSED_WIDTH = 128  # widest layer (in, hidden or out) that still fits one tile in registers


def _padded(width: int) -> int:
    return max(16, triton_next_power_of_2(width))


def triton_next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def fused_mlp_supported(
    act: ActivationSpec, widths: list[int], dtype: torch.dtype, device_type: str
) -> bool:
    """Whether mlp_forward/mlp_backward take the whole stack (NNFAST_FUSED_MLP=0 turns it off)."""
    from nnfast._backends import fused_mlp_enabled

    return (
        fused_mlp_enabled()
        and not act.is_gated
        and 3 <= len(widths) <= 10  # 2 to 9 layers: up to 8 hidden layers' saved pointers
        and max(widths) <= MAX_FUSED_WIDTH
        and dtype in _DTYPES
        # float32 without TF32: the whole-MLP tiles spill registers (9-150 KB per thread at
        # widths 64-128), so such MLPs run layer by layer with the small ieee tiles instead
        and (_interpreting() or _input_precision(dtype) != "ieee")
    )


def _fused_block_m(p: int) -> int:
    if _interpreting():
        return 32
    return 128 if p <= 64 else 64  # 128x128 fp32 tiles at P=128 would spill registers


def _mlp_programs(blocks: int, layers: int, p: int, device: torch.device) -> int:
    """Programs of the persistent MLP backward: enough to fill the GPU (4 per SM), no more than
    row blocks, and few enough that their float32 gradient slots stay under 64 MiB."""
    if device.type != "cuda":  # the interpreter (or tools/check_triton.py's recording)
        return max(1, min(blocks, 4))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    cap = max(1, (64 << 20) // (layers * p * p * 4))
    return max(1, min(blocks, 4 * sms, cap))


def _pack(weights: list[Tensor], biases: list[Tensor | None], p: int):
    w_all = weights[0].new_zeros(len(weights), p, p)
    b_all = weights[0].new_zeros(len(weights), p)
    for i, (w, b) in enumerate(zip(weights, biases)):
        w_all[i, : w.shape[0], : w.shape[1]] = w
        if b is not None:
            b_all[i, : b.shape[0]] = b
    return w_all, b_all


def _slots(saved: list[Tensor], placeholder: Tensor) -> list:
    """The kernels' eight saved-tensor pointers and eight widths (placeholders past the end)."""
    from nnfast.kernels.mlp import MAX_HIDDEN

    pad = MAX_HIDDEN - len(saved)
    return [*saved, *[placeholder] * pad, *[t.shape[1] for t in saved], *[1] * pad]


def mlp_forward(
    x: Tensor, weights: list[Tensor], biases: list[Tensor | None], act: ActivationSpec, save: bool
) -> tuple[Tensor, list[Tensor]]:
    """x (M, K) through every layer in one kernel; saved: per hidden layer (M, h_i), or []."""
    import triton

    m, layers = x.shape[0], len(weights)
    p = _padded(max([x.shape[1]] + [w.shape[0] for w in weights]))
    d_out = weights[-1].shape[0]
    out = x.new_empty(m, d_out)
    saved = [x.new_empty(m, w.shape[0]) for w in weights[:-1]] if save else []
    if m == 0:
        return out, saved
    w_all, b_all = _pack(weights, biases, p)
    block = _fused_block_m(p)
    args = [
        x,
        w_all,
        b_all,
        out,
        *_slots(saved, out),
        m,
        x.shape[1],
        d_out,
        x.stride(0),
        x.stride(1),
        act.param,
    ]
    meta = dict(
        L=layers,
        P=p,
        ACT=act.act.code,
        FROM_OUTPUT=act.from_output,
        HAS_BIAS=any(b is not None for b in biases),
        SAVE=save,
        INPUT_PRECISION=_input_precision(x.dtype),
        BLOCK_M=block,
    )
    launch_mlp("mlp_fwd", (triton.cdiv(m, block),), args, meta)
    return out, saved


def mlp_backward(
    grad_out: Tensor,
    x: Tensor,
    weights: list[Tensor],
    has_bias: list[bool],
    saved: list[Tensor],
    act: ActivationSpec,
    needs_x: bool,
) -> tuple[Tensor | None, list[Tensor], list[Tensor | None]]:
    """grad_x and every layer's grad_w / grad_b from what the forward saved, in one kernel."""
    import triton

    m, layers = x.shape[0], len(weights)
    p = _padded(max([x.shape[1]] + [w.shape[0] for w in weights]))
    block = _fused_block_m(p)
    programs = _mlp_programs(triton.cdiv(m, block), layers, p, x.device)
    # one float32 slot per program (deterministic sums, see kernels/mlp.py)
    gw_all = torch.zeros(programs, layers, p, p, device=x.device, dtype=torch.float32)
    gb_all = torch.zeros(programs, layers, p, device=x.device, dtype=torch.float32)
    grad_x = x.new_empty(x.shape) if needs_x else None
    if m > 0:
        w_all, _ = _pack(weights, [None] * layers, p)
        args = [
            grad_out,
            x,
            w_all,
            *_slots(saved, grad_out),
            grad_x if needs_x else grad_out,
            gw_all,
            gb_all,
            m,
            x.shape[1],
            grad_out.shape[1],
            grad_out.stride(0),
            grad_out.stride(1),
            x.stride(0),
            x.stride(1),
            act.param,
        ]
        meta = dict(
            L=layers,
            P=p,
            ACT=act.act.code,
            FROM_OUTPUT=act.from_output,
            HAS_BIAS=any(has_bias),
            NEED_X=needs_x,
            INPUT_PRECISION=_input_precision(x.dtype),
            BLOCK_M=block,
            # no software pipelining of the persistent row-block loop: with the default 3 stages
            # every layer's loads were multi-buffered, up to 2.5 MB of shared memory at P=128
            num_stages=1,
        )
        launch_mlp("mlp_bwd", (programs,), args, meta)
    elif needs_x:
        grad_x.zero_()
    gw_all, gb_all = gw_all.sum(0), gb_all.sum(0)

    # contiguous copies: custom op outputs may not be views of one buffer
    def unpad(t: Tensor) -> Tensor:
        return t.to(x.dtype, memory_format=torch.contiguous_format, copy=True)

    grad_ws = [unpad(gw_all[i, : w.shape[0], : w.shape[1]]) for i, w in enumerate(weights)]
    grad_bs = [
        unpad(gb_all[i, : w.shape[0]]) if hb else None
        for i, (w, hb) in enumerate(zip(weights, has_bias))
    ]
    return grad_x, grad_ws, grad_bs
