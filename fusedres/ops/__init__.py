"""The fused ops: autograd, fake kernels and public functionals over torch.ops.fusedres.*."""

from fusedres.ops.bn_act import batch_norm_act

__all__ = ["batch_norm_act"]
