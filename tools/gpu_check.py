"""The GPU runner (make gpu-check): on a machine with a CUDA GPU and the packages already present,
build the extension, run the GPU test selection (tests/test_gpu.py: every activation x dtype x
backend at a few shapes, the fused MLP, NaN propagation), then the benchmark grid, within one
10-minute command. Every stage streams its output to <stage>.log under
benchmarks/results/<gpu-name>/ as it runs (kept when a stage or the whole command is cut), and
log.txt gathers them with a summary line at the end. Installs nothing: nnfast runs from this
source checkout (PYTHONPATH), the extension JIT-builds. Benchmarks autotune over the first
NNFAST_TRITON_AUTOTUNE=4 candidate tiles so that the grid finishes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Seconds for each stage; the sum stays under the 10 minutes a GPU machine call allows. The
# benchmarks append each row to their CSV as it is measured, so a stage cut short keeps its rows.
BUDGET = {"build": 120, "tests": 200, "bench_dense": 180, "bench_mlp": 60}


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU here; nothing to do")
        return 1
    gpu = torch.cuda.get_device_name()
    out = ROOT / "benchmarks" / "results" / re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-")
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "log.txt").open("w")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("TRITON_INTERPRET", None)

    def say(text: str) -> None:
        print(text, flush=True)
        log.write(text + "\n")
        log.flush()

    def stage(name: str, cmd: list[str], extra_env: dict | None = None) -> int:
        say(f"\n## {name}: {' '.join(cmd)}")
        start = time.time()
        path = out / f"{name}.log"
        with path.open("w") as f:  # streamed: what ran is on disk even if this command is cut
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env={**env, **(extra_env or {})}, stdout=f, stderr=subprocess.STDOUT
            )
            try:
                code = proc.wait(timeout=BUDGET[name])
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                code = 124
        text = path.read_text(errors="replace").rstrip()
        if code == 124:
            text += f"\n{name}: stopped after {BUDGET[name]} s"
        say(text)
        say(f"## {name}: exit {code} in {time.time() - start:.0f} s")
        return code

    say(f"# gpu-check on {gpu}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    py = sys.executable
    codes = {
        "build": stage(
            "build",
            [
                py,
                "-c",
                "from nnfast._backends import extension as e; r = e.unavailable();"
                " print('extension:', r or 'built'); raise SystemExit(1 if r else 0)",
            ],
        ),
        "tests": stage(
            "tests",
            [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"],
            {"NNFAST_TRITON_AUTOTUNE": "0"},
        ),
        "bench_dense": stage(
            "bench_dense",
            [
                py,
                "benchmarks/bench_dense.py",
                "--dtypes",
                "bf16,fp16,fp32",
                "--activations",
                "gelu",
                "--out-dir",
                str(out),
            ],
            {"NNFAST_TRITON_AUTOTUNE": "4"},
        ),
        "bench_mlp": stage(
            "bench_mlp",
            [py, "benchmarks/bench_mlp.py", "--quick", "--dtypes", "bf16", "--out-dir", str(out)],
            {"NNFAST_TRITON_AUTOTUNE": "4"},
        ),
    }
    say("\n# summary: " + ", ".join(f"{k} exit {v}" for k, v in codes.items()))
    return 0 if not any(codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
