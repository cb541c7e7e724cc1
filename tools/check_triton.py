"""Compile every Triton kernel variant nnfast can launch for real GPUs, without a GPU (make check-triton).

The variants are not listed by hand: the Triton backend's own forward/backward/MLP functions are
driven over activations x gated x dtypes (float16, bfloat16, float32 with and without TF32) x
bias/save/gradient flags x fused-MLP widths and depths, with small CPU tensors and the backend's
one launch point (``launch``/``launch_mlp``) replaced by a recorder. Each recorded launch is
then compiled to a cubin for sm_90 and sm_80 with Triton's own compiler and bundled ptxas (a
stand-in driver gives Triton the target), and cuobjdump reads registers and spills.

A variant fails when it does not compile, when its tile needs more shared memory per block than
the target has (for an autotuned kernel: when no candidate tile fits, or the fallback tile does
not), or when registers x threads exceed the register file. A candidate tile that does not fit is
reported as pruned: the backend's autotuner drops it at run time the same way (``fits``).
Spilling kernels: the same rule, ``MAX_SPILL_BYTES``.

Sampling, to stay within a few minutes on 2 cores: every candidate tile is compiled for the most
demanding flags (bias, saved pre-activation / every gradient) of one elementwise and one gated
activation per dtype, on both targets; every activation x flag combination is compiled at the
fixed tile (the one used with autotuning off) on sm_90; the fused MLP at every width (16-128) and
dtype for 2 and 9 layers, on both targets. ``--full`` compiles every combination.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # real compilation, not the interpreter
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when it is unset
os.environ["NNFAST_TRITON_AUTOTUNE"] = "1"

ROOT = Path(__file__).resolve().parent.parent
# a cache of this checkout's own (a fresh clone compiles everything; reruns here are quick)
os.environ.setdefault("TRITON_CACHE_DIR", str(ROOT / "build" / "triton-cache"))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

TARGETS = {"sm_90": (90, 232448), "sm_80": (80, 166912)}  # arch, max shared memory per block
REGISTER_FILE = 65536  # 32-bit registers per SM (sm_80 and sm_90)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
NO_TILE = (None,)  # kernels whose block sizes are among their arguments (the fused MLP)


# ---- recording the backend's launches ---------------------------------------------------------


def _describe(value):
    """A launch argument as something picklable that rebuilds an equivalent argument."""
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype).replace("torch.", ""))
    return value


def record_launches(sample: bool) -> list[dict]:
    """Drive the Triton backend's own functions and return every distinct launch it makes."""
    from nnfast._backends import triton as tb
    from nnfast.activations import GATED_NAMES, NAMES, resolve

    launches: dict = {}

    def add(kernel: str, args: dict, tiles: tuple, tuned: bool, tag: str) -> None:
        desc = {k: _describe(v) for k, v in args.items()}
        key = (kernel, tuned, repr(sorted(desc.items())))
        entry = {"kernel": kernel, "args": desc, "tiles": tiles, "tuned": tuned, "tags": set()}
        launches.setdefault(key, entry)["tags"].add(tag)

    state = {"tag": ""}

    def fake_launch(kind, grid, args):
        precision = args["INPUT_PRECISION"]
        tiles = (tb.TILES_IEEE if precision == "ieee" else tb.TILES)[kind]
        args = {**args, "M_BUCKET": tb.m_bucket(args["M"])}
        add(f"dense_{kind}_kernel", args, tiles, True, state["tag"])
        add(f"dense_{kind}_kernel", args, (tb.FIXED_TILE,), False, state["tag"])

    def fake_launch_mlp(kind, grid, args, meta):
        from nnfast.kernels import mlp as k

        kernel = k.mlp_fused_fwd_kernel if kind == "mlp_fwd" else k.mlp_fused_bwd_kernel
        named = {**dict(zip([p.name for p in kernel.params], args)), **meta}
        add(kernel.__name__, named, (NO_TILE,), False, state["tag"])

    tb.launch, tb.launch_mlp = fake_launch, fake_launch_mlp
    tb._kernel_module()
    elementwise, gated = ("gelu", "geglu") if sample else (None, None)
    m, k, n = 512, 256, 384
    for dname, dtype in DTYPES.items():
        for tf32 in (True, False) if dtype == torch.float32 else (True,):
            tb.tf32_enabled = lambda tf32=tf32: tf32
            prec = f"{dname}{'' if dtype != torch.float32 else ('-tf32' if tf32 else '-ieee')}"
            for name in (*NAMES, *GATED_NAMES):
                act = resolve(name)
                rows = 2 * n if act.is_gated else n
                x = torch.empty(m, k, dtype=dtype)
                w = torch.empty(rows, k, dtype=dtype)
                # every activation with every flag on; every flag combination for the two
                # rows of the tile sweep (sampled), or for all (--full)
                every_flag = not sample or name in (elementwise, gated)
                for bias, save in itertools.product((True, False), (True, False)):
                    if not (every_flag or (bias and save)):
                        continue
                    heavy = bias and save and name in (elementwise, gated)
                    state["tag"] = f"{prec} {name} bias={bias} save={save}" + (
                        " tiles" if heavy or not sample else ""
                    )
                    b = torch.empty(rows, dtype=dtype) if bias else None
                    tb.forward(x, w, b, act, save)
                g = torch.empty(m, n, dtype=dtype)
                saved = torch.empty(m, rows, dtype=dtype)
                for needs in (
                    (True, True, True),
                    (True, False, False),
                    (False, True, True),
                    (False, True, False),
                ):
                    if not (every_flag or all(needs)):
                        continue
                    heavy = all(needs) and name in (elementwise, gated)
                    state["tag"] = f"{prec} {name} needs={needs}" + (
                        " tiles" if heavy or not sample else ""
                    )
                    tb.backward(g, x, w, saved, act, needs)
            # fused MLP: every width, 2 and 9 layers
            if tb._input_precision(dtype) == "ieee":
                continue
            if sample:
                # 9 layers cost 20-60 s a compile (the walk is unrolled): widest only, sm_90 only,
                # bfloat16 only
                mlps = [(w, 2, "gelu") for w in (16, 32, 64, 128)] + [(128, 2, "relu")]
                mlps += [(128, 9, "gelu")] if dtype == torch.bfloat16 else []
            else:
                mlps = list(itertools.product((16, 32, 64, 128), (2, 9), ("relu", "gelu")))
            for width, layers, name in mlps:
                act = resolve(name)
                x = torch.empty(m, width, dtype=dtype)
                ws = [torch.empty(width, width, dtype=dtype) for _ in range(layers)]
                bs = [torch.empty(width, dtype=dtype) for _ in range(layers)]
                deep = " sm_90" if sample and layers > 2 else " tiles"
                state["tag"] = f"{prec} mlp width={width} layers={layers} {name}{deep}"
                _, saved = tb.mlp_forward(x, ws, bs, act, True)
                tb.mlp_backward(
                    torch.empty(m, width, dtype=dtype), x, ws, [True] * layers, saved, act, True
                )
    return list(launches.values())


