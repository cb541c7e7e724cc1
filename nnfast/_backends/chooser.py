"""Which path runs a dense layer: measured once per key, then a dictionary lookup.

Paths: ``triton`` (CUDA), ``extension`` (nnfast._C's GEMM + epilogue kernels), ``onednn`` (CPU
inference: oneDNN's inner product with the activation as a post-op) and ``unfused`` (plain
``F.linear`` + the activation: PyTorch itself, so nnfast is never slower than it by more than the
lookup). On the first call for a key (device, dtype, activation and its parameter, training or
inference, bias or not, M rounded up to a power of two, N, K) every path that can run it is
timed on that call's own tensors, interleaved, medians; the fastest is kept if it beats the
unfused path by at least ``MARGIN`` (3%; ``TRAIN_MARGIN``, 5%, in training), else the unfused
path (a near-tie is noise). After ``CONFIRM_AFTER`` calls with the key (or ``CONFIRM_AFTER_S``
seconds, for slow calls) the measurement is made once more, in the steady state, and that one is
final (and the one kept on disk).

Explicit ``backend=`` and ``NNFAST_BACKEND`` bypass it. ``NNFAST_DISPATCH=fixed`` (or
``set_dispatch("fixed")``) turns measuring off: the fixed order of ``nnfast._backends.select``.
``NNFAST_DISPATCH_LOG=1`` prints each decision as it is made; ``decisions()`` returns them all;
``NNFAST_DISPATCH_CACHE=1`` keeps them on disk under the cache directory, per device and versions.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as _dist
import torch.nn.functional as F
from torch import Tensor

from nnfast.activations import ActivationSpec

UNFUSED = "unfused"
_mode: str = os.environ.get("NNFAST_DISPATCH", "measure").strip().lower()  # read once
_decisions: dict[tuple, Decision] = {}
_disk_loaded: set[str] = set()
# Per candidate and key: time at least this long in total, at most this many rounds, each
# round a block of consecutive calls lasting about _BLOCK_S (at most _MAX_BLOCK calls).
_BUDGET_S = 0.03
_MAX_ROUNDS = 60
_BLOCK_S = 0.001
_MAX_BLOCK = 32
# Trial calls rotate over copies of their operands, as many as fit in twice the device's last-level
# cache (at least 64 MB, at most 256 MB; _ROTATE_BYTES overrides it), at most _MAX_COPIES: a layer
# in a model meets its weight after other layers' weights and activations have passed through the
# caches, and a path that wins only on cache-resident operands (a GEMV whose 4 MB weight sits in
# the last-level cache) must not be chosen for one that reads memory. (Within 64 MB, a 16 MB
# weight's training step measured 3-9% faster fused on this machine's 260 MB L3; within 256 MB,
# -2 to +3%: a tie, as in the benchmark.)
_ROTATE_BYTES: int | None = None
_MAX_COPIES = 8
# A fused path must beat the unfused one by this fraction to be chosen: a short measurement on
# cache-hot tensors cannot tell near-ties apart, and on a tie PyTorch itself is the safe choice.
# Training steps allocate their gradients and vary more: 5% there (4-6% measured advantages of
# the extension at 1x1024->4096 and 64x1024->2048 SwiGLU were 1.02-1.10x eager in the benchmark).
MARGIN = 0.03
TRAIN_MARGIN = 0.05


@dataclass
class Decision:
    key: tuple
    choice: str
    times_ms: dict[str, float] = field(default_factory=dict)
    # calls since the first measurement; at CONFIRM_AFTER (or CONFIRM_AFTER_S) the key is
    # measured again, in the program's steady state (warm caches and thread pools), and that
    # measurement decides
    uses: int = 0
    confirmed: bool = False
    made_at: float = field(default_factory=time.perf_counter)

    def describe(self) -> str:
        times = ", ".join(
            f"{p} {t:.4f} ms" for p, t in sorted(self.times_ms.items(), key=lambda i: i[1])
        )
        return f"{describe_key(self.key)}: {self.choice} ({times})"


def describe_key(key: tuple) -> str:
    if key[0] == "mlp":
        _, device, dtype, act, param, training, m, k, widths, biases = key
        shape = f"MLP M<={m} {'->'.join(str(w) for w in (k, *widths))}"
        bias = " bias" if all(biases) else " some biases" if any(biases) else ""
    else:
        device, dtype, act, param, training, bias, m, n, k = key
        shape, bias = f"M<={m} N={n} K={k}", " bias" if bias else ""
    dtype = str(dtype).replace("torch.", "")
    name = act if act != "leaky_relu" else f"leaky_relu({param})"
    mode = ("infer", "train", "train through input grad")[int(training)]
    return f"{device} {dtype} {name} {mode} {shape}{bias}"


def set_dispatch(mode: str) -> None:
    """ "measure" (the default) or "fixed" (the fixed backend order; reproducible runs)."""
    global _mode
    if mode not in ("measure", "fixed"):
        raise ValueError(f"set_dispatch(): mode must be 'measure' or 'fixed', got {mode!r}")
    _mode = mode


@contextlib.contextmanager
def fixed():
    """No measuring inside (e.g. probe calls at throwaway shapes); the previous mode after."""
    global _mode
    previous, _mode = _mode, "fixed"
    try:
        yield
    finally:
        _mode = previous


def measuring() -> bool:
    """Whether automatic calls are measured. Never in a torch.distributed job: ranks timing on
    their own could take different paths, whose autograd graphs differ, so FSDP's per-module
    gradient reductions could be issued in different orders on different ranks (a hang)."""
    if _mode not in ("measure", "fixed"):
        raise ValueError(f"NNFAST_DISPATCH={_mode!r}: expected 'measure' or 'fixed'")
    return _mode == "measure" and not (_dist.is_available() and _dist.is_initialized())


def decisions() -> list[Decision]:
    """Every decision made in this process (and loaded from disk), in the order made."""
    return list(_decisions.values())


def report() -> str:
    """The decisions as lines of text: key, choice, and every path's measured time."""
    return "\n".join(d.describe() for d in _decisions.values()) or "(no decisions yet)"


