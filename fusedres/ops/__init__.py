"""The fused ops: autograd, fake kernels and public functionals over torch.ops.fusedres.*."""

from fusedres.ops.bn_act import batch_norm_act
from fusedres.ops.bn_act_blocks import bn_stats
from fusedres.ops.dense import dense_batch_norm_act
from fusedres.ops.highway import highway, highway_packed
from fusedres.ops.sync_bn import sync_batch_norm_act

__all__ = ["batch_norm_act", "bn_stats", "dense_batch_norm_act", "highway", "highway_packed", "sync_batch_norm_act"]
