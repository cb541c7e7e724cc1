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
