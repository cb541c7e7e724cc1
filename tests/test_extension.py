"""The C++ extension: opcheck on its ops, its own argument checks, and the first-use JIT build."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import nnfast
from nnfast.activations import resolve

pytestmark = pytest.mark.skipif(
    "extension" not in nnfast.available_backends(), reason="nnfast._C is not built"
)


def _ops():
    return torch.ops.nnfast_ext


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck_cpp_ops(dtype):
    for act in [resolve(name).act.code for name in nnfast.ACTIVATIONS]:  # elementwise rows
        x, w, b = torch.randn(9, 13, dtype=dtype), torch.randn(7, 13, dtype=dtype), None
        for bias in (None, torch.randn(7, dtype=dtype)):
            torch.library.opcheck(_ops().dense_fwd.default, (x, w, bias, act, 0.1, True))
        go, s = torch.randn(9, 7, dtype=dtype), torch.randn(9, 7, dtype=dtype)
        for needs in ((True, True, True), (False, True, False), (True, False, True)):
            torch.library.opcheck(_ops().dense_bwd.default, (go, x, w, s, act, 0.1, *needs))
    del b


def test_opcheck_cpp_mlp_ops():
    x = torch.randn(9, 6)
    ws = [torch.randn(8, 6), torch.randn(5, 8), torch.randn(3, 5)]
    bs = [torch.randn(8), None, torch.randn(3)]
    for act, save in ((3, True), (1, True), (6, False)):
        torch.library.opcheck(_ops().mlp_fwd.default, (x, ws, bs, act, 0.0, save))
        _, saved = _ops().mlp_fwd(x, ws, bs, act, 0.0, True)
        go = torch.randn(9, 3)
        torch.library.opcheck(
            _ops().mlp_bwd.default, (go, x, ws, [True, False, True], saved, act, 0.0, True)
        )
    with pytest.raises(RuntimeError, match=r"weights\[1\] must be float32 \(out, 8\)"):
        _ops().mlp_fwd(x, [ws[0], torch.randn(5, 7)], [None, None], 3, 0.0, False)


def test_cpp_checks_have_clear_messages():
    x, w = torch.randn(4, 8), torch.randn(3, 5)
    with pytest.raises(RuntimeError, match=r"x has 8 columns but weight expects in_features=5"):
        _ops().dense_fwd(x, w, None, 3, 0.0, False)
    with pytest.raises(RuntimeError, match=r"unknown activation code 42"):
        _ops().dense_fwd(x, torch.randn(3, 8), None, 42, 0.0, False)
    with pytest.raises(RuntimeError, match=r"bias must have shape \(3\)"):
        _ops().dense_fwd(x, torch.randn(3, 8), torch.randn(4), 0, 0.0, False)


def test_large_and_small_weight_paths_agree():
    # 1 MB of weight is the switch between row-blocked and one-GEMM paths: cover both sides
    for n, k in ((64, 64), (1024, 512)):
        x = torch.randn(700, k, dtype=torch.float64)
        w = torch.randn(n, k, dtype=torch.float64) / k**0.5
        b = torch.randn(n, dtype=torch.float64)
        for act in ("gelu", "tanh"):
            xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
            out = nnfast.dense(xs, ws, bs, act, backend="extension")
            ref = nnfast.dense(x, w, b, act, backend="reference")
            torch.testing.assert_close(out, ref)
            g = torch.randn_like(out)
            got = torch.autograd.grad(out, (xs, ws, bs), g)
            xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
            want = torch.autograd.grad(
                nnfast.dense(xr, wr, br, act, backend="reference"), (xr, wr, br), g
            )
            for a, r in zip(got, want):
                torch.testing.assert_close(a, r)


def test_jit_build_from_clean_cache(tmp_path):
    code = (
        "import torch, nnfast\n"
        "from nnfast._backends import extension\n"
        "assert extension.unavailable() is None, extension.unavailable()\n"
        "x = torch.randn(5, 3)\n"
        "y = nnfast.dense(x, torch.randn(4, 3), None, 'relu', backend='extension')\n"
        "assert y.shape == (5, 4) and (y >= 0).all()\n"
        # the JIT-built library is the Python module too: the front end's fast path and the
        # extension's autograd node in C++
        "assert extension.fast is not None and extension.fast.__name__ == 'nnfast_C'\n"
        "w = torch.randn(4, 3, requires_grad=True)\n"
        "out = nnfast.dense(x, w, None, 'gelu', backend='extension')\n"
        "assert 'ExtensionDense' in out.grad_fn.name(), out.grad_fn.name()\n"
        "out.sum().backward()\n"
        "assert w.grad is not None and w.grad.abs().sum() > 0\n"
    )
    env = {**os.environ, "NNFAST_FORCE_JIT": "1", "NNFAST_CACHE": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "compiling the C++ extension" in r.stderr
    assert any(p.suffix == ".so" for p in tmp_path.rglob("*.so")), "no library in the cache"


def test_failed_build_falls_back_with_one_warning(tmp_path):
    code = (
        "import warnings, torch, nnfast\n"
        "from nnfast import _build\n"
        "_build.cpu_sources = lambda: ['/nonexistent/broken.cpp']\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    y = nnfast.dense(torch.randn(2, 3), torch.randn(4, 3))\n"
        "    nnfast.dense(torch.randn(2, 3), torch.randn(4, 3))\n"
        "assert [str(x.message) for x in w if 'C++ extension' in str(x.message)].__len__() == 1, w\n"
        "try:\n"
        "    nnfast.dense(torch.randn(2, 3), torch.randn(4, 3), backend='extension')\n"
        "except RuntimeError as e:\n"
        "    assert 'building nnfast._C failed' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('explicit extension did not raise')\n"
    )
    env = {**os.environ, "NNFAST_FORCE_JIT": "1", "NNFAST_CACHE": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
