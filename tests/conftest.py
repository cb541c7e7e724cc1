"""Test set-up: without a GPU the Triton backend runs on CPU tensors under the interpreter.

TRITON_INTERPRET must be set before Triton is imported, hence here, before anything imports nnfast.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# On a GPU: one fixed Triton config instead of autotuning every shape the tests meet.
os.environ.setdefault("NNFAST_TRITON_AUTOTUNE", "0")
