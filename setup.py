"""Installs nnfast, with kernels/ as nnfast.kernels (the top-level name ``kernels`` is taken)."""

from setuptools import setup

setup(
    packages=["nnfast", "nnfast._backends", "nnfast.kernels"],
    package_dir={"nnfast": "nnfast", "nnfast.kernels": "kernels"},
)
