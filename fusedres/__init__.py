"""fusedres: fused BatchNorm + residual + activation (and friends) for PyTorch, on CPU and CUDA.

``fusedres.batch_norm_act`` / ``fusedres.highway`` are the functionals, ``fusedres.nn`` the drop-in modules,
``fusedres.models`` the model builders,
``fusedres.reference`` the pure PyTorch oracles and ``fusedres.info()`` says what this build can do.
"""

from importlib.metadata import PackageNotFoundError, version

from fusedres import models, nn, ops, reference
from fusedres._native import info
from fusedres.convert import convert
from fusedres.ops.bn_act import batch_norm_act
from fusedres.ops.dense import dense_batch_norm_act
from fusedres.ops.highway import highway, highway_packed

try:
    __version__ = version("fusedres")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "__version__",
    "batch_norm_act",
    "convert",
    "dense_batch_norm_act",
    "highway",
    "highway_packed",
    "info",
    "models",
    "nn",
    "ops",
    "reference",
]
