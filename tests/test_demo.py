"""The research demo runs end to end on a tiny setting, and nnfast trains like eager PyTorch."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_coordinate_network_demo(tmp_path):
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location(
        "demo", ROOT / "examples" / "coordinate_network.py"
    )
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    out = tmp_path / "demo.png"
    res = demo.main(["--size", "24", "--steps", "30", "--width", "32", "--out", str(out)])
    assert out.exists() and out.stat().st_size > 0
    # same initial weights, same data: the PSNR curves agree to float rounding early on
    assert res["early_gap"] < 0.01, res["early_gap"]
    assert res["psnr_nnfast"][-1] > res["psnr_nnfast"][0] + 3, "the network did not learn"


def test_sdf_demo(tmp_path):
    # second derivatives in a training loop: FusedMLP (automatic and fused) and eager agree
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location("sdf", ROOT / "examples" / "sdf.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    out = tmp_path / "sdf.png"
    args = ["--steps", "100", "--lr", "1e-2", "--width", "32", "--surface", "128", "--free", "256"]
    res = demo.main([*args, "--grid", "48", "--out", str(out)])
    assert out.exists() and out.stat().st_size > 0
    assert res["early_gap"] < 1e-4, res["early_gap"]
    for name in ("nnfast", "nnfast fused", "eager"):
        loss = res["loss"][name]
        assert loss[-1] < 0.7 * loss[0], f"{name} did not learn: {loss[0]} -> {loss[-1]}"
    assert res["errors"]["nnfast fused"][0] < 0.3, res["errors"]  # mean |f - distance|