def plan(launches: list[dict], sample: bool) -> list[dict]:
    """(launch, tile, target) jobs: see the module docstring for what is sampled."""
    jobs = []
    for launch in launches:
        sweep = any(t.endswith(" tiles") for t in launch["tags"])  # else: sm_90 only
        targets = ("sm_90", "sm_80") if (sweep or not sample) else ("sm_90",)
        if launch["tuned"] and sample and not sweep:
            continue  # flag combinations are compiled at the fixed tile
        for tile in launch["tiles"]:
            for target in targets:
                jobs.append(
                    {**launch, "tile": tile, "target": target, "tags": sorted(launch["tags"])}
                )
    return jobs


# ---- compiling one variant (in a worker process) -----------------------------------------------


class _StandInDriver:
    """What Triton's JIT asks of a driver to compile (not launch) for a given target."""

    def __init__(self, target) -> None:
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        raise RuntimeError("check_triton compiles only")


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, spill bytes per thread) of a cubin, from the cuobjdump Triton ships."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True
        ).stdout
    reg = re.search(r"REG:(\d+)", out)
    local = re.search(r"LOCAL:(\d+)", out)
    return (int(reg.group(1)) if reg else -1), (int(local.group(1)) if local else -1)


def compile_job(job: dict) -> dict:
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    arch, max_shared = TARGETS[job["target"]]
    driver.set_active(_StandInDriver(GPUTarget("cuda", arch, 32)))
    from nnfast._backends import triton as tb

    tb._kernel_module()
    from nnfast.kernels import dense, mlp

    kernel = getattr(dense if job["kernel"].startswith("dense") else mlp, job["kernel"])
    args = {
        k: (
            torch.empty(16, dtype=getattr(torch, v[1]))
            if isinstance(v, tuple) and v[0] == "tensor"
            else v
        )
        for k, v in job["args"].items()
    }
    meta = tb.tile_meta(job["tile"]) if job["tile"] != NO_TILE else {}
    start = time.time()
    result = {k: job[k] for k in ("kernel", "tile", "target", "tuned", "tags")}
    try:
        compiled = kernel.warmup(**args, **meta, grid=(1,))
    except Exception as e:  # a compile error is the finding
        return {
            **result,
            "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
            "seconds": time.time() - start,
        }
    regs, spills = _resource_usage(compiled.asm["cubin"])
    warps = compiled.metadata.num_warps
    shared = compiled.metadata.shared
    return {
        **result,
        "regs": regs,
        "spills": spills,
        "shared": shared,
        "warps": warps,
        "fits": tb.fits(shared, spills, max_shared),
        "regfile_ok": regs * 32 * warps <= REGISTER_FILE,
        "seconds": time.time() - start,
        "flags": ", ".join(
            f"{k}={v}"
            for k, v in args.items()
            if k.isupper() and not k.startswith("BLOCK") and k != "GROUP_M"
        ),
        "dtype": next(
            str(v.dtype).replace("torch.", "") for v in args.values() if isinstance(v, torch.Tensor)
        ),
    }


