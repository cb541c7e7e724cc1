"""Rewrite README.md's results tables (between the results markers) from benchmarks/results/*.csv.

make bench && .venv/bin/python tools/readme_tables.py
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def dense_table() -> str:
    rows = list(csv.DictReader((RESULTS / "bench_dense.csv").open()))
    by: dict[tuple, dict[str, float]] = {}
    for r in rows:  # the CSV accumulates runs: the newest row of each provider wins
        key = (r["shape"], r["activation"], r["mode"])
        by.setdefault(key, {})[r["provider"]] = float(r["median_ms"])
    lines = [
        "| shape MxK→N | act | mode | nnfast auto ms | nnfast (extension) ms | eager ms"
        " | torch.compile ms | oneDNN post-op ms | auto / eager | auto / best other |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (shape, act, mode), d in by.items():
        if "nnfast-auto" not in d:
            continue  # rows from runs before the automatic choice existed
        m, k, n = shape.split("x")
        auto = d["nnfast-auto"]
        others = [d[p] for p in ("eager", "compile", "onednn") if p in d]
        onednn = f"{d['onednn']:.3f}" if "onednn" in d else "-"
        lines.append(
            f"| {m}x{k}→{n} | {act} | {mode} | {auto:.3f} | {d['nnfast-extension']:.3f}"
            f" | {d['eager']:.3f} | {d['compile']:.3f} | {onednn}"
            f" | {auto / d['eager']:.2f}x | {auto / min(others):.2f}x |"
        )
    return "\n".join(lines)


def _num(v: float) -> str:
    if v == 0:
        return "0"
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 1 else f"{v:.3f}"


def mlp_table() -> str:
    rows = list(csv.DictReader((RESULTS / "bench_mlp.csv").open()))
    by: dict[tuple, dict[str, tuple[float, float | None]]] = {}
    for r in rows:  # the newest row of each provider wins; rows before the mode column: fwd+bwd
        mode = r.get("mode") or "fwd+bwd"
        peak = float(r["peak_mb"]) if r["peak_mb"] not in ("", "None") else None
        by.setdefault((r["shape"], r["activation"], mode), {})[r["provider"]] = (
            float(r["median_ms"]),
            peak,
        )
    lines = [
        "| MLP (width x hidden layers x out @ batch) | act | mode"
        " | ms: nnfast / nnfast fused / checkpoint / eager / compile"
        " | nnfast / eager time | held for backward MiB: nnfast / nnfast fused / checkpoint / eager"
        " | nnfast fused / eager memory |",
        "|---|---|---|---|---|---|---|",
    ]
    for (shape, act, mode), d in by.items():
        f, fx, c, e, co = (
            d[p] for p in ("nnfast", "nnfast-fused", "nnfast-checkpoint", "eager", "compile")
        )
        held, ratio = "-", "-"
        if mode == "fwd+bwd" and e[1]:
            held = " / ".join(_num(v[1]) for v in (f, fx, c, e))
            ratio = f"{fx[1] / e[1]:.2f}x"
        times = " / ".join(_num(v[0]) for v in (f, fx, c, e, co))
        lines.append(
            f"| {shape} | {act} | {mode} | {times} | {f[0] / e[0]:.2f}x | {held} | {ratio} |"
        )
    return "\n".join(lines)


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    for name, table in (("dense", dense_table()), ("mlp", mlp_table())):
        text = re.sub(
            rf"(<!-- results:{name}:begin -->\n).*?(\n<!-- results:{name}:end -->)",
            lambda m, t=table: m.group(1) + t + m.group(2),
            text,
            flags=re.S,
        )
    readme.write_text(text)


if __name__ == "__main__":
    main()
