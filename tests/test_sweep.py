"""Property-based sweep: random shapes x strides x dtypes x activations x gradient patterns.

Every draw compares nnfast's values and the gradients asked for with a float64 reference under the
2x rule (``helpers.assert_close``). Views are built from a leaf "base" tensor by a view function
(transposed, sliced, offset, expanded stride-0, ...), so gradients are compared on the bases, which
is where autograd accumulates them for a user too.

Seeded: ``NNFAST_SWEEP_SEED`` (default 20261124) picks the draws; the tensor data comes from a torch
generator seeded by the draw, so a failure prints everything needed to reproduce it.
``NNFAST_SWEEP_EXAMPLES`` scales the number of draws (default 1.0).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import nnfast  # noqa: E402
from helpers import INTERPRET, assert_close  # noqa: E402
from nnfast.activations import GATED_NAMES, NAMES, resolve  # noqa: E402

SEED = int(os.environ.get("NNFAST_SWEEP_SEED", "20261124"))
SCALE = float(os.environ.get("NNFAST_SWEEP_EXAMPLES", "1.0"))
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
VIEWS = ("contiguous", "transposed", "sliced", "rows_sliced", "offset", "expanded")
BIAS_VIEWS = ("contiguous", "sliced", "offset", "expanded")


def _settings(examples: int) -> Callable:
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=list(hypothesis.HealthCheck),
        print_blob=True,
    )


def _backends() -> list[str]:
    names = nnfast.available_backends()
    if "triton" in names and not (INTERPRET or torch.cuda.is_available()):
        names.remove("triton")
    return names


def _dtypes(backend: str) -> list[torch.dtype]:
    if backend != "triton":
        return DTYPES
    # the interpreter multiplies the raw bits of bfloat16 tl.dot operands (see helpers)
    return (
        [torch.float32, torch.float16]
        if INTERPRET
        else [torch.float32, torch.float16, torch.bfloat16]
    )


def _view(kind: str, shape: tuple[int, ...], gen: torch.Generator):
    """(base leaf shape, function base -> view of ``shape``) for a stride pattern."""
    shape = tuple(shape)
    nd = len(shape)
    if kind == "transposed" and nd >= 2:
        base = shape[:-2] + (shape[-1], shape[-2])
        return base, lambda t: t.transpose(-1, -2)
    if kind == "sliced":  # every other element of the last dim
        return shape[:-1] + (2 * shape[-1],), lambda t: t[..., ::2]
    if kind == "rows_sliced" and nd >= 2:  # every other row, plus a column offset
        base = (2 * shape[0],) + shape[1:-1] + (shape[-1] + 1,)
        return base, lambda t: t[::2, ..., 1:]
    if kind == "offset":  # a view starting 3 elements into its storage
        n = 1
        for s in shape:
            n *= s
        return (n + 3,), lambda t: t[3:].view(shape)
    if kind == "expanded":  # stride 0 along the first dim
        return (1,) + shape[1:], lambda t: t.expand(shape)
    return shape, lambda t: t


def _random(shape, dtype, gen) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


@st.composite
def _size(draw) -> int:
    # 0 in about one draw in twelve: often enough to test empty tensors, rarely enough that most
    # draws multiply something
    if draw(st.integers(0, 11)) == 0:
        return 0
    return draw(st.one_of(st.sampled_from([1, 2, 3, 7, 16, 33]), st.integers(1, 80)))


@st.composite
def dense_case(draw, backends: list[str]):
    backend = draw(st.sampled_from(backends))
    dtype = draw(st.sampled_from(_dtypes(backend)))
    activation = draw(st.sampled_from([*NAMES, *GATED_NAMES, "leaky_relu_slope"]))
    slope = draw(st.sampled_from([-0.3, 0.0, 0.2, 1.5]))
    m, k, n = draw(_size()), draw(_size()), draw(_size())
    lead = draw(st.lists(st.integers(0, 3), min_size=0, max_size=2))
    return {
        "backend": backend,
        "dtype": dtype,
        "activation": torch.nn.LeakyReLU(slope) if activation == "leaky_relu_slope" else activation,
        "m": m,
        "k": k,
        "n": n,
        "lead": lead,
        "bias": draw(st.booleans()),
        "views": [draw(st.sampled_from(VIEWS)) for _ in range(2)]
        + [draw(st.sampled_from(BIAS_VIEWS))],
        "grads": draw(st.sampled_from(["none", "x", "weight", "bias", "all", "inference_mode"])),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _leaves(bases, wanted: set, dtype=None):
    out = []
    for i, b in enumerate(bases):
        if b is None:
            out.append(None)
            continue
        t = b.detach().clone() if dtype is None else b.detach().to(dtype)
        out.append(t.requires_grad_(i in wanted))
    return out


def run_dense_case(c: dict) -> None:
    gen = torch.Generator().manual_seed(c["seed"])
    act = resolve(c["activation"])
    rows = 2 * c["n"] if act.is_gated else c["n"]
    shapes = [(*c["lead"], c["m"], c["k"]), (rows, c["k"]), (rows,)]
    made = [_view(v, s, gen) for v, s in zip(c["views"], shapes)]
    bases = [_random(bs, c["dtype"], gen) for bs, _ in made]
    fns = [fn for _, fn in made]
    if not c["bias"]:
        bases[2] = None
    wanted = {"none": set(), "inference_mode": set(), "x": {0}, "weight": {1}, "bias": {2}}.get(
        c["grads"], {0, 1, 2}
    )
    wanted = {i for i in wanted if bases[i] is not None}

    def call(leaves, fn):
        views = [f(t) if t is not None else None for f, t in zip(fns, leaves)]
        return fn(*views)

    ours = _leaves(bases, wanted)
    plain = _leaves(bases, wanted)
    ref = _leaves(bases, wanted, torch.float64)

    def nn_fn(x, w, b):
        return nnfast.dense(x, w, b, c["activation"], backend=c["backend"])

    def torch_fn(x, w, b):
        return act(F.linear(x, w, b))

    if c["grads"] == "inference_mode":
        with torch.inference_mode():
            out = call(ours, nn_fn)
    else:
        out = call(ours, nn_fn)
    same = call(plain, torch_fn)
    want = call(ref, torch_fn)
    assert_close(out, same, want, f"output {c}")
    if not wanted:
        return
    g = _random(want.shape, torch.float64, gen)
    idx = sorted(wanted)
    got = torch.autograd.grad(out, [ours[i] for i in idx], g.to(out.dtype))
    pt = torch.autograd.grad(same, [plain[i] for i in idx], g.to(out.dtype))
    exp = torch.autograd.grad(want, [ref[i] for i in idx], g)
    for i, a, p, r in zip(idx, got, pt, exp):
        assert_close(a, p, r, f"grad of {('x', 'weight', 'bias')[i]} {c}")


_CPU_BACKENDS = [n for n in _backends() if n != "triton"]


@seed(SEED)
@_settings(600)
@given(dense_case(_CPU_BACKENDS))
def test_sweep_dense(c):
    run_dense_case(c)


@pytest.mark.skipif("triton" not in _backends(), reason="triton backend not available")
@seed(SEED)
@_settings(80)
@given(dense_case(["triton"]))
def test_sweep_dense_triton(c):
    run_dense_case(c)


@st.composite
def mlp_case(draw, backends: list[str]):
    backend = draw(st.sampled_from(backends))
    layers = draw(st.integers(1, 4))
    return {
        "backend": backend,
        "dtype": draw(st.sampled_from(_dtypes(backend))),
        "activation": draw(st.sampled_from([*NAMES, *GATED_NAMES])),
        "m": draw(st.sampled_from([0, 1, 5, 40, 129])),
        "widths": [draw(st.sampled_from([1, 3, 16, 33, 64])) for _ in range(layers + 1)],
        "biases": [draw(st.booleans()) for _ in range(layers)],
        "x_view": draw(st.sampled_from(VIEWS)),
        "w_views": [
            draw(st.sampled_from(["contiguous", "transposed", "sliced"])) for _ in range(layers)
        ],
        "checkpoint": draw(st.booleans()),
        "fused": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def run_mlp_case(c: dict, monkeypatch) -> None:
    monkeypatch.setenv("NNFAST_FUSED_MLP", "1" if c["fused"] else "0")
    gen = torch.Generator().manual_seed(c["seed"])
    act = resolve(c["activation"])
    widths, n_layers = c["widths"], len(c["biases"])
    dtype = c["dtype"]
    x_shape, x_fn = _view(c["x_view"], (c["m"], widths[0]), gen)
    x_base = _random(x_shape, dtype, gen)
    w_made, w_bases, b_bases = [], [], []
    for i in range(n_layers):
        rows = widths[i + 1] * (2 if act.is_gated and i < n_layers - 1 else 1)
        shape, fn = _view(c["w_views"][i], (rows, widths[i]), gen)
        w_made.append(fn)
        w_bases.append(_random(shape, dtype, gen) / widths[i] ** 0.5)
        b_bases.append(_random((rows,), dtype, gen) if c["biases"][i] else None)

    def run(x, ws, bs, fn):
        return fn(x_fn(x), [f(w) for f, w in zip(w_made, ws)], bs)

    def ours_fn(x, ws, bs):
        return nnfast.mlp(
            x, ws, bs, c["activation"], checkpoint=c["checkpoint"], backend=c["backend"]
        )

    def torch_fn(x, ws, bs):
        for i, (w, b) in enumerate(zip(ws, bs)):
            x = F.linear(x, w, b)
            x = act(x) if i < len(ws) - 1 else x
        return x

    def leaves(to=None):
        conv = (lambda t: t.detach().to(to)) if to else (lambda t: t.detach().clone())
        return (
            conv(x_base).requires_grad_(),
            [conv(w).requires_grad_() for w in w_bases],
            [conv(b).requires_grad_() if b is not None else None for b in b_bases],
        )

    ours, plain, ref = leaves(), leaves(), leaves(torch.float64)
    out, same, want = run(*ours, ours_fn), run(*plain, torch_fn), run(*ref, torch_fn)
    assert_close(out, same, want, f"output {c}")
    g = _random(want.shape, torch.float64, gen)

    def flat(t):
        return [t[0], *t[1], *[b for b in t[2] if b is not None]]

    got = torch.autograd.grad(out, flat(ours), g.to(dtype), allow_unused=True)
    pt = torch.autograd.grad(same, flat(plain), g.to(dtype), allow_unused=True)
    exp = torch.autograd.grad(want, flat(ref), g, allow_unused=True)
    for j, (a, p, r) in enumerate(zip(got, pt, exp)):
        if r is None:
            assert a is None or a.abs().max() == 0
            continue
        assert_close(a, p, r, f"gradient {j} {c}")


@seed(SEED)
@_settings(150)
@given(mlp_case(_CPU_BACKENDS))
def test_sweep_mlp(c):
    with pytest.MonkeyPatch.context() as mp:
        run_mlp_case(c, mp)


@pytest.mark.skipif("triton" not in _backends(), reason="triton backend not available")
@seed(SEED)
@_settings(30)
@given(mlp_case(["triton"]))
def test_sweep_mlp_triton(c):
    with pytest.MonkeyPatch.context() as mp:
        run_mlp_case(c, mp)
