"""The benchmark scripts run end to end on a tiny grid (no timing is asserted)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_dense  # noqa: E402
import bench_mlp  # noqa: E402


def test_bench_dense_writes_table_csv_and_plot(tmp_path, capsys):
    rows = bench_dense.main(
        [
            "--shapes",
            "33x16x24",
            "--modes",
            "fwd,bwd,fwd+bwd",
            "--activations",
            "relu",
            "--dtypes",
            "fp32",  # CUDA runs default to bf16
            "--min-run-time",
            "0.01",
            "--out-dir",
            str(tmp_path),
        ]
    )
    providers = {r.provider for r in rows}
    assert {"eager", "compile", "nnfast-reference"} <= providers
    assert {r.mode for r in rows} == {"fwd", "bwd", "fwd+bwd"}
    assert all(r.median_ms > 0 for r in rows)
    out = capsys.readouterr().out
    assert "| fwd+bwd | 33x16x24 | fp32 | relu |" in out
    assert (tmp_path / "bench_dense.csv").read_text().count("\n") == len(rows) + 1
    assert (tmp_path / "bench_dense.png").stat().st_size > 0


def test_bench_mlp_reports_memory(tmp_path, capsys):
    rows = bench_mlp.main(
        [
            "--configs",
            "16x2x8@64",
            "--activations",
            "gelu",
            "--min-run-time",
            "0.01",
            "--out-dir",
            str(tmp_path),
        ]
    )
    held = {r.provider: r.peak_mb for r in rows}
    assert held["nnfast-checkpoint"] <= held["nnfast"] <= held["eager"]
    assert "held for backward" in capsys.readouterr().out


def test_bench_overhead_runs(capsys):
    import bench_overhead

    results = bench_overhead.main(["--rounds", "2", "--calls", "5"])
    assert {("infer", "eager"), ("train", "FusedDense")} <= set(results)
    assert "vs eager" in capsys.readouterr().out


def test_bench_fuse_runs(tmp_path, capsys):
    import pytest

    pytest.importorskip("transformers")
    import bench_fuse

    rows = bench_fuse.main(
        [
            "--models",
            "bert",
            "--batch",
            "1",
            "--seq",
            "8",
            "--min-run-time",
            "0.02",
            "--out-dir",
            str(tmp_path),
        ]
    )
    assert {(r.provider, r.mode) for r in rows} == {
        (p, m) for p in ("transformers", "nnfast.fuse") for m in ("inference", "train step")
    }
    assert "nnfast.fuse: 3 fused" in capsys.readouterr().out
    assert (tmp_path / "bench_fuse.csv").exists()


def test_small_mlp_configs_time_inference_too_and_print_the_worst_line(tmp_path, capsys):
    rows = bench_mlp.main(
        ["--configs", "64x2x64@1", "--activations", "relu", "--min-run-time", "0.01"]
        + ["--out-dir", str(tmp_path)]
    )
    assert {r.mode for r in rows} == {"fwd", "fwd+bwd"}
    assert all(r.peak_mb is None for r in rows if r.mode == "fwd")
    out = capsys.readouterr().out
    assert "worst nnfast / eager over 2 rows" in out and "nnfast decisions" in out


def test_worst_line_flags_only_rows_beyond_their_spread():
    import harness

    def row(provider, shape, ms, spread):
        return harness.Row("dense", provider, "fwd", shape, "fp32", "gelu", ms, spread, 1.0, "x")

    rows = [
        row("eager", "a", 1.0, 0.01),
        row("nnfast-auto", "a", 1.10, 0.01),  # 1.10x +-0.02: beyond
        row("eager", "b", 1.0, 0.10),
        row("nnfast-auto", "b", 1.10, 0.10),  # 1.10x +-0.20: within the run's spread
        row("eager", "c", 1.0, 0.01),
        row("nnfast-auto", "c", 0.90, 0.01),
    ]
    line = harness.worst_line(rows, "nnfast-auto")
    assert "over 3 rows" in line and "1 of 3" in line and "at fwd a fp32 gelu" in line
    assert "1.10x ±0.02 at fwd a" in line and "at fwd b" not in line.split("\n", 2)[2]


def test_settle_times_after_the_decisions_are_final(monkeypatch):
    import harness
    import torch

    import nnfast
    from nnfast._backends import chooser

    monkeypatch.setattr(chooser, "_mode", "measure")
    monkeypatch.delenv("NNFAST_BACKEND", raising=False)
    saved = dict(chooser._decisions)
    chooser.clear()
    try:
        x, w = torch.randn(3, 8), torch.randn(5, 8)
        fn = lambda: nnfast.dense(x, w, None, "silu")  # noqa: E731
        fn()
        assert not chooser.decisions()[0].confirmed
        harness.settle(fn)
        assert chooser.decisions()[0].confirmed
        harness.settle(lambda: None)  # nothing to advance: returns at once
    finally:
        chooser.clear()
        chooser._decisions.update(saved)
    assert harness.HEAP in ("glibc heap kept (mallopt)", "default allocator")


def test_time_interleaved_shuffles_the_order_every_round():
    # a slice pays for what the slice before it left behind: no provider may always go first
    import harness

    seen: list[str] = []
    fns = {name: (lambda name=name: seen.append(name)) for name in "abcd"}
    timings = harness.time_interleaved(fns, "cpu", min_run_time=0.02, rounds=12)
    assert set(timings) == set("abcd")
    calls = {name: seen.count(name) for name in "abcd"}
    # after the warm-up, the rounds: which provider opened each one (runs of one name's calls)
    runs = [name for i, name in enumerate(seen) if i == 0 or seen[i - 1] != name]
    firsts = {tuple(runs[i : i + 4]) for i in range(4 * 2, len(runs) - 3, 4)}
    assert len(firsts) > 1, "the same order every round"
    assert all(n > 12 for n in calls.values()), calls
