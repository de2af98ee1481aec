"""Drop-in modules built on the fused ops."""

from fusedres.nn.batchnorm import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from fusedres.nn.highway import Highway, HighwayConv2d

__all__ = ["BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d", "Highway", "HighwayConv2d"]