def clear() -> None:
    _decisions.clear()


def m_bucket(m: int) -> int:
    return 1 << max(0, (m - 1).bit_length())


def key_of(x: Tensor, weight: Tensor, bias: Tensor | None, act: ActivationSpec, training: bool):
    m, k = x.shape
    return (
        x.device,
        x.dtype,
        act.act.name,
        act.param,
        training,
        bias is not None,
        1 << max(0, (m - 1).bit_length()),  # M rounded up to a power of two
        weight.shape[0],
        k,
    )


def candidates(x: Tensor, act: ActivationSpec, training: bool) -> list[str]:
    """The paths that can run a call like this one."""
    from nnfast._backends import extension, why_not

    # triton on CPU tensors is the interpreter: a correctness tool, never a candidate
    names = ["triton"] if x.device.type == "cuda" else []
    names = [n for n in (*names, "extension") if why_not(n, x.device.type, x.dtype) is None]
    if (
        x.device.type == "cpu"
        and "extension" in names
        and extension.onednn_supported(x, act, training)
    ):
        names.append("onednn")
    return [*names, UNFUSED]


def _sync(x: Tensor) -> None:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


def _timed(run, x: Tensor) -> float:
    _sync(x)
    start = time.perf_counter()
    run()
    _sync(x)
    return time.perf_counter() - start


def measure(
    key: tuple,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    act: ActivationSpec,
    training: bool,
    run_path,
) -> Decision:
    """Times every candidate on this call's tensors (interleaved rounds, medians)."""
    paths = candidates(x, act, training)

    def run(path, x, weight, bias, training):
        return run_path(path, x, weight, bias, act, training)

    times = time_paths(paths, x, [x, weight, bias], training, run)
    return Decision(key, pick(times, training), times)