# ---- verdicts and the report --------------------------------------------------------------------


def verdicts(results: list[dict]) -> list[str]:
    """Failures: compile errors, register file overflow, and launches with no tile that fits."""
    failures = []
    groups: dict = {}
    for r in results:
        if "error" in r:
            failures.append(f"{r['target']} {r['kernel']} {r['tile']} {r['tags'][0]}: {r['error']}")
            continue
        if not r["regfile_ok"]:
            failures.append(
                f"{r['target']} {r['kernel']} {r['tile']}: {r['regs']} registers x {32 * r['warps']} threads > {REGISTER_FILE}"
            )
        key = (r["target"], r["kernel"], r["flags"], r["dtype"], r["tuned"])
        groups.setdefault(key, []).append(r)
    for (target, kernel, flags, dtype, tuned), rs in groups.items():
        if tuned:
            # the autotuner keeps the tiles that fit, else falls back to the last (smallest) one
            if not any(r["fits"] for r in rs) and not rs[-1]["fits"]:
                failures.append(f"{target} {kernel} {dtype} {flags}: no candidate tile fits")
        else:
            for r in rs:
                if not r["fits"]:
                    failures.append(
                        f"{target} {kernel} {dtype} tile {r['tile']} {flags}: shared {r['shared']} B, spills {r['spills']} B (not autotuned: it must fit)"
                    )
    return failures


def report(results: list[dict]) -> str:
    lines = [
        "| target | kernel | dtype | tile (BM, BN, BK, stages, warps) | flags | regs | spills B | shared B | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(
        results,
        key=lambda r: (
            r["target"],
            r["kernel"],
            str(r.get("dtype")),
            str(r["tile"]),
            str(r.get("flags")),
        ),
    ):
        if "error" in r:
            lines.append(
                f"| {r['target']} | {r['kernel']} | | {r['tile']} | {r['tags'][0]} | | | | COMPILE ERROR |"
            )
            continue
        verdict = (
            "ok" if r["fits"] and r["regfile_ok"] else ("pruned" if r["tuned"] else "DOES NOT FIT")
        )
        tile = "(in flags)" if r["tile"] == NO_TILE else str(r["tile"])
        lines.append(
            f"| {r['target']} | {r['kernel']} | {r['dtype']} | {tile} | {r['flags']} | {r['regs']} | {r['spills']} | {r['shared']} | {verdict} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="compile every combination (slow)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "check_triton.md")
    parser.add_argument(
        "--only", default="", help="compile only variants whose kernel name contains this"
    )
    opts = parser.parse_args()
    import triton

    start = time.time()
    launches = record_launches(sample=not opts.full)
    jobs = [j for j in plan(launches, sample=not opts.full) if opts.only in j["kernel"]]
    print(
        f"check-triton: triton {triton.__version__}: {len(launches)} distinct launches recorded, {len(jobs)} compilations ({'full' if opts.full else 'sampled'}) on {opts.jobs} processes",
        flush=True,
    )
    results = []
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    stream = opts.out.with_suffix(".jsonl").open("w")  # one line per variant, as they finish
    with ProcessPoolExecutor(opts.jobs) as pool:
        futures = [pool.submit(compile_job, j) for j in jobs]
        for i, f in enumerate(as_completed(futures), 1):
            results.append(f.result())
            stream.write(json.dumps(results[-1], default=str) + "\n")
            stream.flush()
            if i % 50 == 0:
                print(
                    f"check-triton: {i}/{len(jobs)} compiled ({time.time() - start:.0f} s)",
                    flush=True,
                )
    table = report(results)
    opts.out.write_text(table + "\n")
    print(table)
    failures = verdicts(results)
    pruned = sum(1 for r in results if "error" not in r and not r["fits"] and r["tuned"])
    worst = max((r["spills"] for r in results if "error" not in r and r["fits"]), default=0)
    for f in failures:
        print(f"check-triton: FAIL {f}")
    print(
        f"check-triton: {len(results) - len(failures)} of {len(results)} variants ok, {len(failures)} failures,"
        f" {pruned} candidate tiles pruned (do not fit), largest spill among used tiles {worst} B,"
        f" {time.time() - start:.0f} s; table in {opts.out.relative_to(ROOT) if opts.out.is_relative_to(ROOT) else opts.out}"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
