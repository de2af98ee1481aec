"""Block-end modules of the skip-connection variants (docs/design.md section 10), next to BatchNormAct2d.

:class:`DropPathBatchNormAct2d` is a residual block's last BatchNorm with stochastic depth built in:
``act(drop_path(bn(x)) + residual)`` as one fused op, the per-sample keep mask being the op's ``scale``. Squeeze-
excitation and gated skips read the BatchNorm's own output to make their scale, so they cannot be one op: compute
``y = bn(x)`` (activation "identity"), the scale from y, then the block end in PyTorch, or give a scale computed
from something else to ``BatchNormAct2d(...)(x, residual, scale=...)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fusedres.nn.batchnorm import BatchNormAct2d

__all__ = ["DropPathBatchNormAct2d"]


class DropPathBatchNormAct2d(BatchNormAct2d):
    """``act(drop_path(batch_norm(x)) + residual)``: a BatchNormAct2d whose branch is dropped per sample in training.

    timm's ``DropPath`` convention (Huang et al.'s stochastic depth applied per sample): in training each sample's
    branch is kept with probability ``1 - drop_prob`` and, with ``scale_by_keep``, divided by that probability, so
    nothing changes at eval (where the module is a plain BatchNormAct2d). A dropped sample's input is not read: its
    output is ``act(residual)``. The draws are ``torch.bernoulli`` of a float32 (N,) tensor on the input's device,
    one per forward in training. Same state_dict as nn.BatchNorm2d.

    Args:
        num_features: C.
        drop_prob: probability of dropping a sample's branch, in [0, 1).
        scale_by_keep: divide the kept branches by 1 - drop_prob (True: timm's default and the "inverted" form).
        **kwargs: BatchNormAct2d's (eps, momentum, affine, activation, fused, ...).
    """

    def __init__(self, num_features: int, drop_prob: float = 0.0, *, scale_by_keep: bool = True, **kwargs: Any):
        super().__init__(num_features, **kwargs)
        if not 0.0 <= float(drop_prob) < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = float(drop_prob)
        self.scale_by_keep = bool(scale_by_keep)

    def keep_scale(self, input: Tensor) -> Tensor | None:
        """This forward's per-sample factors (N,) float32, or None when nothing is dropped (eval, drop_prob 0)."""
        if not self.training or self.drop_prob == 0.0:
            return None
        keep = 1.0 - self.drop_prob
        mask = torch.empty(input.shape[0], dtype=torch.float32, device=input.device).bernoulli_(keep)
        return mask.div_(keep) if self.scale_by_keep else mask

    def forward(
        self,
        input: Tensor,
        residual: Tensor | None = None,
        scale: Tensor | None = None,
        backward_scale: Tensor | None = None,
    ) -> Tensor:
        """BatchNormAct2d.forward with the drop mask multiplied into ``scale`` (and ``backward_scale``)."""
        keep = self.keep_scale(input)
        if keep is not None:
            per = keep if scale is None or scale.dim() == 1 else keep[:, None]
            scale = per if scale is None else scale * per
            if backward_scale is not None:
                backward_scale = backward_scale * (keep if backward_scale.dim() == 1 else keep[:, None])
        return super().forward(input, residual, scale, backward_scale)

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", drop_prob={self.drop_prob}"
        return s if self.scale_by_keep else s + ", scale_by_keep=False"
