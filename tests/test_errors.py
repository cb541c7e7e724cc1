"""Bad input: each case raises the right exception type with a message naming both sides."""

from __future__ import annotations

import pytest
import torch

import nnfast


def test_in_features_mismatch_names_both_numbers_and_weight_shape():
    with pytest.raises(ValueError, match=r"last dimension 512 .* in_features=256 .*\(1024, 256\)"):
        nnfast.dense(torch.randn(4, 512), torch.randn(1024, 256))


def test_weight_not_2d():
    with pytest.raises(ValueError, match=r"weight must be 2-D .* got 3-D"):
        nnfast.dense(torch.randn(4, 8), torch.randn(2, 3, 8))


def test_bias_shape_names_both():
    with pytest.raises(ValueError, match=r"bias must have shape \(16,\) .* got \(15,\)"):
        nnfast.dense(torch.randn(4, 8), torch.randn(16, 8), torch.randn(15))


@pytest.mark.parametrize("which", ["weight", "bias"])
def test_dtype_mismatch_names_both_dtypes(which):
    x, w, b = torch.randn(4, 8), torch.randn(16, 8), torch.randn(16)
    if which == "weight":
        w = w.double()
    else:
        b = b.half()
    other = "torch.float64" if which == "weight" else "torch.float16"
    with pytest.raises(
        TypeError, match=rf"x has dtype torch.float32 but {which} has dtype {other}"
    ):
        nnfast.dense(x, w, b)


def test_device_mismatch():
    x = torch.randn(4, 8)
    w = torch.randn(16, 8, device="meta")
    with pytest.raises(ValueError, match=r"x is on cpu but weight is on meta"):
        nnfast.dense(x, w)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8])
def test_integer_and_bool_tensors(dtype):
    x = torch.ones(4, 8).to(dtype)
    with pytest.raises(TypeError, match=rf"x must be a floating-point tensor .* got dtype {dtype}"):
        nnfast.dense(x, torch.randn(16, 8))
    with pytest.raises(TypeError, match="weight must be a floating-point tensor"):
        nnfast.dense(torch.randn(4, 8), torch.ones(16, 8).to(dtype))


def test_zero_dim_x():
    with pytest.raises(ValueError, match=r"at least 1 dimension .* got a 0-d tensor"):
        nnfast.dense(torch.tensor(1.0), torch.randn(3, 1))


def test_not_a_tensor():
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        nnfast.dense([[1.0, 2.0]], torch.randn(3, 2))


def test_unknown_backend_lists_backends():
    with pytest.raises(ValueError, match=r"'cuda' is not a backend; expected one of reference"):
        nnfast.dense(torch.randn(2, 3), torch.randn(4, 3), backend="cuda")


def test_env_backend_is_validated(monkeypatch):
    monkeypatch.setenv("NNFAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match=r"NNFAST_BACKEND='fastest' is not a backend"):
        nnfast.dense(torch.randn(2, 3), torch.randn(4, 3))


def test_explicit_triton_without_gpu_says_why(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: triton can run")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=r"backend='triton' cannot run .* CUDA GPU"):
        nnfast.dense(torch.randn(2, 3), torch.randn(4, 3), backend="triton")
    assert "triton" not in nnfast.available_backends()


def test_mlp_argument_errors():
    with pytest.raises(ValueError, match="weights is empty"):
        nnfast.mlp(torch.randn(2, 3), [])
    with pytest.raises(ValueError, match="got 2 weights but 1 biases"):
        nnfast.mlp(torch.randn(2, 3), [torch.randn(4, 3), torch.randn(5, 4)], [None])


def test_fused_mlp_hidden_int_is_explained():
    with pytest.raises(TypeError, match=r"write \[64\] for one hidden layer"):
        nnfast.FusedMLP(8, 64, 4)


def test_gated_weight_needs_even_rows():
    with pytest.raises(
        ValueError, match=r"swiglu needs a weight of shape \(2 \* out_features, in_features\)"
    ):
        nnfast.dense(torch.randn(4, 8), torch.randn(7, 8), activation="swiglu")
