"""GPU-path decisions that can be checked without a GPU: the TF32 setting read through both torch
APIs, the Triton tile candidates and autotune keys, the deterministic fused-MLP backward (under the
interpreter), and where the build finds cuBLASLt's header. The kernels' compilation for sm_90/sm_80
is checked by tools/check_triton.py (make check-triton)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

import nnfast
from helpers import INTERPRET
from nnfast import _build
from nnfast._backends import triton as tb


@pytest.fixture
def restore_tf32():
    matmul = torch.backends.cuda.matmul
    new = getattr(matmul, "fp32_precision", None)
    glob = getattr(torch.backends, "fp32_precision", None)
    yield
    if new is not None:
        matmul.fp32_precision = new
        torch.backends.fp32_precision = glob


@pytest.mark.skipif(
    not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch without fp32_precision"
)
def test_tf32_read_through_the_new_api(restore_tf32):
    # Reading the legacy allow_tf32 after the new API was used raises on recent torch.
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    assert tb.tf32_enabled() and tb._input_precision(torch.float32) == "tf32"
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    assert not tb.tf32_enabled() and tb._input_precision(torch.float32) == "ieee"
    torch.backends.cuda.matmul.fp32_precision = "none"
    torch.backends.fp32_precision = "tf32"  # inherited from the global setting
    assert tb.tf32_enabled()
    assert tb._input_precision(torch.float16) == "tf32"  # 16-bit dtypes are unaffected


def test_tile_candidates_and_keys(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("NNFAST_TRITON_AUTOTUNE", "1")
    assert tb.candidate_tiles("fwd", "tf32") == tb.TILES["fwd"]
    # float32 without TF32 gets its own small tiles (the big ones spilled tens of KB)
    assert tb.candidate_tiles("bwd", "ieee") == tb.TILES_IEEE["bwd"]
    assert max(t[0] * t[1] for t in tb.TILES_IEEE["fwd"]) <= 64 * 32
    monkeypatch.setenv("NNFAST_TRITON_AUTOTUNE", "4")
    assert tb.candidate_tiles("fwd", "tf32") == tb.TILES["fwd"][:4]
    assert {t[0] for t in tb.TILES["fwd"][:4]} >= {16, 128}  # bounded tuning keeps small M
    monkeypatch.setenv("NNFAST_TRITON_AUTOTUNE", "0")
    assert tb.candidate_tiles("fwd", "tf32") == (tb.FIXED_TILE,)
    # every flag that changes resource use is in the autotune keys, and M only as a bucket
    for kind, flags in (
        ("fwd", {"ACT", "GATED", "HAS_BIAS", "STORE_PRE", "INPUT_PRECISION"}),
        ("bwd", {"ACT", "GATED", "HAS_BIAS", "COMPUTE_GX", "STORE_GP", "INPUT_PRECISION"}),
    ):
        assert flags <= set(tb.KEYS[kind]) and "M_BUCKET" in tb.KEYS[kind]
        assert "M" not in tb.KEYS[kind]
    assert [tb.m_bucket(m) for m in (1, 2, 3, 64, 65, 1000)] == [1, 2, 4, 64, 128, 1024]
    assert tb.fits(232448, 0, 232448) and not tb.fits(232449, 0, 232448)
    assert not tb.fits(1024, tb.MAX_SPILL_BYTES + 4, 232448)


@pytest.mark.skipif(
    not INTERPRET or "triton" not in nnfast.available_backends(), reason="Triton interpreter"
)
def test_fused_mlp_backward_is_deterministic_and_walks_many_blocks():
    # 700 rows = 22 row blocks of 32 on 4 persistent programs: each program sums several blocks
    torch.manual_seed(0)
    mlp = nnfast.FusedMLP(16, [32, 32], 8, activation="gelu")
    x = torch.randn(700, 16, requires_grad=True)
    runs = []
    for _ in range(2):
        mlp.zero_grad()
        x.grad = None
        nnfast.mlp(
            x,
            [m.weight for m in mlp.layers],
            [m.bias for m in mlp.layers],
            "gelu",
            backend="triton",
        ).square().sum().backward()
        runs.append([x.grad.clone(), *[p.grad.clone() for p in mlp.parameters()]])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    ref = [t.detach().double().requires_grad_() for t in (x, *mlp.parameters())]
    h = ref[0]
    for i in range(3):
        h = torch.nn.functional.linear(h, ref[1 + 2 * i], ref[2 + 2 * i])
        h = torch.nn.functional.gelu(h) if i < 2 else h
    h.square().sum().backward()
    for a, r in zip(runs[0], ref):
        torch.testing.assert_close(a.double(), r.grad, rtol=1e-4, atol=1e-4)


def test_cublaslt_header_from_the_nvidia_wheel(tmp_path, monkeypatch):
    header = tmp_path / "nvidia" / "cublas" / "include" / "cublasLt.h"
    header.parent.mkdir(parents=True)
    header.write_text("/* stand-in */\n")
    for d in (tmp_path / "nvidia", tmp_path / "nvidia" / "cublas"):
        (d / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "nvidia" or m.startswith("nvidia.")]:
        monkeypatch.delitem(sys.modules, name)
    import torch.utils.cpp_extension as cpp

    monkeypatch.setattr(cpp, "CUDA_HOME", None)
    assert _build.cublaslt_include_dirs() == [str(header.parent)]
    toolkit = tmp_path / "cuda"
    (toolkit / "include").mkdir(parents=True)
    (toolkit / "include" / "cublasLt.h").write_text("")
    monkeypatch.setattr(cpp, "CUDA_HOME", str(toolkit))
    assert _build.cublaslt_include_dirs() == []  # the toolkit has it
    assert os.path.exists(header)
