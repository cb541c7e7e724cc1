"""MLPs: memory held between forward and backward, and forward+backward time, for nnfast's
FusedMLP (one saved tensor per hidden layer), FusedMLP(checkpoint=True), the eager
nn.Sequential(Linear, act, ...) and torch.compile of it.

    python benchmarks/bench_mlp.py            # defaults for this machine's device
    python benchmarks/bench_mlp.py --quick
    python benchmarks/bench_mlp.py --configs 1024x3x1024@16384 --activations gelu,relu

A config WIDTHxLAYERSxOUT@BATCH is in=WIDTH, LAYERS hidden layers of WIDTH, then OUT.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

import nnfast  # noqa: E402
from nnfast.activations import resolve  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_CONFIGS = ["1024x3x1024@16384", "64x3x64@65536"]
CPU_QUICK = ["256x3x256@4096", "64x3x64@16384"]
GPU_CONFIGS = ["1024x3x1024@16384", "4096x3x4096@8192", "64x3x64@1048576", "128x4x128@262144"]
GPU_QUICK = ["1024x3x1024@16384", "64x3x64@262144"]


def parse(config: str) -> tuple[int, int, int, int]:
    dims, batch = config.split("@")
    width, layers, out = (int(v) for v in dims.split("x"))
    return width, layers, out, int(batch)


class EagerMLP(nn.Sequential):
    """nn.Sequential(Linear, act, ..., Linear) with the weights of a FusedMLP."""

    def __init__(self, fused: nnfast.FusedMLP, activation: str) -> None:
        act = resolve(activation)
        layers: list[nn.Module] = []
        for i, lin in enumerate(fused.layers):
            eager = nn.Linear(
                lin.in_features,
                lin.weight.shape[0],
                device=lin.weight.device,
                dtype=lin.weight.dtype,
            )
            eager.load_state_dict(lin.state_dict())
            layers.append(eager)
            if i < len(fused.layers) - 1:
                layers.append(_Act(act))
        super().__init__(*layers)


class _Act(nn.Module):
    def __init__(self, act) -> None:
        super().__init__()
        self.act = act

    def forward(self, x):
        return self.act(x)


def providers(fused: nnfast.FusedMLP, activation: str, device: str) -> dict[str, nn.Module]:
    eager = EagerMLP(fused, activation)
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
        "nnfast": fused,
        "nnfast-checkpoint": ckpt,
        "eager": eager,
        "compile": torch.compile(eager, dynamic=False),
    }


def main(argv=None) -> list[harness.Row]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default=harness.default_device())
    p.add_argument("--configs", help="comma-separated WIDTHxLAYERSxOUT@BATCH")
    p.add_argument("--dtypes", help="comma-separated of fp32,bf16,fp16")
    p.add_argument("--activations", default="gelu,relu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--min-run-time", type=float, default=None)
    p.add_argument("--out-dir", type=Path, default=harness.RESULTS)
    p.add_argument("--name", default="bench_mlp")
    args = p.parse_args(argv)

    gpu = args.device == "cuda"
    configs = args.configs.split(",") if args.configs else None
    if configs is None:
        configs = (
            (GPU_QUICK if args.quick else GPU_CONFIGS)
            if gpu
            else (CPU_QUICK if args.quick else CPU_CONFIGS)
        )
    dtypes = (args.dtypes or ("bf16" if gpu else "fp32")).split(",")
    min_run_time = args.min_run_time or (0.2 if args.quick else 0.5)
    unit, scale = ("TFLOP/s", 1e12) if gpu else ("GFLOP/s", 1e9)
    try:
        from tqdm import tqdm
    except ImportError:

        def tqdm(it, **_):
            return it

    jobs = [(c, d, a) for c in configs for d in dtypes for a in args.activations.split(",")]
    rows: list[harness.Row] = []
    print(f"# bench_mlp on {harness.machine_line()}", flush=True)
    for config, dname, activation in tqdm(jobs, desc="bench_mlp", file=sys.stderr):
        width, layers, out, batch = parse(config)
        dtype = DTYPES[dname]
        torch.manual_seed(0)
        fused = nnfast.FusedMLP(
            width, [width] * layers, out, activation=activation, device=args.device, dtype=dtype
        )
        macs = batch * (width * width * layers + width * out)
        x = torch.randn(batch, width, device=args.device, dtype=dtype, requires_grad=True)
        g = torch.randn(batch, out, device=args.device, dtype=dtype)
        for name, model in providers(fused, activation, args.device).items():
            params = [x, *model.parameters()]
            model(x)  # warm-up (compiles)
            held = harness.held_memory_mb(lambda m=model, x=x: m(x), args.device)

            def step(m=model, params=params, x=x, g=g):
                return torch.autograd.grad(m(x), params, g)

            t = harness.time_fn(step, args.device, min_run_time)
            rows.append(
                harness.Row(
                    "mlp",
                    name,
                    "fwd+bwd",
                    config,
                    dname,
                    activation,
                    t.median_ms,
                    t.spread_ms,
                    6 * macs / (t.median_ms * 1e-3) / scale,
                    unit,
                    held,
                )
            )
    print(harness.markdown(rows, alternatives=["eager", "compile"]))
    print()
    print("| config | dtype | act | provider | held for backward (MiB) | vs eager |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        base = next(
            e.peak_mb
            for e in rows
            if e.provider == "eager"
            and (e.shape, e.dtype, e.activation) == (r.shape, r.dtype, r.activation)
        )
        ratio = f"{r.peak_mb / base:.2f}x" if base else "-"
        print(
            f"| {r.shape} | {r.dtype} | {r.activation} | {r.provider} | {r.peak_mb:.1f} | {ratio} |"
        )
    csv_path = harness.write_csv(rows, args.name, args.out_dir)
    png = harness.plot(rows, args.name, "nnfast MLP forward+backward", args.out_dir)
    print(f"\nCSV: {csv_path}" + (f"\nplot: {png}" if png else ""))
    return rows


if __name__ == "__main__":
    main()
