"""Drop-in BatchNorm modules with a fused residual add and activation.

``BatchNormAct2d(C)(x, residual)`` computes ``relu(nn.BatchNorm2d(C)(x) + residual)`` with the same parameters,
buffers, state_dict keys and running-statistics behaviour as ``nn.BatchNorm2d`` (momentum, ``momentum=None``
cumulative average, ``track_running_stats=False``, ``num_batches_tracked``), so checkpoints load both ways.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fusedres.ops.bn_act import batch_norm_act as _fused_batch_norm_act
from fusedres.reference.bn_act import batch_norm_act as _reference_batch_norm_act
from fusedres.validation import ACTIVATIONS, check_activation

__all__ = ["BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d"]


class _BatchNormActMixin:
    """forward / extra_repr shared by the three modules; the parent nn.BatchNorm*d provides everything else."""

    # The activations this module's op supports, and the name said in the error for the others (subclasses on
    # ops with fewer activations narrow them).
    _activations: tuple[str, ...] = ACTIVATIONS
    _activation_op: str | None = None
    activation: str
    negative_slope: float
    fused: bool

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        activation: str = "relu",
        negative_slope: float = 0.01,
        fused: bool = True,
    ) -> None:
        # super() is the nn.BatchNorm*d that follows this mixin in the subclass's MRO.
        super().__init__(  # type: ignore[call-arg]
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        self.activation = check_activation(activation, self._activations, self._activation_op)
        self.negative_slope = float(negative_slope)
        self.fused = bool(fused)

    def forward(
        self,
        input: Tensor,
        residual: Tensor | None = None,
        scale: Tensor | None = None,
        backward_scale: Tensor | None = None,
    ) -> Tensor:
        """act(scale * batch_norm(input) + residual): a residual block's end (docs/design.md section 10).

        Args:
            input: Tensor[N, C, *] (the parent's accepted dimensions).
            residual: Tensor of input's shape and dtype, or None. It may have fewer channels (the others are
                zeros: PyramidNet's padded shortcut) and any strides (a subsampled view is read in place).
            scale: None, or Tensor (N,) or (N, C) multiplying the normalised branch (stochastic depth's per-sample
                mask, squeeze-and-excitation, a gate, Shake-Shake's alpha).
            backward_scale: None, or Tensor of scale's shape used for the branch's gradient instead of scale
                (Shake-Shake's beta).

        Returns:
            Tensor of input's shape.
        """
        self._check_input_dim(input)
        running_mean, running_var, bn_training, exponential_average_factor, count_batch = self._batch_norm_args()
        fn = _fused_batch_norm_act if self.fused else _reference_batch_norm_act
        out = fn(
            input,
            running_mean,
            running_var,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
            residual=residual,
            activation=self.activation,
            negative_slope=self.negative_slope,
            scale=scale,
            backward_scale=backward_scale,
        )
        if count_batch:
            self.num_batches_tracked.add_(1)
        return out

    def _batch_norm_args(self) -> tuple[Tensor | None, Tensor | None, bool, float, bool]:
        """(running_mean, running_var, training, momentum) to hand the functional, and whether the call counts a
        batch: the caller increments num_batches_tracked once the op has succeeded (a rejected call changes no state).

        The same decisions as nn.modules.batchnorm._BatchNorm.forward.
        """
        count_batch = self.training and self.track_running_stats and self.num_batches_tracked is not None
        if self.momentum is None:
            # Cumulative moving average; the parent uses 0.0 when no batch is counted.
            exponential_average_factor = 1.0 / float(self.num_batches_tracked + 1) if count_batch else 0.0
        else:
            exponential_average_factor = self.momentum
        # Batch statistics in training mode, and in eval mode when there are no running buffers.
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        # Buffers are updated only when they exist and are tracked; in eval mode they are used if they exist.
        use_buffers = not self.training or self.track_running_stats
        return (
            self.running_mean if use_buffers else None,
            self.running_var if use_buffers else None,
            bn_training,
            exponential_average_factor,
            count_batch,
        )

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", activation={self.activation}"
        if self.activation == "leaky_relu":
            s += f", negative_slope={self.negative_slope}"
        if not self.fused:
            s += ", fused=False"
        return s


def _init_doc(parent: type) -> str:
    return (
        f"Args: those of ``nn.{parent.__name__}`` (num_features, eps, momentum, affine, track_running_stats, device,"
        " dtype, then keyword-only bias: False keeps the affine weight without a bias, and the state_dict has no"
        ' ``bias`` key), then activation ("relu", "identity", "leaky_relu", "relu6" or "silu"), negative_slope'
        " (leaky_relu slope) and"
        " fused (False runs the pure PyTorch reference: one definition builds both)."
    )


class BatchNormAct1d(_BatchNormActMixin, nn.BatchNorm1d):
    """``act(nn.BatchNorm1d(input) + residual)`` for Tensor[N, C] or Tensor[N, C, L]."""


class BatchNormAct2d(_BatchNormActMixin, nn.BatchNorm2d):
    """``act(nn.BatchNorm2d(input) + residual)`` for Tensor[N, C, H, W] (any memory format)."""


class BatchNormAct3d(_BatchNormActMixin, nn.BatchNorm3d):
    """``act(nn.BatchNorm3d(input) + residual)`` for Tensor[N, C, D, H, W] (any memory format)."""


for _cls in (BatchNormAct1d, BatchNormAct2d, BatchNormAct3d):
    _cls.__doc__ = f"{_cls.__doc__}\n\n    {_init_doc(_cls.__mro__[2])}"
