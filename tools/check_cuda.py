"""Compile-check every CUDA source (nvcc -c, sm_80 and sm_90) on machines without a GPU.

Uses the torch headers of the installed torch and the cuBLAS headers of the nvidia-cublas wheel
(downloaded once into build/cublas-<version>/; only its include/ is kept). Where nvcc is absent it
says so and exits 0.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CUBLAS_WHEEL = "nvidia-cublas==13.0.0.19"  # matches nvcc 13.0


def cublas_include() -> Path:
    dest = ROOT / "build" / f"cublas-{CUBLAS_WHEEL.split('==')[1]}"
    if (dest / "cublasLt.h").exists():
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, CUBLAS_WHEEL],
            check=True,
        )
        (wheel,) = Path(tmp).glob("*.whl")
        dest.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if "/include/" in name and name.endswith(".h"):
                    (dest / Path(name).name).write_bytes(z.read(name))
    return dest


def cuda_shim() -> Path:
    """The one generated header a CPU build of torch does not ship (its CUDA builds do)."""
    dest = ROOT / "build" / "torch-cuda-shim"
    header = dest / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    header.parent.mkdir(parents=True, exist_ok=True)
    header.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return dest


def main() -> int:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("check-cuda: nvcc not found; CUDA sources not compile-checked")
        return 0
    from torch.utils.cpp_extension import include_paths

    sys.path.insert(0, str(ROOT))
    from nnfast import _build

    includes = [*include_paths(), sysconfig.get_paths()["include"], str(cublas_include())]
    import torch

    if torch.version.cuda is None:  # CPU build of torch: add the missing generated header
        includes.append(str(cuda_shim()))
    flags = [
        *_build.nvcc_flags(),
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-D_GLIBCXX_USE_CXX11_ABI=1",
        "-DTORCH_EXTENSION_NAME=_C",
    ]
    failed = 0
    sources = _build.cuda_sources()
    with tempfile.TemporaryDirectory() as tmp:
        for src in sources:
            cmd = [nvcc, "-c", src, "-o", str(Path(tmp) / "out.o"), *flags]
            cmd += [f"-I{p}" for p in includes]
            r = subprocess.run(cmd, capture_output=True, text=True)
            status = "ok" if r.returncode == 0 else "FAILED"
            print(f"check-cuda: {Path(src).relative_to(ROOT)}: {status}")
            if r.returncode != 0:
                print(r.stdout + r.stderr)
                failed += 1
    print(f"check-cuda: compiled {len(sources) - failed} of {len(sources)} CUDA sources")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
