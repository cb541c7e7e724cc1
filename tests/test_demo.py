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
