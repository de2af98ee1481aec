"""The last pass of :func:`fusedres.convert`: every BatchNorm still plain after the converters and the Sequential
pairs (a BatchNorm alone: an inverted residual's projection, a norm-act layer without activation, a BatchNorm whose
output a block adds to its shortcut in a forward convert does not know) runs on the fused kernels with
``activation="identity"``. Same function, same parameters and buffers, so any model code around it is unaffected.

Why: the fused op is faster than ``nn.BatchNorm2d`` even without an activation to fuse. Training forward +
backward, float32, 2-core AMD EPYC (Zen 3, AVX2), medians of 11 interleaved rounds (benchmarks: the
``identity`` rows of ``python -m fusedres bench``): 1.25-1.85x in NCHW and 1.02-2.5x in channels_last over the
MobileNet / CIFAR shapes 32x16x112x112 ... 32x320x7x7, 128x16x32x32, 128x64x8x8.

A BatchNorm some converter could not fuse with what follows it (an SE module or an active drop_path before the
block's add, an activation the kernels do not have, a block with hooks) still runs fused, alone; its
:class:`ConvertedNorm` says why nothing more was fused (``via``: ``VIA + NOT_FUSED_WITH + reason``;
``ConvertReport.alone`` lists them). Only a BatchNorm that cannot be replaced at all (hooks on it, a subclass, an unknown norm-act layer, a
norm-act layer whose activation or drop cannot be fused) stays PyTorch's, listed in ``report.untouched``.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fusedres.convert._core import FUSED_NORMS, NOT_FUSED_WITH, ConvertContext

__all__ = ["VIA", "fuse_lone_norms"]

VIA = "BatchNorm alone (identity)"


def _lone(module: nn.Module | None) -> bool:
    """Whether ``module`` is a BatchNorm still running PyTorch's forward."""
    return isinstance(module, _BatchNorm) and not isinstance(module, FUSED_NORMS)


def _fuse_one(bn: nn.Module, name: str, ctx: ConvertContext) -> nn.Module:
    """The identity fused BatchNorm for ``bn``, or ``bn`` itself with the reason it cannot be replaced recorded."""
    problem = ctx.plain_norm_problem(bn)
    if problem is not None:
        ctx.skip(bn, problem)  # a converter's reason, when there is one, stays first
        return bn
    reason = ctx.reason(bn)
    via = VIA if reason is None else VIA + NOT_FUSED_WITH + reason
    return ctx.fuse(bn, name, "identity", residual=False, via=via)


def fuse_lone_norms(model: nn.Module, ctx: ConvertContext) -> nn.Module:
    """Replaces every lone BatchNorm of ``model`` (in place) by a fused one with ``activation="identity"``.

    Returns ``model``, or its replacement when ``model`` itself is a lone BatchNorm.
    """
    if _lone(model):
        return _fuse_one(model, "", ctx)
    for parent_name, parent in list(model.named_modules()):
        prefix = f"{parent_name}." if parent_name else ""
        for child_name, child in list(parent._modules.items()):
            if _lone(child):
                parent._modules[child_name] = _fuse_one(child, prefix + child_name, ctx)
    return model
