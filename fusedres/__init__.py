"""fusedres: fused BatchNorm + residual + activation (and friends) for PyTorch, on CPU and CUDA.

``fusedres.batch_norm_act`` is the functional, ``fusedres.nn.BatchNormAct2d`` the drop-in module,
``fusedres.reference`` the pure PyTorch oracles and ``fusedres.info()`` says what this build can do.
"""

from importlib.metadata import PackageNotFoundError, version

from fusedres import nn, ops, reference
from fusedres._native import info
from fusedres.ops.bn_act import batch_norm_act

try:
    __version__ = version("fusedres")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__", "batch_norm_act", "info", "nn", "ops", "reference"]
