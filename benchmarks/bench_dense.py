"""Single fused dense layer: nnfast backends vs eager Linear+activation vs torch.compile and the
strongest native alternatives, forward / backward / forward+backward.

    python benchmarks/bench_dense.py                      # default grid for this machine's device
    python benchmarks/bench_dense.py --quick              # a small smoke grid
    python benchmarks/bench_dense.py --shapes 4096x1024x4096 --dtypes bf16 --activations gelu,relu

A shape MxKxN is x (M, K) @ W^T (K -> N).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

import nnfast  # noqa: E402
from nnfast import _backends  # noqa: E402
from nnfast.activations import resolve  # noqa: E402

FLOPS_PER_MAC = {"fwd": 2, "bwd": 4, "fwd+bwd": 6}

# the three shapes of the CPU goals, small-M inference, and a transformer feed-forward block
CPU_SHAPES = [
    "4096x1024x4096",
    "8192x512x2048",
    "65536x64x64",
    "1x1024x4096",
    "16x1024x4096",
    "512x2048x5632",
]
# small batches (decode steps, per-sample calls), where call overhead decides; ":act" overrides the
# activation list for that shape (gated layers: N is the output width, the weight has 2N rows)
SMALL_SHAPES = [
    "1x64x64",
    "8x64x64",
    "64x64x64",
    "1x1024x1024",
    "8x1024x1024",
    "64x1024x1024",
    "1x1024x1024:swiglu",
    "64x1024x1024:swiglu",
]
CPU_SHAPES += SMALL_SHAPES
CPU_QUICK = ["1024x256x1024", "8192x64x64", "1x64x64", "8x1024x1024:swiglu"]
GPU_SHAPES = [
    "1x4096x4096",
    "16x4096x4095",
    "256x4096x11008",
    "4096x4096x4096",
    "8192x8192x8192",
    "16384x4096x14336",
    "65536x64x64",
]
GPU_SHAPES += SMALL_SHAPES
GPU_QUICK = ["256x1024x1024", "4096x4096x4096", "1x1024x1024"]

# oneDNN's fused linear post-ops, by nnfast activation name: (attr, scalars, algorithm)
ONEDNN = {
    "identity": ("none", [], ""),
    "relu": ("relu", [], ""),
    "gelu": ("gelu", [], "none"),
    "gelu_tanh": ("gelu", [], "tanh"),
    "silu": ("swish", [], ""),
    "sigmoid": ("sigmoid", [], ""),
    "tanh": ("tanh", [], ""),
}


def providers(device: str, activation: str, dtype: torch.dtype) -> dict[str, tuple[Callable, bool]]:
    """name -> (fn(x, w, b), supports backward)."""
    act = resolve(activation)

    def eager(x, w, b):
        return act(F.linear(x, w, b))

    out: dict[str, tuple[Callable, bool]] = {}
    # the automatic choice (the measuring dispatcher), as users call it
    out["nnfast-auto"] = (lambda x, w, b: nnfast.dense(x, w, b, act), True)
    for name in _backends.NAMES:
        if _backends.why_not(name, device, dtype) is None:
            out[f"nnfast-{name}"] = (
                lambda x, w, b, n=name: nnfast.dense(x, w, b, act, backend=n),
                True,
            )
    out["eager"] = (eager, True)
    out["compile"] = (torch.compile(eager, dynamic=False), True)
    if device == "cuda":
        # the bar for the fused forward: the plain matrix product, no bias, no activation
        out["torch.mm"] = (lambda x, w, b: torch.mm(x, w.t()), False)
        out["compile-max-autotune"] = (
            torch.compile(eager, dynamic=False, mode="max-autotune-no-cudagraphs"),
            True,
        )
        if act.name in ("relu", "gelu_tanh"):
            use_gelu = act.name == "gelu_tanh"  # _addmm_activation's GELU is the tanh form
            out["addmm_activation"] = (
                lambda x, w, b: torch._addmm_activation(b, x, w.t(), use_gelu=use_gelu),
                False,
            )
    elif act.name in ONEDNN and act.param in (0.0, act.act.default_param):
        attr, scalars, algo = ONEDNN[act.name]
        out["onednn"] = (
            lambda x, w, b: torch.ops.mkldnn._linear_pointwise(x, w, b, attr, scalars, algo),
            False,
        )
    return out


def measure(fn, mode: str, sets: Callable) -> Callable[[], object]:
    """The call that one timing of ``mode`` makes."""
    # "bwd" replays one graph's backward (retain_graph=True), which compiled graphs with donated
    # buffers refuse; donation saves memory, not backward time, so it is off for this script.
    torch._functorch.config.donated_buffer = False
    if mode == "fwd":

        def run():
            x, w, b, _ = sets()
            with torch.no_grad():
                return fn(x, w, b)

    elif mode == "bwd":
        graphs = {}

        def run():
            x, w, b, g = sets()
            key = id(x)
            if key not in graphs:  # forward once per input set; time backward only
                graphs[key] = fn(x, w, b)
            return torch.autograd.grad(graphs[key], (x, w, b), g, retain_graph=True)

    else:

        def run():
            x, w, b, g = sets()
            return torch.autograd.grad(fn(x, w, b), (x, w, b), g)

    return run


def main(argv=None) -> list[harness.Row]:
    grids = {"cpu": CPU_SHAPES, "cpu_quick": CPU_QUICK, "gpu": GPU_SHAPES, "gpu_quick": GPU_QUICK}
    opt = harness.cli(
        argv, __doc__, "bench_dense", "shapes", "comma-separated MxKxN", grids, "gelu"
    )
    jobs = [
        (s.split(":")[0], d, a, m)
        for s in opt.grid
        for d in opt.dtypes
        for a in (s.split(":")[1:] or opt.activations)
        for m in opt.modes
    ]
    rows: list[harness.Row] = []
    print(f"# bench_dense on {harness.machine_line()}", flush=True)
    for shape, dname, activation, mode in harness.progress(jobs, "bench_dense"):
        m, k, n = (int(v) for v in shape.split("x"))
        dtype = harness.DTYPES[dname]

        rows_w = 2 * n if resolve(activation).is_gated else n

        def make(m=m, k=k, n=n, dtype=dtype, rows_w=rows_w):
            x = torch.randn(m, k, device=opt.device, dtype=dtype, requires_grad=True)
            w = (torch.randn(rows_w, k, device=opt.device) / k**0.5).to(dtype).requires_grad_()
            b = torch.randn(rows_w, device=opt.device, dtype=dtype, requires_grad=True)
            g = torch.randn(m, n, device=opt.device, dtype=dtype)
            return x, w, b, g

        sets = harness.rotating(make, (m * k + n * k + 2 * m * n) * dtype.itemsize)
        runs = {
            name: measure(fn, mode, sets)
            for name, (fn, has_bwd) in providers(opt.device, activation, dtype).items()
            if mode == "fwd" or has_bwd
        }
        timings = harness.time_interleaved(runs, opt.device, opt.min_run_time)
        for name, run in runs.items():
            t, peak = timings[name], harness.peak_memory_mb(run, opt.device)
            flops = FLOPS_PER_MAC[mode] * m * k * n
            harness.record(
                rows,
                harness.Row(
                    "dense",
                    name,
                    mode,
                    shape,
                    dname,
                    activation,
                    t.median_ms,
                    t.spread_ms,
                    flops / (t.median_ms * 1e-3) / opt.scale,
                    opt.unit,
                    peak,
                ),
                opt,
            )
    alts = ["eager", "compile", "compile-max-autotune", "onednn", "addmm_activation"]
    harness.report(rows, opt, "nnfast dense: throughput", alts)
    print("\n## nnfast-auto decisions (path: measured time per call)\n")
    print(nnfast.dispatch_report())
    print()
    print(harness.worst_line(rows, "nnfast-auto"))
    return rows


if __name__ == "__main__":
    main()