def time_paths(paths: list[str], x: Tensor, tensors: list, training: int, run) -> dict:
    """Median milliseconds per call of ``run(path, *tensors, training)`` for every path,
    interleaved rounds; training calls take the gradients of every tensor, as a training step;
    ``training=SECOND_ORDER`` times a step through the input gradient (create_graph=True, then
    the parameters' gradients of a penalty on it), as SDF, PINN and gradient-penalty steps do."""
    inputs = [t.detach() if t is not None else None for t in tensors]
    # Calls rotate over copies of the operands (see _ROTATE_BYTES); training: leaves made once,
    # gradients by autograd.grad, as a training step would
    nbytes = sum(t.numel() * t.element_size() for t in inputs if t is not None)
    budget = _ROTATE_BYTES if _ROTATE_BYTES is not None else _rotate_budget(x.device.type)
    copies = max(1, min(_MAX_COPIES, budget // max(nbytes, 1)))
    sets = [inputs] + [[_copy(t) for t in inputs] for _ in range(copies - 1)]
    if training:
        sets = [
            [t if t is None or not t.numel() else t.clone().requires_grad_() for t in s]
            for s in sets
        ]
    turn, grad = 0, None

    def call(path):
        nonlocal grad, turn
        turn = (turn + 1) % copies
        if not training:
            with torch.no_grad():
                return run(path, *sets[turn], False)
        leaves = sets[turn]
        wrt = [t for t in leaves if t is not None and t.requires_grad]
        out = run(path, *leaves, True)
        if grad is None:
            grad = torch.randn_like(out)
        if training == SECOND_ORDER:
            # a penalty on the input gradient and a data term on the output, as a PINN or SDF loss
            (gx,) = torch.autograd.grad(out, leaves[0], grad, create_graph=True)
            loss = gx.square().sum() + (out * grad).sum()
            return torch.autograd.grad(loss, wrt[1:], allow_unused=True)
        return torch.autograd.grad(out, wrt, grad)

    samples: dict[str, list[float]] = {p: [] for p in paths}
    # Inside saved-tensor hooks (a checkpoint), identity hooks on top: the trial runs must not
    # reach the enclosing hooks (its recomputation, which finds the decision made, would then save
    # fewer tensors). Only there: hooks cost a Python call per saved tensor, more for PyTorch's
    # own autograd nodes than for nnfast's, which would bias every other measurement.
    with (
        torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
        if _saved_tensors_hooked()
        else contextlib.nullcontext()
    ):
        # warm-up (first-use builds, autotuning, allocator), and the calls per timed block: a
        # block of about _BLOCK_S, so that a path is timed in its steady state (a lone call
        # between other libraries' calls pays their thread pools' wake-ups, not its own cost)
        block = {}
        for p in paths:
            call(p)
            block[p] = max(
                1, min(_MAX_BLOCK, int(_BLOCK_S / max(_timed(lambda p=p: call(p), x), 1e-7)))
            )
        deadline = time.perf_counter() + _BUDGET_S * len(paths)
        for r in range(_MAX_ROUNDS):
            # each round starts one path later: every path takes every position, after every
            # other (a block pays for what the block before it left in the caches and thread
            # pools; always after the fused path, the unfused one measured several % slow)
            for p in paths[r % len(paths) :] + paths[: r % len(paths)]:
                t = _timed(lambda p=p: [call(p) for _ in range(block[p])], x)
                samples[p].append(t / block[p])
            if r >= 2 and time.perf_counter() > deadline:
                break
    return {p: statistics.median(s) * 1e3 for p, s in samples.items()}


@functools.cache
def _rotate_budget(device_type: str) -> int:
    """Twice the last-level cache (CUDA: L2; CPU: the largest cache sysfs lists), within 64-256 MB."""
    size = 0
    if device_type == "cuda":
        size = getattr(
            torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0
        )
    else:
        for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
            try:
                text = (index / "size").read_text().strip().upper()
            except OSError:
                continue
            scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
            digits = text.rstrip("KMG")
            size = max(size, int(digits) * scale if digits.isdigit() else 0)
    return min(256 * 2**20, max(64 * 2**20, 2 * size))


def _saved_tensors_hooked() -> bool:
    """Whether saved-tensor hooks (a checkpoint's, an offload's) are active on this thread."""
    top = torch._C._autograd._top_saved_tensors_default_hooks
    try:
        return top(False) is not None
    except TypeError:  # releases before its ignore_is_tracing argument
        return top() is not None


def _copy(t: Tensor | None) -> Tensor | None:
    """A copy, same strides where they are dense (an empty tensor, a missing bias: itself)."""
    return t.clone() if t is not None and t.numel() else t


def pick(times_ms: dict[str, float], training: bool = False) -> str:
    """The fastest path, unless it beats the unfused path by less than ``MARGIN`` (training:
    ``TRAIN_MARGIN``)."""
    best = min(times_ms, key=times_ms.get)
    margin = TRAIN_MARGIN if training else MARGIN
    if UNFUSED in times_ms and times_ms[best] > times_ms[UNFUSED] * (1 - margin):
        return UNFUSED
    return best


def choose(
    x: Tensor, weight: Tensor, bias: Tensor | None, act: ActivationSpec, training: bool, run_path
) -> str:
    """The path for an automatic call (no explicit backend): measured once per key."""
    key = key_of(x, weight, bias, act, training)
    return _decide(key, x, lambda: measure(key, x, weight, bias, act, training, run_path))


FUSED = "fused"
# the MLP key's training field: inference, a training step, or a step through the input gradient
SECOND_ORDER = 2


def mlp_mode(x: Tensor, needs_grad: bool) -> int:
    """A leaf input that requires grad is the mark of the workloads that differentiate through
    the input gradient (coordinate networks fitted with eikonal or PDE terms, gradient penalties):
    their steps are timed with the second-order pass."""
    if not needs_grad:
        return 0
    return SECOND_ORDER if x.requires_grad and x.is_leaf else 1


def mlp_key(x: Tensor, weights: list[Tensor], biases: list[Tensor], act, training: int) -> tuple:
    return (
        "mlp",
        x.device,
        x.dtype,
        act.act.name,
        act.param,
        training,
        m_bucket(x.shape[0]),
        x.shape[1],
        tuple(w.shape[0] for w in weights),
        tuple(b is not None and b.numel() > 0 for b in biases),
    )


def choose_mlp(x: Tensor, weights: list, biases: list, act, training: int, run_path) -> str:
    """``fused`` (nnfast's MLP op: one tensor kept per hidden layer, whole-MLP kernels where the
    backend has them) or ``unfused`` (PyTorch layer by layer), measured once per key."""
    key = mlp_key(x, weights, biases, act, training)
    decision = _decisions.get(key)
    if decision is not None and decision.confirmed:
        return decision.choice

    def measure_mlp():
        n = len(weights)

        def run(path, x, *rest):
            *params, grads = rest
            return run_path(path, x, list(params[:n]), list(params[n:]), act, grads)

        times = time_paths([FUSED, UNFUSED], x, [x, *weights, *biases], training, run)
        return Decision(key, pick(times, bool(training)), times)

    return _decide(key, x, measure_mlp)


# A first call often meets cold caches and thread pools just woken from other work, and its
# measurement can be off by tens of percent at small shapes: the decision is made again once the
# key has been used this many times, and that second measurement is final. Slow calls (an MLP
# step of a second) reach their steady state in fewer calls: after CONFIRM_AFTER_S seconds and
# CONFIRM_MIN_USES calls, whichever comes first with the count above.
CONFIRM_AFTER = 50
CONFIRM_AFTER_S = 1.0
CONFIRM_MIN_USES = 3


def _decide(key: tuple, x: Tensor, measure_fn) -> str:
    decision = _decisions.get(key)
    if decision is None:
        _load_disk(x)
        decision = _decisions.get(key)
    if decision is None:
        decision = measure_fn()
        _decisions[key] = decision
        _log(decision)
    elif not decision.confirmed:
        decision.uses += 1
        if decision.uses >= CONFIRM_AFTER or (
            decision.uses >= CONFIRM_MIN_USES
            and time.perf_counter() - decision.made_at >= CONFIRM_AFTER_S
        ):
            decision = measure_fn()
            decision.confirmed = True
            _decisions[key] = decision
            _log(decision)
            _save_disk(x)
    return decision.choice


def _log(decision: Decision) -> None:
    if os.environ.get("NNFAST_DISPATCH_LOG", "0") == "1":
        print(f"nnfast dispatch: {decision.describe()}", file=sys.stderr, flush=True)


def cached(key: tuple) -> str | None:
    d = _decisions.get(key)
    return d.choice if d is not None else None


# ---- optional disk cache -------------------------------------------------------------------------


def _disk_path(x: Tensor) -> Path | None:
    if os.environ.get("NNFAST_DISPATCH_CACHE", "0") != "1":
        return None
    from nnfast import __version__
    from nnfast._backends.extension import cache_dir

    if x.device.type == "cuda":
        device = torch.cuda.get_device_name(x.device)
    else:
        import platform

        device = platform.processor() or platform.machine()
        device += f"-{torch.get_num_threads()}threads"
    name = f"dispatch-{device}-torch{torch.__version__}-nnfast{__version__}.json"
    return cache_dir().parent / name.replace(" ", "_").replace("/", "_")


def _load_disk(x: Tensor) -> None:
    path = _disk_path(x)
    if path is None or str(path) in _disk_loaded:
        return
    _disk_loaded.add(str(path))
    if path.exists():
        for row in json.loads(path.read_text()):
            head = row["key"][:1] if row["key"][0] == "mlp" else []
            device, dtype, *rest = row["key"][len(head) :]
            rest = [tuple(v) if isinstance(v, list) else v for v in rest]
            key = (*head, torch.device(device), getattr(torch, dtype), *rest)
            _decisions.setdefault(key, Decision(key, row["choice"], row["times_ms"], 0, True))


def _save_disk(x: Tensor) -> None:
    path = _disk_path(x)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "key": _key_json(d.key),
            "choice": d.choice,
            "times_ms": d.times_ms,
        }
        for d in _decisions.values()
        if d.confirmed
    ]
    path.write_text(json.dumps(rows))


def _key_json(key: tuple) -> list:
    head = list(key[:1]) if key[0] == "mlp" else []
    device, dtype, *rest = key[len(head) :]
    return [*head, str(device), str(dtype)[6:], *rest]


def unfused(x: Tensor, weight: Tensor, bias: Tensor | None, act: ActivationSpec) -> Tensor:
    """PyTorch itself: F.linear, then the activation."""
    return act(F.linear(x, weight, bias))
