"""Per-call overhead at a tiny layer (1x64->64, float32, GELU): what nnfast.dense and FusedDense cost
on top of eager F.linear + activation, inference and training (forward + backward).

    python benchmarks/bench_overhead.py [--shape 1x64x64] [--rounds 30]

Providers are interleaved round by round in one process (medians of per-round means), so the
machine's drift hits all of them alike. The dispatcher decides first (its measurement is not timed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

import nnfast  # noqa: E402
from nnfast.activations import resolve  # noqa: E402
from nnfast.functional import _run  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="1x64x64", help="MxKxN")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--calls", type=int, default=2000, help="calls per provider per round")
    opt = p.parse_args(argv)
    m, k, n = (int(v) for v in opt.shape.split("x"))
    layer = nnfast.FusedDense(k, n, activation="gelu")
    w, b = layer.weight.detach(), layer.bias.detach()
    x = torch.randn(m, k)
    xg = x.clone().requires_grad_()
    wg, bg = layer.weight, layer.bias
    g = torch.randn(m, n)

    providers = {
        "infer": {
            "eager": lambda: F.gelu(F.linear(x, w, b)),
            "nnfast.dense": lambda: nnfast.dense(x, w, b, "gelu"),
            "FusedDense": lambda: layer(x),
        },
        "train": {
            "eager": lambda: F.gelu(F.linear(xg, wg, bg)).backward(g),
            "nnfast.dense": lambda: nnfast.dense(xg, wg, bg, "gelu").backward(g),
            "FusedDense": lambda: layer(xg).backward(g),
        },
    }
    with torch.no_grad():
        for f in providers["infer"].values():
            f()
        # the path the dispatcher chose, called directly: what the front end costs on its own
        spec = resolve("gelu")
        path = nnfast._backends.chooser.cached(
            nnfast._backends.chooser.key_of(x, w, b, spec, False)
        )
        if path is not None:
            providers["infer"][f"chosen path alone ({path})"] = lambda: _run(
                path, x, w, b, spec, False
            )
    for f in providers["train"].values():
        f()
    results = {}
    print(f"# bench_overhead on {harness.machine_line()}, shape {opt.shape}, float32, gelu")
    print("\n| mode | provider | us per call (median) | vs eager | over eager us |")
    print("|---|---|---|---|---|")
    for mode, fns in providers.items():
        samples = {name: [] for name in fns}
        for _ in range(opt.rounds):
            for name, f in fns.items():
                with torch.set_grad_enabled(mode == "train"):
                    start = time.perf_counter()
                    for _ in range(opt.calls):
                        f()
                    samples[name].append((time.perf_counter() - start) / opt.calls * 1e6)
        med = {name: statistics.median(s) for name, s in samples.items()}
        for name, us in med.items():
            results[(mode, name)] = us
            print(
                f"| {mode} | {name} | {us:.1f} | {us / med['eager']:.2f}x | {us - med['eager']:+.1f} |"
            )
    print("\nnnfast-auto decisions:\n" + nnfast.dispatch_report())
    return results


if __name__ == "__main__":
    main()
