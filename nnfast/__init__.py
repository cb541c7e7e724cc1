"""nnfast: fused dense layers, ``act(x @ W.T + b)`` in one pass, forward and backward."""

from nnfast._backends import available_backends
from nnfast._backends.chooser import report as dispatch_report
from nnfast._backends.chooser import set_dispatch
from nnfast.activations import NAMES as ACTIVATIONS
from nnfast.functional import dense, mlp
from nnfast.fuse import fuse, fuse_report, unfuse
from nnfast.modules import FusedDense, FusedMLP

__all__ = [
    "ACTIVATIONS",
    "FusedDense",
    "FusedMLP",
    "available_backends",
    "dense",
    "dispatch_report",
    "fuse",
    "fuse_report",
    "mlp",
    "set_dispatch",
    "unfuse",
]
__version__ = "0.1.0"
