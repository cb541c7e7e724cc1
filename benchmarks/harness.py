"""The one benchmark harness: timing, memory, machine record, markdown/CSV/PNG output.

CPU timings interleave the providers of one row round by round (``time_interleaved``: median and
IQR over rounds), so the machine's drift hits all of them alike; GPU timings use
triton.testing.do_bench (median, 20th/80th percentiles). Ratios between providers
are meaningful only within one run; absolute times hold only for the machine recorded beside them.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import platform
import random
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def steady_heap() -> str:
    """glibc malloc keeps freed memory in the process (no trimming; allocations up to 32 MB from
    the heap, not mmap). Otherwise whether a freed 4 MB gradient goes back to the OS depends on
    the heap's history, and the next call pays its page faults: the same training step measured
    0 or 150-250 faults per call in one process, depending on what ran before it, which swamps
    the providers' differences at memory-bound shapes. The same for every provider; what
    PyTorch's CUDA caching allocator does on a GPU. Returns what was set, for the machine line."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
        if libc.mallopt(m_mmap_threshold, 32 * 2**20) and libc.mallopt(m_trim_threshold, 2**30):
            return "glibc heap kept (mallopt)"
    except (OSError, AttributeError):
        pass
    return "default allocator"


HEAP = steady_heap()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    info = {
        "cpu": cpu_model(),
        "cores": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = "absent"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = str(torch.version.cuda)
    return info


def machine_line() -> str:
    return ", ".join([*(f"{k} {v}" for k, v in machine().items()), HEAP])


@dataclass
class Timing:
    median_ms: float
    spread_ms: float  # CPU: interquartile range; GPU: 80th - 20th percentile


def time_fn(fn: Callable[[], object], device: str, min_run_time: float = 1.0) -> Timing:
    """Median time of ``fn()`` after warm-up."""
    if device == "cuda":
        import triton.testing

        med, lo, hi = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], return_mode="median")
        return Timing(med, hi - lo)
    from torch.utils.benchmark import Timer

    fn()  # warm-up (first calls compile or allocate)
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return Timing(m.median * 1e3, m.iqr * 1e3)


def settle(fn: Callable[[], object], limit_s: float = 60.0) -> None:
    """Call ``fn`` until the nnfast decisions its calls advance are final (the dispatcher measures
    a key again in the steady state, after 50 calls or a second): timings then see the choice a
    long run makes, not the first one. Stops when a call advances none."""
    import time

    from nnfast._backends import chooser

    def state():
        return [(d.uses, d.confirmed) for d in chooser.decisions()]

    deadline = time.perf_counter() + limit_s
    while time.perf_counter() < deadline and not all(d.confirmed for d in chooser.decisions()):
        before = state()
        fn()
        if state() == before:
            return


