"""Installs nnfast, with kernels/ as nnfast.kernels (the top-level name ``kernels`` is taken), and
builds the C++/CUDA extension nnfast._C (NNFAST_BUILD_EXT=0 skips it; nnfast then builds it on
first use)."""

import importlib.util
import os
from pathlib import Path

from setuptools import setup

spec = importlib.util.spec_from_file_location(
    "nnfast_build", Path(__file__).resolve().parent / "nnfast" / "_build.py"
)
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)

ext_modules, cmdclass = [], {}
if os.environ.get("NNFAST_BUILD_EXT", "1") != "0":
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    def rel(paths):
        return [os.path.relpath(p, build.ROOT) for p in paths]

    if build.want_cuda() and build.cuda_sources():
        ext = CUDAExtension(
            "nnfast._C",
            rel(build.cpu_sources() + build.cuda_sources()),
            extra_compile_args={"cxx": build.cxx_flags(), "nvcc": build.nvcc_flags()},
            extra_link_args=build.link_flags() + build.cublaslt_link_flags(),
            include_dirs=build.cublaslt_include_dirs(),
        )
    else:
        ext = CppExtension(
            "nnfast._C",
            rel(build.cpu_sources()),
            extra_compile_args={"cxx": build.cxx_flags()},
            extra_link_args=build.link_flags(),
        )
    ext_modules = [ext]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

setup(
    packages=["nnfast", "nnfast._backends", "nnfast.kernels"],
    package_dir={"nnfast": "nnfast", "nnfast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
