"""MLPs: memory held between forward and backward, and forward+backward time, for nnfast's
FusedMLP as shipped (the dispatcher's measured choice), FusedMLP with measuring off (its fused MLP
op: one saved tensor per hidden layer), FusedMLP(checkpoint=True), the eager
nn.Sequential(Linear, act, ...) and torch.compile of it.

    python benchmarks/bench_mlp.py            # defaults for this machine's device
    python benchmarks/bench_mlp.py --quick
    python benchmarks/bench_mlp.py --configs 1024x3x1024@16384 --activations gelu,relu

A config WIDTHxLAYERSxOUT@BATCH is in=WIDTH, LAYERS hidden layers of WIDTH, then OUT.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

import nnfast  # noqa: E402

# small MLPs at small batches too (a coordinate network queried per point, a policy network per
# step): there a call is a few tens of microseconds and the Python in front of it decides
SMALL_CONFIGS = ["64x2x64@1", "64x2x64@8", "64x2x64@64"]
CPU_CONFIGS = ["1024x3x1024@16384", "64x3x64@65536", *SMALL_CONFIGS]
CPU_QUICK = ["256x3x256@4096", "64x3x64@16384"]
# (not the small ones: each config compiles its eager model once, and make gpu-check gives the
# MLP benchmark one minute; bench_dense has the small shapes there)
GPU_CONFIGS = ["1024x3x1024@16384", "4096x3x4096@8192", "64x3x64@1048576", "128x4x128@262144"]
GPU_QUICK = ["1024x3x1024@16384", "64x3x64@262144"]


def parse(config: str) -> tuple[int, int, int, int]:
    dims, batch = config.split("@")
    width, layers, out = (int(v) for v in dims.split("x"))
    return width, layers, out, int(batch)


class Fixed(nn.Module):
    """Runs a model with the dispatcher's measuring off (nnfast's fixed choice)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        nnfast.set_dispatch("fixed")
        try:
            return self.model(x)
        finally:
            nnfast.set_dispatch("measure")


def providers(fused: nnfast.FusedMLP, activation: str, device: str) -> dict[str, nn.Module]:
    eager = fused.to_sequential()  # nn.Sequential(Linear, act, ..., Linear), same weights
    ckpt = nnfast.FusedMLP(
        fused.layers[0].in_features,
        [lin.out_features for lin in fused.layers[:-1]],
        fused.layers[-1].out_features,
        activation=activation,
        device=device,
        dtype=fused.layers[0].weight.dtype,
        checkpoint=True,
    )
    ckpt.load_state_dict(fused.state_dict())
    return {
        "nnfast": fused,  # as shipped: the dispatcher keeps nnfast's MLP op or PyTorch's layers
        "nnfast-fused": Fixed(fused),  # nnfast's MLP op always (measuring off)
        "nnfast-checkpoint": ckpt,
        "eager": eager,
        "compile": torch.compile(eager, dynamic=False),
    }


def main(argv=None) -> list[harness.Row]:
    grids = {"cpu": CPU_CONFIGS, "cpu_quick": CPU_QUICK, "gpu": GPU_CONFIGS, "gpu_quick": GPU_QUICK}
    opt = harness.cli(
        argv,
        __doc__,
        "bench_mlp",
        "configs",
        "comma-separated WIDTHxLAYERSxOUT@BATCH",
        grids,
        "gelu,relu",
    )
    jobs = [(c, d, a) for c in opt.grid for d in opt.dtypes for a in opt.activations]
    rows: list[harness.Row] = []
    print(f"# bench_mlp on {harness.machine_line()}", flush=True)
    for config, dname, activation in harness.progress(jobs, "bench_mlp"):
        width, layers, out, batch = parse(config)
        dtype = harness.DTYPES[dname]
        torch.manual_seed(0)
        fused = nnfast.FusedMLP(
            width, [width] * layers, out, activation=activation, device=opt.device, dtype=dtype
        )
        macs = batch * (width * width * layers + width * out)
        # an activation from an earlier layer (not a leaf: a leaf input that requires grad
        # marks the input-gradient workloads, which the dispatcher times with a second-order step)
        x = torch.randn(batch, width, device=opt.device, dtype=dtype, requires_grad=True).clone()
        g = torch.randn(batch, out, device=opt.device, dtype=dtype)
        steps, held = {}, {}
        for name, model in providers(fused, activation, opt.device).items():
            params = [x, *model.parameters()]
            model(x)  # warm-up (compiles)
            held[name] = harness.held_memory_mb(lambda m=model, x=x: m(x), opt.device)

            def step(m=model, params=params, x=x, g=g):
                return torch.autograd.grad(m(x), params, g)

            steps[name] = step
        timings = {"fwd+bwd": harness.time_interleaved(steps, opt.device, opt.min_run_time)}
        if config in SMALL_CONFIGS:  # inference too, where the call is short

            def infer(m, x=x):
                with torch.no_grad():
                    return m(x)

            models = providers(fused, activation, opt.device)
            calls = {name: lambda m=m: infer(m) for name, m in models.items()}
            timings["fwd"] = harness.time_interleaved(calls, opt.device, opt.min_run_time)
        for mode, by_name in timings.items():
            for name, t in by_name.items():
                harness.record(
                    rows,
                    harness.Row(
                        "mlp",
                        name,
                        mode,
                        config,
                        dname,
                        activation,
                        t.median_ms,
                        t.spread_ms,
                        (6 if mode == "fwd+bwd" else 2) * macs / (t.median_ms * 1e-3) / opt.scale,
                        opt.unit,
                        held[name] if mode == "fwd+bwd" else None,
                    ),
                    opt,
                )
    harness.report(rows, opt, "nnfast MLP forward+backward", ["eager", "compile"])
    print("\n## nnfast decisions (path: measured time per call)\n")
    print(nnfast.dispatch_report())
    print()
    print(harness.worst_line(rows, "nnfast"))
    print()
    print("| config | dtype | act | provider | held for backward (MiB) | vs eager |")
    print("|---|---|---|---|---|---|")
    for r in (r for r in rows if r.mode == "fwd+bwd"):
        base = next(
            e.peak_mb
            for e in rows
            if e.provider == "eager"
            and e.mode == r.mode
            and (e.shape, e.dtype, e.activation) == (r.shape, r.dtype, r.activation)
        )
        ratio = f"{r.peak_mb / base:.2f}x" if base else "-"
        print(
            f"| {r.shape} | {r.dtype} | {r.activation} | {r.provider} | {r.peak_mb:.1f} | {ratio} |"
        )
    return rows


if __name__ == "__main__":
    main()
