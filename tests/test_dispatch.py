"""The measuring dispatcher: what it chooses, what its keys separate, and the settings around it."""

from __future__ import annotations

import pytest
import torch

import nnfast
from helpers import eager_mlp_of
from nnfast import functional
from nnfast._backends import chooser
from nnfast.activations import resolve


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.delenv("NNFAST_BACKEND", raising=False)
    monkeypatch.setattr(chooser, "_mode", "measure")
    saved = dict(chooser._decisions)
    chooser.clear()
    yield
    chooser.clear()
    chooser._decisions.update(saved)


def _slow(path_name, monkeypatch, seconds: float = 1.0, run_path=None):
    """functional._run with a path (or a set of them) made slow (a fake slow candidate): the timer
    adds ``seconds`` to every timed call of that path. (A real sleep or busy wait would also slow
    whichever candidate runs next on this 2-core machine, through the thread pools' wake-up.)"""
    state = {"slow": False}
    timed = chooser._timed

    def fake_timed(run, x):
        state["slow"] = False
        t = timed(run, x)
        return t + seconds if state["slow"] else t

    monkeypatch.setattr(chooser, "_timed", fake_timed)

    slow = {path_name} if isinstance(path_name, str) else set(path_name)

    def run(path, *args):
        state["slow"] = state["slow"] or path in slow
        return (run_path or functional._run)(path, *args)

    return run


@pytest.mark.parametrize("training", [False, True])
def test_a_slow_candidate_is_not_chosen(training, monkeypatch):
    x, w, b = torch.randn(4, 16), torch.randn(8, 16), torch.randn(8)
    act = resolve("gelu")
    paths = chooser.candidates(x, act, training)
    assert chooser.UNFUSED in paths and len(paths) >= 2
    for slow in paths:
        chooser.clear()
        choice = chooser.choose(x, w, b, act, training, _slow(slow, monkeypatch))
        assert choice != slow, chooser.report()
        (d,) = chooser.decisions()
        assert set(d.times_ms) == set(paths) and d.times_ms[slow] >= 1000.0


def test_keys_separate_what_they_must():
    act, x, w = resolve("gelu"), torch.randn(5, 16), torch.randn(8, 16)
    key = chooser.key_of(x, w, None, act, False)
    assert chooser.key_of(torch.randn(7, 16), w, None, act, False) == key  # same M bucket (8)
    different = [
        chooser.key_of(torch.randn(9, 16), w, None, act, False),  # M bucket 16
        chooser.key_of(x, w, torch.randn(8), act, False),  # bias
        chooser.key_of(x, w, None, act, True),  # training
        chooser.key_of(x, w, None, resolve("relu"), False),  # activation
        chooser.key_of(x, w, None, resolve(torch.nn.LeakyReLU(0.3)), False),
        chooser.key_of(x, w, None, resolve(torch.nn.LeakyReLU(0.2)), False),  # its parameter
        chooser.key_of(x.double(), w.double(), None, act, False),  # dtype
        chooser.key_of(x, torch.randn(9, 16), None, act, False),  # N
        chooser.key_of(torch.randn(5, 17), torch.randn(8, 17), None, act, False),  # K
        chooser.key_of(x, torch.randn(16, 16), None, resolve("swiglu"), False),  # gated
    ]
    assert len({key, *different}) == len(different) + 1


def test_dense_measures_once_per_key_and_reports(capsys, monkeypatch):
    monkeypatch.setenv("NNFAST_DISPATCH_LOG", "1")
    x, w, b = torch.randn(3, 16), torch.randn(8, 16), torch.randn(8)
    for m in (3, 4, 3):  # one bucket
        out = nnfast.dense(torch.randn(m, 16), w, b, "silu")
        assert out.shape == (m, 8)
    assert len(chooser.decisions()) == 1
    torch.testing.assert_close(nnfast.dense(x, w, b, "silu"), torch.nn.functional.silu(x @ w.T + b))
    line = nnfast.dispatch_report()
    assert "silu infer M<=4 N=8 K=16 bias" in line and "unfused" in line and "ms" in line
    assert "nnfast dispatch:" in capsys.readouterr().err
    # training is its own key, and the chosen path's gradients are right
    xg = x.clone().requires_grad_()
    nnfast.dense(xg, w, b, "silu").sum().backward()
    ref = x.clone().requires_grad_()
    torch.nn.functional.silu(ref @ w.T + b).sum().backward()
    torch.testing.assert_close(xg.grad, ref.grad)
    assert len(chooser.decisions()) == 2


def test_fixed_mode_and_explicit_backend_do_not_measure(monkeypatch):
    x, w = torch.randn(3, 16), torch.randn(8, 16)
    nnfast.set_dispatch("fixed")
    try:
        calls = []
        monkeypatch.setattr(chooser, "measure", lambda *a: calls.append(a))
        out = nnfast.dense(x, w, None, "gelu")
        assert calls == [] and chooser.decisions() == []
        fixed = nnfast._backends.select(None, "cpu", torch.float32)
        torch.testing.assert_close(out, nnfast.dense(x, w, None, "gelu", backend=fixed))
    finally:
        nnfast.set_dispatch("measure")
    nnfast.dense(x, w, None, "gelu", backend="reference")
    assert chooser.decisions() == []
    with pytest.raises(ValueError, match="'measure' or 'fixed'"):
        nnfast.set_dispatch("fastest")


