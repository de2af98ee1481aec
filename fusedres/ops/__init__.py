"""The fused ops: autograd, fake kernels and public functionals over torch.ops.fusedres.*."""

from fusedres.ops.bn_act import batch_norm_act
from fusedres.ops.highway import highway, highway_packed

__all__ = ["batch_norm_act", "highway", "highway_packed"]