def time_interleaved(
    fns: dict[str, Callable[[], object]], device: str, min_run_time: float = 1.0, rounds: int = 15
) -> dict[str, Timing]:
    """Median time per call of every provider, measured side by side: on the CPU in ``rounds``
    rounds, each timing every provider in turn for about ``min_run_time / rounds`` seconds (so the
    machine's drift and other tenants hit all providers alike), in a new order every round (a
    slice pays for what the slice before it left in the caches and thread pools: in a fixed order
    two identical providers measured up to 15% apart on the 2-core Xeon, shuffled within 2%);
    median and interquartile range over the rounds. On a GPU each provider goes through
    ``time_fn`` (do_bench is stable there)."""
    if device == "cuda":
        for fn in fns.values():
            fn()
            settle(fn)
        return {name: time_fn(fn, device, min_run_time) for name, fn in fns.items()}
    import time

    calls, slowest = {}, 0.0
    for name, fn in fns.items():  # warm-up, and how many calls fill one slice
        fn()
        settle(fn)
        # two passes: the first may include one-time work left after the warm-up, the second
        # estimates the call alone
        for _ in range(2):
            start, n = time.perf_counter(), 0
            while n < 1 or time.perf_counter() - start < 0.02:
                fn()
                n += 1
        per_call = (time.perf_counter() - start) / n
        calls[name] = max(1, int(min_run_time / rounds / per_call))
        slowest = max(slowest, per_call)
    # calls slower than a slice: fewer rounds (at least 5), about 3x min_run_time per provider
    rounds = max(5, min(rounds, int(3 * min_run_time / slowest)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order, shuffle = list(fns), random.Random(0).shuffle  # the same orders in every run
    for _ in range(rounds):
        shuffle(order)
        for name in order:
            fn = fns[name]
            start = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / calls[name] * 1e3)
    out = {}
    for name, ms in samples.items():
        q = statistics.quantiles(ms, n=4)
        out[name] = Timing(statistics.median(ms), q[2] - q[0])
    return out


def peak_memory_mb(fn: Callable[[], object], device: str) -> float | None:
    """Peak CUDA memory allocated during ``fn()`` above what was allocated before (GPU only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def held_memory_mb(forward: Callable[[], object], device: str) -> float:
    """Memory allocated by ``forward()`` and still held when it returns, minus its output: what
    autograd keeps for backward, wherever it is stored (save_for_backward, ctx attributes,
    closures). CUDA: the caching allocator's counters; CPU: the profiler's allocation events."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        out = forward()
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - before
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = forward()
        held = sum(e.self_cpu_memory_usage for e in prof.events())  # allocations - frees
    outs = out if isinstance(out, (tuple, list)) else (out,)
    held -= sum(o.untyped_storage().nbytes() for o in outs if isinstance(o, torch.Tensor))
    del out, outs
    return held / 2**20


def rotating(make: Callable[[], tuple], nbytes: int, cache_bytes: int = 64 * 2**20) -> Callable:
    """A function that cycles through enough input sets that they do not all sit in cache."""
    count = max(1, min(8, -(-2 * cache_bytes // max(nbytes, 1))))
    sets = [make() for _ in range(count)]
    state = {"i": 0}

    def next_set() -> tuple:
        state["i"] = (state["i"] + 1) % count
        return sets[state["i"]]

    return next_set


@dataclass
class Row:
    bench: str
    provider: str
    mode: str
    shape: str
    dtype: str
    activation: str
    median_ms: float
    spread_ms: float
    throughput: float  # TFLOP/s on GPU, GFLOP/s on CPU (see ``unit``)
    unit: str
    peak_mb: float | None = None
    extra: dict = field(default_factory=dict)


def markdown(rows: Sequence[Row], baseline: str = "eager", alternatives: Sequence[str] = ()) -> str:
    """A table with ratios: time / eager time, and time / the best alternative's time."""
    groups: dict[tuple, dict[str, Row]] = {}
    for r in rows:
        groups.setdefault((r.mode, r.shape, r.dtype, r.activation), {})[r.provider] = r
    lines = [
        "| mode | shape | dtype | act | provider | ms (median ± spread) | throughput | vs eager | vs best alt |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (mode, shape, dtype, act), by in groups.items():
        base = by.get(baseline)
        alts = [by[a].median_ms for a in alternatives if a in by]
        best_alt = min(alts) if alts else None
        for name, r in by.items():
            vs_eager = f"{r.median_ms / base.median_ms:.2f}x" if base else "-"
            vs_alt = f"{r.median_ms / best_alt:.2f}x" if best_alt else "-"
            lines.append(
                f"| {mode} | {shape} | {dtype} | {act} | {name} | {r.median_ms:.3f} ± "
                f"{r.spread_ms:.3f} | {r.throughput:.1f} {r.unit} | {vs_eager} | {vs_alt} |"
            )
    return "\n".join(lines)


def write_csv(rows: Sequence[Row], name: str, out_dir: Path = RESULTS) -> Path:
    """Append rows (with the machine and a timestamp) to ``out_dir/name.csv``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.csv"
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    info = machine()
    fields = ["time", *[f for f in asdict(rows[0]) if f != "extra"], *info]
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({"time": stamp, **asdict(r), **info})
    return path


def plot(rows: Sequence[Row], name: str, title: str, out_dir: Path = RESULTS) -> Path | None:
    """Throughput vs problem size, one line per provider, one panel per mode."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    modes = list(dict.fromkeys(r.mode for r in rows))
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        sel = [r for r in rows if r.mode == mode]
        shapes = list(dict.fromkeys(r.shape for r in sel))
        combos = list(dict.fromkeys((r.dtype, r.activation) for r in sel))
        for provider in dict.fromkeys(r.provider for r in sel):
            for dtype, act in combos:
                pts = {
                    r.shape: r.throughput
                    for r in sel
                    if (r.provider, r.dtype, r.activation) == (provider, dtype, act)
                }
                if not pts:
                    continue
                label = provider if len(combos) == 1 else f"{provider} {dtype} {act}"
                ax.plot(
                    range(len(shapes)),
                    [pts.get(s, float("nan")) for s in shapes],
                    "o-",
                    label=label,
                )
        ax.set_xticks(range(len(shapes)), shapes, rotation=30, ha="right", fontsize=7)
        ax.set_title(mode)
        ax.set_ylabel(sel[0].unit if sel else "")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title}\n{machine_line()}", fontsize=8)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cli(
    argv, doc: str, name: str, grid_flag: str, grid_help: str, grids: dict, activations: str
) -> SimpleNamespace:
    """The flags every benchmark script shares; ``grids`` maps cpu/cpu_quick/gpu/gpu_quick to
    default grids. Returns the parsed settings plus grid, dtypes, activations, unit and scale."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default=default_device())
    p.add_argument(f"--{grid_flag}", dest="grid", help=grid_help)
    p.add_argument("--dtypes", help="comma-separated of " + ",".join(DTYPES))
    p.add_argument("--activations", default=activations)
    p.add_argument("--modes", default="fwd,bwd,fwd+bwd", help="comma-separated of fwd,bwd,fwd+bwd")
    p.add_argument("--quick", action="store_true", help="small grid, short timing")
    p.add_argument("--min-run-time", type=float, default=None, help="CPU seconds per measurement")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--name", default=name, help="CSV/PNG file stem")
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    key = ("gpu" if gpu else "cpu") + ("_quick" if args.quick else "")
    return SimpleNamespace(
        **{
            **vars(args),
            "grid": args.grid.split(",") if args.grid else grids[key],
            "dtypes": (args.dtypes or ("bf16" if gpu else "fp32")).split(","),
            "activations": args.activations.split(","),
            "modes": args.modes.split(","),
            "min_run_time": args.min_run_time or (0.2 if args.quick else 0.5),
            "unit": "TFLOP/s" if gpu else "GFLOP/s",
            "scale": 1e12 if gpu else 1e9,
        }
    )


def progress(items: list, desc: str):
    """A tqdm progress bar on stderr when tqdm is installed."""
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, file=sys.stderr)


def record(rows: list[Row], row: Row, settings: SimpleNamespace) -> None:
    """Keep a measured row and append it to the CSV at once, so a run cut short keeps its rows."""
    rows.append(row)
    write_csv([row], settings.name, settings.out_dir)


def report(rows: Sequence[Row], settings: SimpleNamespace, title: str, alternatives: Sequence[str]):
    """Markdown table on stdout and a plot beside the CSV that ``record`` wrote."""
    print(markdown(rows, alternatives=alternatives))
    png = plot(rows, settings.name, title, settings.out_dir)
    print(
        f"\nCSV: {settings.out_dir / (settings.name + '.csv')}" + (f"\nplot: {png}" if png else "")
    )


def worst_line(rows: Sequence[Row], provider: str, baseline: str = "eager", goal: float = 1.02):
    """The largest time ratio of ``provider`` to ``baseline`` over the whole grid, and the rows
    above ``goal`` by more than the run's own spread (the two rows' spreads added, relative to
    the baseline): those are the ones the noise of this run does not explain."""
    by: dict[tuple, dict[str, Row]] = {}
    for r in rows:
        by.setdefault((r.mode, r.shape, r.dtype, r.activation), {})[r.provider] = r
    ratios = []
    for key, g in by.items():
        if provider in g and baseline in g:
            spread = (g[provider].spread_ms + g[baseline].spread_ms) / g[baseline].median_ms
            ratios.append((g[provider].median_ms / g[baseline].median_ms, spread, key))
    if not ratios:
        return f"worst {provider} / {baseline}: no rows"
    ratio, spread, (mode, shape, dtype, act) = max(ratios)
    beyond = [f"{r:.2f}x ±{s:.2f} at {' '.join(k)}" for r, s, k in sorted(ratios) if r - s > goal]
    return (
        f"worst {provider} / {baseline} over {len(ratios)} rows: {ratio:.3f}x at {mode} {shape}"
        f" {dtype} {act} (the two rows' spread: ±{spread:.3f}x of {baseline})\n"
        f"rows above {goal}x beyond their spread: {len(beyond)} of {len(ratios)}"
        + "".join(f"\n  {b}" for b in beyond)
    )