def test_decisions_on_disk(monkeypatch, tmp_path):
    monkeypatch.setenv("NNFAST_DISPATCH_CACHE", "1")
    monkeypatch.setenv("NNFAST_CACHE", str(tmp_path))
    monkeypatch.setattr(chooser, "_disk_loaded", set())
    monkeypatch.setattr(chooser, "CONFIRM_AFTER", 1)
    x, w = torch.randn(3, 16), torch.randn(8, 16)
    nnfast.dense(x, w, None, "tanh")
    assert not list(tmp_path.glob("dispatch-*.json"))  # a first measurement is not kept on disk
    nnfast.dense(x, w, None, "tanh")  # the confirming one is
    (path,) = tmp_path.glob("dispatch-*.json")
    made = chooser.decisions()[0]
    chooser.clear()
    monkeypatch.setattr(chooser, "_disk_loaded", set())
    monkeypatch.setattr(chooser, "measure", lambda *a: pytest.fail("measured again"))
    nnfast.dense(x, w, None, "tanh")
    (loaded,) = chooser.decisions()
    assert loaded.key == made.key and loaded.choice == made.choice
    assert path.stat().st_size > 0


def test_compile_uses_the_decision_made_in_eager():
    torch._dynamo.reset()
    x, w, b = torch.randn(4, 16), torch.randn(8, 16), torch.randn(8)
    act = resolve("gelu")
    key = chooser.key_of(x, w, b, act, False)
    chooser._decisions[key] = chooser.Decision(key, chooser.UNFUSED, {chooser.UNFUSED: 0.0})
    seen = []

    def backend(gm, inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes)
        return gm

    f = torch.compile(lambda x: nnfast.dense(x, w, b, "gelu"), backend=backend, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(f(x), torch.nn.functional.gelu(x @ w.T + b))
    assert not any("nnfast" in s for s in seen)


def test_no_measuring_in_a_distributed_job():
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert chooser.measuring()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        assert not chooser.measuring()  # ranks must not take different paths
        nnfast.dense(torch.randn(2, 4), torch.randn(3, 4), None, "gelu")
        assert chooser.decisions() == []
    finally:
        dist.destroy_process_group()
    assert chooser.measuring()


def test_a_near_tie_goes_to_the_unfused_path():
    # the fastest fused path must win by MARGIN; otherwise PyTorch itself runs
    u = 1.0
    assert chooser.pick({"extension": u * (1 - chooser.MARGIN / 2), "unfused": u}) == "unfused"
    assert chooser.pick({"extension": u * (1 - 2 * chooser.MARGIN), "unfused": u}) == "extension"
    assert chooser.pick({"extension": 2.0, "onednn": 0.5, "unfused": u}) == "onednn"
    assert chooser.pick({"extension": 2.0, "unfused": u}) == "unfused"
    # training steps vary more: a wider margin there
    between = {"extension": u * (1 - (chooser.MARGIN + chooser.TRAIN_MARGIN) / 2), "unfused": u}
    assert chooser.pick(between) == "extension"
    assert chooser.pick(between, training=True) == "unfused"


def test_trials_rotate_within_twice_the_last_level_cache():
    budget = chooser._rotate_budget("cpu")
    assert 64 * 2**20 <= budget <= 256 * 2**20


def _mlp_args(widths=(6, 16, 16, 3), m=40, bias=True):
    x = torch.randn(m, widths[0])
    ws = [torch.randn(o, i) / i**0.5 for i, o in zip(widths, widths[1:])]
    bs = [torch.randn(o) if bias else torch.empty(0) for o in widths[1:]]
    return x, ws, bs


@pytest.mark.parametrize("mode", [0, 1, chooser.SECOND_ORDER])
def test_mlp_a_slow_candidate_is_not_chosen(mode, monkeypatch):
    x, ws, bs = _mlp_args()
    act = resolve("silu")
    runner = functional._mlp_runner(nnfast._backends.select(None, "cpu", x.dtype), mode > 0)
    for slow in (chooser.FUSED, chooser.UNFUSED):
        chooser.clear()
        run = _slow(slow, monkeypatch, run_path=runner)
        choice = chooser.choose_mlp(x, ws, bs, act, mode, run)
        assert choice != slow, chooser.report()
        (d,) = chooser.decisions()
        assert d.times_ms[slow] >= 1000.0 and "MLP M<=64 6->16->16->3 bias" in d.describe()


def test_mlp_keys_separate_what_they_must():
    act = resolve("gelu")
    x, ws, bs = _mlp_args()
    key = chooser.mlp_key(x, ws, bs, act, 1)
    assert chooser.mlp_key(torch.randn(50, 6), ws, bs, act, 1) == key  # same M bucket (64)
    x2, ws2, _ = _mlp_args((6, 16, 17, 3))
    different = [
        chooser.mlp_key(torch.randn(70, 6), ws, bs, act, 1),  # M bucket
        chooser.mlp_key(x, ws, bs, act, 0),  # inference
        chooser.mlp_key(x, ws, bs, act, chooser.SECOND_ORDER),  # through the input gradient
        chooser.mlp_key(x, ws, [bs[0], torch.empty(0), bs[2]], act, 1),  # bias pattern
        chooser.mlp_key(x2, ws2, bs, act, 1),  # widths
        chooser.mlp_key(x, ws, bs, resolve("tanh"), 1),  # activation
        chooser.mlp_key(x.double(), ws, bs, act, 1),  # dtype
        chooser.key_of(x, ws[0], bs[0], act, True),  # a dense layer's key
    ]
    assert len({key, *different}) == len(different) + 1
    leaf = torch.randn(4, 6, requires_grad=True)
    assert chooser.mlp_mode(leaf, True) == chooser.SECOND_ORDER
    assert chooser.mlp_mode(leaf * 2, True) == 1 and chooser.mlp_mode(leaf, False) == 0


def test_fused_mlp_measures_once_and_runs_the_chosen_path(monkeypatch):
    model = nnfast.FusedMLP(6, [16, 16], 3, activation="silu")
    x = torch.randn(40, 6)
    ran = []
    impl = nnfast._ops._mlp_forward_impl

    def counting(*a):
        ran.append("fused")
        return impl(*a)

    monkeypatch.setattr(nnfast._ops, "_mlp_forward_impl", counting)
    want = eager_mlp_of(model, x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want)
        (d,) = [d for d in chooser.decisions() if d.key[0] == "mlp"]
        ran.clear()
        for choice in (chooser.FUSED, chooser.UNFUSED):
            chooser._decisions[d.key] = chooser.Decision(d.key, choice, d.times_ms)
            torch.testing.assert_close(model(x), want)
            assert ran == (["fused"] if choice == chooser.FUSED else []), choice
            ran.clear()
    # measuring off: always nnfast's MLP op (the fixed order), nothing measured
    chooser.clear()
    nnfast.set_dispatch("fixed")
    try:
        xg = x.clone().requires_grad_()
        model(xg).sum().backward()
        assert ran == ["fused"] and chooser.decisions() == []
    finally:
        nnfast.set_dispatch("measure")


def test_mlp_decisions_on_disk(monkeypatch, tmp_path):
    monkeypatch.setenv("NNFAST_DISPATCH_CACHE", "1")
    monkeypatch.setenv("NNFAST_CACHE", str(tmp_path))
    monkeypatch.setattr(chooser, "_disk_loaded", set())
    monkeypatch.setattr(chooser, "CONFIRM_AFTER", 1)
    model = nnfast.FusedMLP(6, [16], 3, activation="tanh", bias=False)
    with torch.no_grad():
        model(torch.randn(5, 6))
        model(torch.randn(5, 6))
    (made,) = chooser.decisions()
    assert made.confirmed
    chooser.clear()
    monkeypatch.setattr(chooser, "_disk_loaded", set())
    monkeypatch.setattr(chooser, "time_paths", lambda *a: pytest.fail("measured again"))
    with torch.no_grad():
        model(torch.randn(5, 6))
    (loaded,) = chooser.decisions()
    assert loaded.key == made.key and loaded.choice == made.choice


def test_a_decision_is_measured_again_in_the_steady_state(monkeypatch):
    # the first measurement (cold) says unfused is slow; the one after CONFIRM_AFTER calls is final
    x, w, b = torch.randn(4, 16), torch.randn(8, 16), torch.randn(8)
    act = resolve("gelu")
    run = _slow(chooser.UNFUSED, monkeypatch)
    assert chooser.choose(x, w, b, act, False, run) != chooser.UNFUSED
    (first,) = chooser.decisions()
    assert not first.confirmed
    fused = {p for p in chooser.candidates(x, act, False) if p != chooser.UNFUSED}
    run = _slow(fused, monkeypatch)  # now every fused path is the slow one
    for _ in range(chooser.CONFIRM_AFTER - 1):
        assert chooser.choose(x, w, b, act, False, run) == first.choice
    assert chooser.choose(x, w, b, act, False, run) == chooser.UNFUSED
    (final,) = chooser.decisions()
    assert final.confirmed and final.choice == chooser.UNFUSED
    for _ in range(3):  # and stays
        assert chooser.choose(x, w, b, act, False, run) == chooser.UNFUSED


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_first_measurement_inside_a_checkpoint(use_reentrant):
    # the decision is made during the checkpointed forward (under its saved-tensor hooks); the
    # trial runs must not reach those hooks, and the recomputation must save what the forward did
    torch.manual_seed(0)
    layer = nnfast.FusedDense(16, 24, activation="silu").double()
    ref = torch.nn.Linear(16, 24).double()
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    out = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=use_reentrant)
    assert len(chooser.decisions()) == 1, chooser.report()
    g = torch.randn_like(out)
    out.backward(g)  # (reentrant checkpoints refuse autograd.grad)
    got = (x.grad, layer.weight.grad, layer.bias.grad)
    x_ref = x.detach().requires_grad_()
    out_ref = torch.nn.functional.silu(ref(x_ref))
    want = torch.autograd.grad(out_ref, (x_ref, ref.weight, ref.bias), g)
    torch.testing.assert_close(out, out_ref)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_after_a_confirmed_decision_every_setting_still_counts(monkeypatch):
    # the one-lookup path for confirmed decisions must still see NNFAST_BACKEND, fixed mode,
    # autocast, N-D inputs, bad arguments and the transforms
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 16), torch.randn(8, 16), torch.randn(8)
    for _ in range(chooser.CONFIRM_AFTER + 1):
        nnfast.dense(x, w, b, "gelu")
    (d,) = chooser.decisions()
    assert d.confirmed
    # a path that fails loudly stands for "the decision was used"
    monkeypatch.setattr(d, "choice", "no-such-path")
    with pytest.raises(Exception, match="no-such-path|unknown backend"):
        nnfast.dense(x, w, b, "gelu")
    ref = torch.nn.functional.gelu(x @ w.T + b)
    monkeypatch.setenv("NNFAST_BACKEND", "reference")
    torch.testing.assert_close(nnfast.dense(x, w, b, "gelu"), ref)
    monkeypatch.delenv("NNFAST_BACKEND")
    torch.testing.assert_close(nnfast.dense(x, w, b, "gelu", backend="reference"), ref)
    with chooser.fixed():
        torch.testing.assert_close(nnfast.dense(x, w, b, "gelu"), ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert nnfast.dense(x, w, b, "gelu").dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        nnfast.dense(x, w, b[:4], "gelu")
    with pytest.raises(TypeError, match="x has dtype torch.float32 but weight has dtype"):
        nnfast.dense(x, w.double(), b, "gelu")
    g = torch.func.grad(lambda x: nnfast.dense(x, w, b, "gelu").sum())(x)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("training", [0, 1, chooser.SECOND_ORDER])
def test_trial_calls_rotate_over_copies_of_the_operands(training, monkeypatch):
    # operands that fit the rotation budget are timed over copies (not all cache-resident), with
    # the same values; larger ones over the tensors themselves
    x, w, b = torch.randn(4, 16), torch.randn(8, 16), torch.randn(8)
    x.requires_grad_(training == chooser.SECOND_ORDER)
    seen = {}

    def run(path, x_, w_, b_, grads):
        seen.setdefault(w_.data_ptr(), (x_, w_, b_))
        return torch.nn.functional.silu(torch.nn.functional.linear(x_, w_, b_))

    chooser.time_paths(["a", chooser.UNFUSED], x, [x, w, b], training, run)
    assert len(seen) == chooser._MAX_COPIES
    for x_, w_, b_ in seen.values():
        assert torch.equal(x_, x) and torch.equal(w_, w) and torch.equal(b_, b)
        assert x_.requires_grad == w_.requires_grad == b_.requires_grad == bool(training)
    seen.clear()
    monkeypatch.setattr(chooser, "_ROTATE_BYTES", 100)
    chooser.time_paths(["a", chooser.UNFUSED], x, [x, w, b], training, run)
    assert len(seen) == 1


@pytest.mark.parametrize("bias", [True, False])
def test_fused_mlp_runs_a_confirmed_choice_and_every_setting_still_counts(bias, monkeypatch):
    torch.manual_seed(0)
    model = nnfast.FusedMLP(6, [16, 16], 3, activation="silu", bias=bias)
    x = torch.randn(40, 6)
    ran = []
    impl = nnfast._ops._mlp_forward_impl
    monkeypatch.setattr(
        nnfast._ops, "_mlp_forward_impl", lambda *a: ran.append("fused") or impl(*a)
    )
    with torch.no_grad():
        want = eager_mlp_of(model, x)
        model(x)
    xg = x.clone().requires_grad_().clone()  # not a leaf: a plain training step
    params = [xg, *model.parameters()]
    g = torch.randn(40, 3)
    want_grads = torch.autograd.grad(eager_mlp_of(model, xg), params, g)
    model(xg)
    assert len(chooser.decisions()) == 2
    for d in chooser.decisions():
        for choice in (chooser.FUSED, chooser.UNFUSED):
            chooser._decisions[d.key] = chooser.Decision(d.key, choice, {}, 0, True)
            ran.clear()
            if d.key[5]:  # training
                got = torch.autograd.grad(model(xg), params, g)
                for a, b in zip(got, want_grads):
                    torch.testing.assert_close(a, b)
            else:
                with torch.no_grad():
                    torch.testing.assert_close(model(x), want)
            assert ran == (["fused"] if choice == chooser.FUSED else []), (d.key, choice)
    # with PyTorch's path confirmed for inference, the settings still reach the op
    (infer,) = [d for d in chooser.decisions() if not d.key[5]]
    chooser._decisions[infer.key] = chooser.Decision(infer.key, chooser.UNFUSED, {}, 0, True)
    with torch.no_grad():
        for setting in (
            chooser.fixed(),
            pytest.MonkeyPatch.context(),  # NNFAST_BACKEND, set inside
        ):
            with setting as mp:
                if mp is not None:
                    mp.setenv("NNFAST_BACKEND", "reference")
                ran.clear()
                torch.testing.assert_close(model(x), want)
                assert ran == ["fused"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model(x).dtype == torch.bfloat16
        with pytest.raises(ValueError, match="mlp\\(\\): layer 0: x has last dimension 5"):
            model(x[:, :5])


def test_a_slow_key_is_confirmed_after_seconds_not_fifty_calls(monkeypatch):
    # an MLP step of a second would take a minute to reach 50 calls: time counts too
    x, w, b = torch.randn(4, 16), torch.randn(8, 16), torch.randn(8)
    act = resolve("gelu")
    run = _slow(chooser.UNFUSED, monkeypatch)
    chooser.choose(x, w, b, act, False, run)
    monkeypatch.setattr(chooser, "CONFIRM_AFTER_S", 0.0)
    for _ in range(chooser.CONFIRM_MIN_USES - 1):
        chooser.choose(x, w, b, act, False, run)
        assert not chooser.decisions()[0].confirmed
    chooser.choose(x, w, b, act, False, run)
    assert chooser.decisions()[0].confirmed


def _layouts(m: int, k: int, n: int, rows: int):
    """(name, x, weight, bias) in the layouts a user can pass: contiguous, transposed, sliced,
    offset views, expanded (stride-0) and strided biases, no bias."""
    x = torch.randn(m, k)
    w, b = torch.randn(rows, k) / k**0.5, torch.randn(rows)
    yield "contiguous", x, w, b
    yield "x transposed", torch.randn(k, m).t(), w, b
    yield "x sliced", torch.randn(m, 2 * k)[:, ::2], w, b
    yield "x offset view", torch.randn(m + 3, k)[3:], w, b
    yield "weight transposed", x, (torch.randn(k, rows) / k**0.5).t(), b
    yield "weight sliced", x, (torch.randn(rows, 2 * k) / k**0.5)[:, 1::2], b
    yield "bias expanded", x, w, torch.randn(1).expand(rows)
    yield "bias strided", x, w, torch.randn(2 * rows)[::2]
    yield "no bias", x, w, None


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("m", [0, 1, 7])
def test_confirmed_path_every_layout_against_float64(activation, training, m, monkeypatch):
    # every path the dispatcher can confirm, run by dense()'s C++ fast path (the general route's
    # measuring is made to fail, so a call that reached it would show), against float64
    from helpers import assert_close, torch_dense

    act = resolve(activation)
    k, n = 12, 10
    rows = 2 * n if act.is_gated else n
    monkeypatch.setattr(chooser, "_decide", lambda *a: pytest.fail("general route taken"))
    for path in chooser.candidates(torch.randn(max(m, 1), k), act, training):
        for name, *tensors in _layouts(m, k, n, rows):
            what = f"{path} {name} M={m} {'train' if training else 'infer'}"
            # the layout itself goes in (a view with no history is a leaf, gradients and all)
            tensors = [t.requires_grad_(training) if t is not None else None for t in tensors]
            key = chooser.key_of(*tensors, act, training)
            chooser._decisions[key] = chooser.Decision(key, path, {}, 0, True)
            with torch.set_grad_enabled(training):
                out = nnfast.dense(*tensors, activation)
                same = torch_dense(*tensors, act)  # PyTorch in float32: the tolerance's base
            r64 = [t.detach().double().requires_grad_() if t is not None else None for t in tensors]
            ref64 = torch_dense(*r64, act)
            assert_close(out, same, ref64, what)
            if training:
                g = torch.randn_like(out)
                wrt = [t for t in tensors if t is not None]
                got = torch.autograd.grad(out, wrt, g)
                base = torch.autograd.grad(same, wrt, g)
                want = torch.autograd.grad(ref64, [t for t in r64 if t is not None], g.double())
                for a, s_, e, t in zip(got, base, want, "xwb"):
                    assert_close(a, s_, e, f"{what} grad {t}")
            chooser._decisions.pop(key)


def test_confirmed_mlp_path_every_layout_against_float64(monkeypatch):
    from helpers import assert_close, eager_mlp

    monkeypatch.setattr(chooser, "_decide", lambda *a: pytest.fail("general route taken"))
    act = resolve("silu")
    for m in (0, 1, 7):
        for name, x, w0, b0 in _layouts(m, 12, 10, 10):
            w1, b1 = torch.randn(10, 6).t(), None  # a second layer: transposed, no bias
            weights, biases = [w0, w1], [b0, b1]
            for training in (False, True):
                params = [t.requires_grad_(training) for t in (x, w0, w1)]
                key = chooser.mlp_key(x, weights, biases, act, chooser.mlp_mode(x, training))
                for path in (chooser.FUSED, chooser.UNFUSED):
                    what = f"mlp {path} {name} M={m} {'train' if training else 'infer'}"
                    chooser._decisions[key] = chooser.Decision(key, path, {}, 0, True)
                    with torch.set_grad_enabled(training):
                        out = nnfast.mlp(x, weights, biases, act)
                        same = eager_mlp(x, weights, biases, act)
                    r = [t.detach().double().requires_grad_() for t in params]
                    rb = [b0.detach().double() if b0 is not None else None, None]
                    ref64 = eager_mlp(r[0], r[1:], rb, act)
                    assert_close(out, same, ref64, what)
                    if training:
                        g = torch.randn_like(out)
                        got = torch.autograd.grad(out, params, g)
                        base = torch.autograd.grad(same, params, g)
                        want = torch.autograd.grad(ref64, r, g.double())
                        for a, s_, e in zip(got, base, want):
                            assert_close(a, s_, e, f"{what} grad")
                chooser._decisions.pop(key)


# ---- csrc/fast.cpp: the common call in one C++ call ----------------------------------------------


def _fast():
    from nnfast._backends import extension

    assert extension.unavailable() is None, extension.unavailable()
    return extension.fast


def _confirmed(key, choice):
    return {key: chooser.Decision(key, choice, {}, 0, True)}


def _dense_cases():
    leaky = resolve(torch.nn.LeakyReLU(0.2))
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for act in (resolve("gelu"), leaky, resolve("swiglu")):
            for lead in ((0,), (1,), (3,), (8,), (9,), (2, 5)):
                for bias in (True, False):
                    for grad in ("none", "x", "weight"):
                        k, rows = 6, 8
                        x = torch.randn(*lead, k, dtype=dtype)
                        w = torch.randn(rows, k, dtype=dtype)
                        b = torch.randn(rows, dtype=dtype) if bias else None
                        if grad != "none":
                            (x if grad == "x" else w).requires_grad_()
                        yield act, x, w, b


def test_fast_path_key_is_the_dispatchers_key():
    # the C++ key must be chooser.key_of's: a confirmed decision under the Python key is found
    # (the probe choice comes back for Python to run), and nothing is found under another key
    fast = _fast()
    for act, x, w, b in _dense_cases():
        needs_grad = x.requires_grad or w.requires_grad
        key = chooser.key_of(x.reshape(-1, x.shape[-1]), w, b, act, needs_grad)
        what = f"{act} x {tuple(x.shape)} {x.dtype} bias={b is not None} grad={needs_grad}"
        assert fast.dense(x, w, b, act, _confirmed(key, "probe")) == "probe", what
        assert fast.dense(x, w, b, act, {key: chooser.Decision(key, "probe")}) is None, what
        with torch.no_grad():  # another key: inference
            expect = None if needs_grad else "probe"
            assert fast.dense(x, w, b, act, _confirmed(key, "probe")) == expect, what
        other = (*key[:-1], key[-1] + 1)
        assert fast.dense(x, w, b, act, _confirmed(other, "probe")) is None, what


def test_fast_path_mlp_key_is_the_dispatchers_key():
    fast = _fast()
    for act in (resolve("silu"), resolve(torch.nn.LeakyReLU(0.3)), resolve("geglu")):
        rows = 2 if act.is_gated else 1
        for lead in ((0,), (1,), (5,), (2, 3)):
            for biases in ("all", "none", "some"):
                for mode in ("infer", "leaf x", "non-leaf x", "weights"):
                    x = torch.randn(*lead, 6)
                    ws = [torch.randn(4 * rows, 6), torch.randn(3 * rows, 4), torch.randn(5, 3)]
                    bs = {
                        "all": [torch.randn(w.shape[0]) for w in ws],
                        "none": [None] * 3,
                        "some": [None, torch.randn(3 * rows), torch.randn(5)],
                    }[biases]
                    if mode == "leaf x":
                        x.requires_grad_()
                    elif mode == "non-leaf x":
                        x = torch.randn(*lead, 6, requires_grad=True) * 1.0
                    elif mode == "weights":
                        ws[1].requires_grad_()
                    needs_grad = mode != "infer"
                    x2 = x.reshape(-1, 6)
                    key = chooser.mlp_key(x2, ws, bs, act, chooser.mlp_mode(x, needs_grad))
                    what = f"{act} x {tuple(x.shape)} biases {biases} {mode}"
                    assert fast.mlp(x, ws, bs, act, _confirmed(key, "probe")) == "probe", what
                    assert fast.mlp(x, ws, bs, act, {key: chooser.Decision(key, "probe")}) is None
                    other = (*key[:-1], (*key[-1][:-1], not key[-1][-1]))
                    assert fast.mlp(x, ws, bs, act, _confirmed(other, "probe")) is None, what


def _gradients(out, leaves):
    g = torch.ones_like(out).normal_(generator=torch.Generator().manual_seed(1))
    return torch.autograd.grad(out, leaves, g)


@pytest.mark.parametrize("training", [False, True])
def test_fast_path_unfused_is_pytorch_bitwise(training):
    # the C++ unfused path runs the table's PyTorch math as the same ATen calls: every activation,
    # outputs and gradients identical to act(F.linear(...)) (2-D and 3-D x, with and without bias)
    from nnfast.activations import TABLE, ActivationSpec

    fast = _fast()
    for row in TABLE:
        act = ActivationSpec(row, 0.2 if row.name == "leaky_relu" else row.default_param)
        rows = 10 if act.is_gated else 5
        for lead, bias in (((7,), True), ((2, 3), False)):
            x = torch.randn(*lead, 4, requires_grad=training)
            w = torch.randn(rows, 4, requires_grad=training)
            b = torch.randn(rows, requires_grad=training) if bias else None
            key = chooser.key_of(x.reshape(-1, 4), w, b, act, training)
            with torch.set_grad_enabled(training):
                got = fast.dense(x, w, b, act, _confirmed(key, chooser.UNFUSED))
                want = act(torch.nn.functional.linear(x, w, b))
            what = f"{act} x {tuple(x.shape)} bias={bias}"
            assert isinstance(got, torch.Tensor), what
            assert torch.equal(got, want), what
            if training:
                leaves = [t for t in (x, w, b) if t is not None]
                for a, e in zip(_gradients(got, leaves), _gradients(want, leaves)):
                    assert torch.equal(a, e), what


@pytest.mark.parametrize("training", [False, True])
def test_fast_path_mlp_unfused_is_pytorch_bitwise(training):
    from helpers import eager_mlp

    fast = _fast()
    for name in ("relu", "gelu_tanh", "quick_gelu", "swiglu"):
        act = resolve(name)
        rows = 2 if act.is_gated else 1
        x = torch.randn(2, 3, 6, requires_grad=training)
        ws = [torch.randn(4 * rows, 6, requires_grad=training), torch.randn(5, 4)]
        bs = [torch.randn(4 * rows, requires_grad=training), None]
        key = chooser.mlp_key(x.reshape(-1, 6), ws, bs, act, chooser.mlp_mode(x, training))
        with torch.set_grad_enabled(training):
            got = fast.mlp(x, ws, bs, act, _confirmed(key, chooser.UNFUSED))
            want = eager_mlp(x, ws, bs, act)
        assert torch.equal(got, want), name
        if training:
            leaves = [x, ws[0], bs[0]]
            for a, e in zip(_gradients(got, leaves), _gradients(want, leaves)):
                assert torch.equal(a, e), name


def test_fast_path_declines_what_it_does_not_check():
    # None (Python's general path, with its checks and messages) for anything unusual, even with a
    # decision confirmed for every key the call could have
    fast = _fast()
    act = resolve("gelu")
    x, w, b = torch.randn(3, 4), torch.randn(5, 4), torch.randn(5)

    class Sub(torch.Tensor):
        pass

    everything = type("AnyKey", (dict,), {"get": lambda self, k: None})()
    key = chooser.key_of(x, w, b, act, False)
    yes = _confirmed(key, chooser.UNFUSED)
    assert isinstance(fast.dense(x, w, b, act, yes), torch.Tensor)
    for what, args in {
        "x subclass": (x.as_subclass(Sub), w, b),
        "weight subclass": (x, w.as_subclass(Sub), b),
        "integer x": (x.long(), w, b),
        "0-d x": (torch.tensor(1.0), w, b),
        "in_features mismatch": (torch.randn(3, 6), w, b),
        "weight 1-D": (x, torch.randn(4), b),
        "weight dtype": (x, w.double(), b),
        "bias dtype": (x, w, b.double()),
        "bias shape": (x, w, torch.randn(4)),
        "bias 2-D": (x, w, b[None]),
        "not a tensor": (x.tolist(), w, b),
        "bias not a tensor": (x, w, 1.0),
        "in_features 0": (torch.randn(3, 0), torch.randn(5, 0), b),
    }.items():
        assert fast.dense(*args, act, yes) is None, what
        assert fast.dense(*args, act, everything) is None, what
    assert fast.dense(x, torch.randn(5, 4), b, resolve("swiglu"), yes) is None  # odd gated rows
    with pytest.raises(RuntimeError, match="x must be 2-D"):  # the node takes (M, K) rows
        fast.extension_dense(torch.randn(2, 3, 4), w, b, act)
    ws, bs = [torch.randn(5, 4), torch.randn(2, 5)], [None, None]
    mkey = chooser.mlp_key(x, ws, bs, act, 0)
    assert isinstance(fast.mlp(x, ws, bs, act, _confirmed(mkey, chooser.UNFUSED)), torch.Tensor)
    for what, args in {
        "widths do not chain": (x, [ws[0], torch.randn(2, 4)], bs),
        "tuple of weights": (x, tuple(ws), bs),
        "one bias too few": (x, ws, [None]),
        "a weight not a tensor": (x, [ws[0], 1.0], bs),
        "a layer of width 0": (x, [torch.randn(0, 4), torch.randn(2, 0)], bs),
        "weight dtype": (x, [ws[0], ws[1].double()], bs),
    }.items():
        assert fast.mlp(*args, act, _confirmed(mkey, chooser.UNFUSED)) is None, what


def test_confirmed_paths_on_3d_input_against_float64():
    # (batch, tokens, features) inputs, as transformer blocks pass them: the fast path flattens and
    # restores the leading dimensions for every path it can be handed
    from helpers import assert_close, torch_dense

    act = resolve("gelu")
    for training in (False, True):
        for path in chooser.candidates(torch.randn(6, 8), act, training):
            x = torch.randn(8, 3, 2).transpose(0, 2)[:, :, :8].requires_grad_(training)
            w = torch.randn(5, 8, requires_grad=training)
            b = torch.randn(5, requires_grad=training)
            key = chooser.key_of(x.reshape(-1, 8), w, b, act, training)
            chooser._decisions[key] = chooser.Decision(key, path, {}, 0, True)
            with torch.set_grad_enabled(training):
                out = nnfast.dense(x, w, b, act)
                same = torch_dense(x, w, b, act)
            r64 = [t.detach().double().requires_grad_() for t in (x, w, b)]
            ref64 = torch_dense(*r64, act)
            what = f"{path} {'train' if training else 'infer'}"
            assert out.shape == (2, 3, 5), what
            assert_close(out, same, ref64, what)
            if training:
                g = torch.randn_like(out)
                got = torch.autograd.grad(out, (x, w, b), g)
                base = torch.autograd.grad(same, (x, w, b), g)
                want = torch.autograd.grad(ref64, r64, g.double())
                for a, s_, e in zip(got, base, want):
                    assert_close(a, s_, e, what)
            chooser._decisions.pop(key)


@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu", None])
def test_extension_autograd_node_in_cpp(activation):
    # the extension's training path (its autograd node in C++): gradients as PyTorch's, twice
    # through a retained graph, under torch.utils.checkpoint (both kinds) and saved-tensor hooks
    # (what it keeps goes through them, as offloading needs), and create_graph through it
    from torch.utils.checkpoint import checkpoint

    from helpers import assert_close, torch_dense

    act = resolve(activation)
    rows = 12 if act.is_gated else 6
    x = torch.randn(2, 5, 4, requires_grad=True)
    w = torch.randn(rows, 4, requires_grad=True)
    b = torch.randn(rows, requires_grad=True)
    g = torch.randn(2, 5, rows // 2 if act.is_gated else rows)

    def fused(x, w, b):
        return nnfast.dense(x, w, b, act, backend="extension")

    r64 = [t.detach().double().requires_grad_() for t in (x, w, b)]
    out64 = torch_dense(*r64, act)
    want = torch.autograd.grad(out64, r64, g.double())
    same = torch.autograd.grad(torch_dense(x, w, b, act), (x, w, b), g)
    out = fused(x, w, b)
    nodes = [out.grad_fn] + [f for f, _ in out.grad_fn.next_functions if f is not None]
    assert any("ExtensionDense" in f.name() for f in nodes), [f.name() for f in nodes]
    assert_close(out, torch_dense(x, w, b, act), out64, "forward")
    for _ in range(2):  # a retained graph backward twice
        got = torch.autograd.grad(out, (x, w, b), g, retain_graph=True)
        for a, s_, e in zip(got, same, want):
            assert_close(a, s_, e, "grad")
    for reentrant in (False, True):
        x.grad = w.grad = b.grad = None
        checkpoint(fused, x, w, b, use_reentrant=reentrant).backward(g)
        for a, s_, e in zip((x.grad, w.grad, b.grad), same, want):
            assert_close(a, s_, e, f"checkpoint reentrant={reentrant}")
    packed = []

    def pack(t):
        packed.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fused(x, w, b)
    assert len(packed) >= 3, packed  # x, weight and the kept tensor
    got = torch.autograd.grad(out, (x, w, b), g)
    for a, s_, e in zip(got, same, want):
        assert_close(a, s_, e, "hooks")
    # create_graph: the input gradient differentiated again (gradient penalty), vs float64
    (gx,) = torch.autograd.grad(fused(x, w, b), x, g, create_graph=True)
    (gx64,) = torch.autograd.grad(torch_dense(*r64, act), r64[0], g.double(), create_graph=True)
    (gxs,) = torch.autograd.grad(torch_dense(x, w, b, act), x, g, create_graph=True)
    if activation is not None:  # identity's input gradient does not depend on w through f'
        got = torch.autograd.grad(gx.square().sum(), (w, b), allow_unused=True)
        base = torch.autograd.grad(gxs.square().sum(), (w, b), allow_unused=True)
        ref = torch.autograd.grad(gx64.square().sum(), r64[1:], allow_unused=True)
        zero = [torch.zeros_like(t) for t in (w, b)]  # an unused input: a zero gradient
        for a, s_, e, z in zip(got, base, ref, zero):
            if e is not None:
                assert_close(z if a is None else a, z if s_ is None else s_, e, "second order")


def test_fast_path_keeps_reference_counts():
    # csrc/fast.cpp builds keys and reads attributes through the C API: every object it touches
    # has the same reference count after many calls as before (a leak or an early free shows)
    import sys

    fast = _fast()
    act = resolve(torch.nn.LeakyReLU(0.25))
    x, w, b = torch.randn(3, 4), torch.randn(5, 4), torch.randn(5)
    ws, bs = [torch.randn(5, 4), torch.randn(2, 5)], [b, None]
    dense_key = chooser.key_of(x, w, b, act, False)
    mlp_key = chooser.mlp_key(x, ws, bs, act, 0)
    for choice in (chooser.UNFUSED, "extension", "probe"):
        decisions = {**_confirmed(dense_key, choice), **_confirmed(mlp_key, choice)}
        watched = [act.act.name, act.param, torch.float32, choice, decisions[dense_key], x, w, b]
        before = [sys.getrefcount(o) for o in watched]
        for _ in range(2000):
            fast.dense(x, w, b, act, decisions)
            fast.mlp(x, ws, bs, act, decisions)
            fast.dense(x, w, b, act, {})  # not found
        assert [sys.getrefcount(o) for o in watched] == before, choice


def test_trial_rounds_rotate_the_order(monkeypatch):
    # a timed block pays for what the block before it left behind: every path must take every
    # position, not always run after the same other path
    seen, blocks = [], []
    timed = chooser._timed

    def recording(run, x):
        t = timed(run, x)
        blocks.append(seen[-1])
        return t

    monkeypatch.setattr(chooser, "_timed", recording)
    monkeypatch.setattr(chooser, "_BUDGET_S", 0.0)  # the minimum: 3 rounds
    x = torch.randn(2, 3)
    paths = ["a", "b", "c"]
    chooser.time_paths(paths, x, [x], False, lambda p, x, training: seen.append(p))
    rounds = [blocks[i : i + 3] for i in range(len(paths), len(blocks), 3)]  # after the warm-up
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]], rounds
