"""Drop-in BatchNorm over a dense concatenation: ``DenseBatchNormAct2d(C)([x_1, ..., x_k])`` computes
``relu(nn.BatchNorm2d(C)(torch.cat([x_1, ..., x_k], 1)))`` without building the concatenation.

Same parameters, buffers, state_dict keys and running-statistics behaviour as ``nn.BatchNorm2d`` over the
C = sum of the inputs' channels (the ``norm1`` of a torchvision DenseNet layer loads into it as is).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from fusedres.nn.batchnorm import _BatchNormActMixin, _init_doc
from fusedres.ops.dense import dense_batch_norm_act as _fused_dense_batch_norm_act
from fusedres.validation import BASIC_ACTIVATIONS
from fusedres.validation import check_dense_inputs
from fusedres.reference.dense import dense_batch_norm_act as _reference_dense_batch_norm_act

__all__ = ["DenseBatchNormAct2d"]


class DenseBatchNormAct2d(_BatchNormActMixin, nn.BatchNorm2d):
    """``act(nn.BatchNorm2d(torch.cat(inputs, 1)))`` for a list of Tensor[N, C_j, H, W] (any memory format)."""

    # The dense op's kernels implement these activations only (no relu6 / silu).
    _activations = BASIC_ACTIVATIONS
    _activation_op = "DenseBatchNormAct2d (dense_batch_norm_act)"

    def forward(  # type: ignore[override]
        self, inputs: Tensor | Sequence[Tensor], input_stats: Sequence[tuple[Tensor, Tensor]] | None = None
    ) -> Tensor:
        """act(batch_norm(cat(inputs))).

        Args:
            inputs: a Tensor[N, C, H, W] or a non-empty list of Tensor[N, C_j, H, W] with sum C_j = num_features,
                agreeing in N, H, W, dtype and device.
            input_stats: training only: per input (batch mean, biased batch variance), Tensor[C_j] each in the
                accumulation dtype (``fusedres.ops.bn_stats(inputs[j])``), used instead of reducing the inputs;
                the running statistics are still updated once, from them. Ignored in eval mode, like the batch
                statistics themselves.

        Returns:
            Tensor[N, num_features, H, W], dense in inputs[0]'s memory format.
        """
        inputs = check_dense_inputs([inputs] if isinstance(inputs, Tensor) else inputs)
        for x in inputs:
            self._check_input_dim(x)
        C = sum(x.shape[1] for x in inputs)
        if C != self.num_features:
            raise ValueError(
                f"inputs must have num_features={self.num_features} channels in all, got {C} "
                f"({' + '.join(str(x.shape[1]) for x in inputs)})"
            )
        running_mean, running_var, bn_training, exponential_average_factor, count_batch = self._batch_norm_args()
        fn = _fused_dense_batch_norm_act if self.fused else _reference_dense_batch_norm_act
        out = fn(
            inputs,
            running_mean,
            running_var,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
            activation=self.activation,
            negative_slope=self.negative_slope,
            input_stats=input_stats if bn_training else None,
        )
        if count_batch:
            self.num_batches_tracked.add_(1)
        return out


DenseBatchNormAct2d.__doc__ = f"{DenseBatchNormAct2d.__doc__}\n\n    {_init_doc(nn.BatchNorm2d)}"
