"""How nnfast._C is built: sources and flags, shared by setup.py and the first-use JIT build.

Loaded by setup.py from its file path (without importing the nnfast package), so it imports only
the standard library and torch.
"""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"


def cpu_sources() -> list[str]:
    return [
        str(CSRC / "ops.cpp"),
        str(CSRC / "fast.cpp"),
        *sorted(glob.glob(str(CSRC / "cpu" / "*.cpp"))),
    ]


def cuda_sources() -> list[str]:
    return sorted(glob.glob(str(CSRC / "cuda" / "*.cu")))


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def simd_flags() -> list[str]:
    """at::vec capability for the CPU this is built on: AVX512, else AVX2, else scalar.

    The extension is compiled on the machine that runs it (editable install or first-use JIT),
    so it can use that CPU's vector width; the default capability is plain C++ that runs anywhere.
    """
    have = _cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= have:
        return [
            "-DCPU_CAPABILITY=AVX512",
            "-DCPU_CAPABILITY_AVX512",
            "-mavx512f",
            "-mavx512bw",
            "-mavx512vl",
            "-mavx512dq",
            "-mfma",
            "-mf16c",
        ]
    if {"avx2", "fma", "f16c"} <= have:
        return ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"]
    return ["-DCPU_CAPABILITY=DEFAULT"]


def cxx_flags() -> list[str]:
    return ["-O3", "-std=c++17", "-fopenmp", *simd_flags()]


def cuda_archs() -> list[str]:
    """NNFAST_CUDA_ARCHS, e.g. "8.0;9.0" (the default)."""
    return [
        a.strip() for a in os.environ.get("NNFAST_CUDA_ARCHS", "8.0;9.0").split(";") if a.strip()
    ]


def nvcc_flags() -> list[str]:
    flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
    for arch in cuda_archs():
        num = arch.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    return flags


def want_cuda() -> bool:
    """Build the CUDA part when torch has CUDA and nvcc is found."""
    import torch

    if torch.version.cuda is None:
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None or shutil.which("nvcc") is not None


def link_flags() -> list[str]:
    return ["-fopenmp"]


def _nvidia_wheel_files(pattern: str) -> list[Path]:
    """Files matching ``pattern`` inside the nvidia wheels that CUDA builds of torch depend on
    (nvidia-cublas and friends; ``nvidia/cu13/...`` from CUDA 13 on), first wheel that has any."""
    import importlib.util

    for package in ("nvidia.cu13", "nvidia.cublas", "nvidia"):
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        for root in (
            spec.submodule_search_locations if spec and spec.submodule_search_locations else []
        ):
            found = sorted(Path(root).glob(pattern))
            if found:
                return found
    return []


def cublaslt_link_flags() -> list[str]:
    """How to link cuBLASLt: the toolkit's libcublasLt.so, else the copy that ships in the nvidia
    wheel CUDA builds of torch depend on (it has only versioned names, hence -l:<file>)."""
    libs = _nvidia_wheel_files("**/lib/libcublasLt.so*")
    if libs:
        return [f"-L{libs[0].parent}", f"-l:{libs[0].name}", f"-Wl,-rpath,{libs[0].parent}"]
    return ["-lcublasLt"]


def cublaslt_include_dirs() -> list[str]:
    """Where cublasLt.h is when the CUDA toolkit lacks it (a toolkit without the cuBLAS
    development files next to a CUDA build of torch): the nvidia wheel's include/."""
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is not None and (Path(CUDA_HOME) / "include" / "cublasLt.h").exists():
        return []
    return [str(h.parent) for h in _nvidia_wheel_files("**/include/cublasLt.h")[:1]]
