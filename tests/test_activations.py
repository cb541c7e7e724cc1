"""The activation table: names, aliases, modules, functions, errors, and f' against autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nnfast
from nnfast.activations import TABLE, resolve


@pytest.mark.parametrize(
    "given,name,param",
    [
        (None, "identity", 0.0),
        ("linear", "identity", 0.0),
        ("ReLU", "relu", 0.0),
        ("LEAKY_RELU", "leaky_relu", 0.01),
        ("leaky-relu", "leaky_relu", 0.01),
        ("gelu", "gelu", 0.0),
        ("gelu_tanh", "gelu_tanh", 0.0),
        ("Swish", "silu", 0.0),
        ("sigmoid", "sigmoid", 0.0),
        ("tanh", "tanh", 0.0),
        ("squared_relu", "squared_relu", 0.0),
        (nn.ReLU(), "relu", 0.0),
        (nn.GELU(), "gelu", 0.0),
        (nn.GELU(approximate="tanh"), "gelu_tanh", 0.0),
        (nn.LeakyReLU(0.2), "leaky_relu", 0.2),
        (nn.SiLU(), "silu", 0.0),
        (nn.Sigmoid(), "sigmoid", 0.0),
        (nn.Tanh(), "tanh", 0.0),
        (nn.Identity(), "identity", 0.0),
        (F.relu, "relu", 0.0),
        (torch.relu, "relu", 0.0),
        (F.gelu, "gelu", 0.0),
        (F.silu, "silu", 0.0),
        (F.leaky_relu, "leaky_relu", 0.01),
        (torch.sigmoid, "sigmoid", 0.0),
        (torch.tanh, "tanh", 0.0),
    ],
)
def test_resolve(given, name, param):
    spec = resolve(given)
    assert spec.name == name
    assert spec.param == pytest.approx(param)


def test_gelu_is_never_silently_tanh():
    x = torch.randn(1000, dtype=torch.float64) * 3
    assert torch.equal(resolve("gelu")(x), F.gelu(x))
    assert not torch.equal(resolve("gelu")(x), F.gelu(x, approximate="tanh"))


@pytest.mark.parametrize("given", ["gleu", "relu6", "softmax", nn.ReLU6(), F.softplus, 3])
def test_unknown_activation_lists_names(given):
    with pytest.raises(ValueError, match="unsupported activation") as e:
        resolve(given)
    for name in nnfast.ACTIVATIONS:
        assert name in str(e.value)


def test_unknown_activation_suggests_closest():
    with pytest.raises(ValueError, match="Did you mean 'gelu'"):
        resolve("gleu")
    with pytest.raises(ValueError, match="Did you mean 'silu'"):
        nnfast.dense(torch.randn(2, 3), torch.randn(4, 3), activation="silo")


def test_module_subclass_is_rejected():
    # a subclass may change forward: computing nn.ReLU's math for it would be silent miscomputation
    class MyReLU(nn.ReLU):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(ValueError, match="unsupported activation"):
        resolve(MyReLU())


@pytest.mark.parametrize("row", [a for a in TABLE if a.gated_base is None], ids=lambda a: a.name)
def test_table_derivative_matches_autograd(row):
    # f' evaluated on what backward keeps (output or pre-activation) vs autograd of f, float64
    for param in {row.default_param, 0.3, -0.2} if row.name == "leaky_relu" else {0.0}:
        spec = nnfast.activations.ActivationSpec(row, param)
        x = (torch.randn(4096, dtype=torch.float64) * 3).requires_grad_()
        y = spec(x)
        (want,) = torch.autograd.grad(y.sum(), x)
        saved = y.detach() if spec.from_output else x.detach()
        # float64: PyTorch's own GeluBackward differs from the closed form by up to ~1.5e-11 in some
        # runs (its vectorized path), so 1e-9 here; a wrong formula is off by far more
        torch.testing.assert_close(
            spec.grad(saved),
            want,
            rtol=1e-8,
            atol=1e-9,
            msg=lambda m, p=param: f"{row.name} {p}: {m}",
        )


def test_codes_are_unique_and_stable():
    assert sorted(a.code for a in TABLE) == list(range(len(TABLE)))
