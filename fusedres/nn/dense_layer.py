"""Memory-efficient DenseNet layers (Pleiss et al. 2017) on the fused dense BatchNorm + activation op.

A dense layer's bottleneck ``conv(act(BN(cat(x_1, ..., x_k))))`` is one autograd unit
(:func:`dense_bn_act_conv`): forward runs ``torch.ops.fusedres.dense_bn_act_forward`` (the concatenation is
never built), the convolution, and frees the BN/act output; backward recomputes that output bit for bit from
the inputs and the batch statistics (running statistics untouched), then runs the convolution backward and
``dense_bn_act_backward``. Saved per layer: nothing but per-channel vectors — the inputs are the block's
feature maps, alive anyway. The second BN -> ReLU -> 3x3 conv of a layer uses the same unit with one input.

Statistics once per feature map: a :class:`DenseBlock` computes the batch mean / variance of each feature map
once, when it is produced (``fusedres.ops.bn_stats``), and hands the list to every later layer, whose
BatchNorm normalises with them and updates its own running statistics from them (once per forward).

Blocks pass :class:`DenseFeatures` (the maps and their statistics) instead of a concatenated tensor; the
transitions and the final norm read them in place as well. ``fused=False`` builds the same modules on the
pure PyTorch reference (``torch.cat`` + ``F.batch_norm`` + ReLU + conv): one definition, same state_dict keys
as torchvision's DenseNet.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import Tensor, nn

from fusedres.nn.dense import DenseBatchNormAct2d
from fusedres.ops.dense_conv import Stats, dense_bn_act_conv, feature_stats

__all__ = ["DenseBlock", "DenseFeatures", "DenseLayer", "DenseNormAct2d", "DenseTransition", "dense_bn_act_conv"]


class DenseFeatures(NamedTuple):
    """The feature maps of a dense block, whose channel concatenation is the block's output.

    Attributes:
        maps: list of Tensor[N, C_j, H, W] (same N, H, W, dtype and device).
        stats: per map (batch mean, biased batch variance), each Tensor[C_j] in the accumulation dtype
            (float64 for float64 maps, else float32), or None (not computed: eval mode, reference model).
    """

    maps: list[Tensor]
    stats: list[Stats] | None = None

    def cat(self) -> Tensor:
        """The concatenation Tensor[N, sum C_j, H, W] (the maps themselves when there is one)."""
        return self.maps[0] if len(self.maps) == 1 else torch.cat(self.maps, 1)


class DenseNormAct2d(DenseBatchNormAct2d):
    """:class:`fusedres.nn.DenseBatchNormAct2d` that also takes :class:`DenseFeatures` and can fuse a convolution.

    ``norm(features)`` is ``DenseBatchNormAct2d.forward(features.maps, features.stats)``; :meth:`bn_act_conv` runs
    the BatchNorm + act + convolution unit of :func:`dense_bn_act_conv` with this module's parameters and
    buffers. Both update the running statistics and ``num_batches_tracked`` once per call. Arguments are those of
    :class:`fusedres.nn.DenseBatchNormAct2d`.
    """

    def forward(  # type: ignore[override]
        self, inputs: Tensor | Sequence[Tensor] | DenseFeatures, input_stats: Sequence[Stats] | None = None
    ) -> Tensor:
        """act(batch_norm(cat(maps))) -> Tensor[N, num_features, H, W] (DenseFeatures carry their statistics)."""
        if isinstance(inputs, DenseFeatures):
            inputs, input_stats = inputs.maps, inputs.stats
        return super().forward(inputs, input_stats)

    def bn_act_conv(
        self, features: DenseFeatures, conv_weight: Tensor, padding: int, *, memory_efficient: bool
    ) -> Tensor:
        """``conv2d(self(features), conv_weight, padding=padding)`` through :func:`dense_bn_act_conv`."""
        running_mean, running_var, bn_training, factor, count_batch = self._batch_norm_args()
        out = dense_bn_act_conv(
            features.maps, conv_weight, running_mean, running_var, self.weight, self.bias, bn_training, factor,
            self.eps, input_stats=features.stats if bn_training else None, padding=padding,
            activation=self.activation, negative_slope=self.negative_slope, memory_efficient=memory_efficient,
        )  # fmt: skip
        if count_batch:
            self.num_batches_tracked.add_(1)
        return out


def _as_features(x: Tensor | DenseFeatures | list[Tensor]) -> DenseFeatures:
    if isinstance(x, DenseFeatures):
        return x
    if isinstance(x, Tensor):
        return DenseFeatures([x])
    return DenseFeatures(list(x))


class _NormActConv(nn.Module):
    """Shared forward of the layer's two halves and of the transition: ``conv(act(norm(cat(maps))))``."""

    fused: bool
    memory_efficient: bool
    checkpoint: bool

    def _norm_act_conv(self, norm: DenseNormAct2d, conv: nn.Conv2d, features: DenseFeatures) -> Tensor:
        if self.fused:
            return norm.bn_act_conv(features, conv.weight, conv.padding[0], memory_efficient=self.memory_efficient)
        if self.checkpoint and torch.is_grad_enabled() and any(t.requires_grad for t in features.maps):
            # torchvision's memory_efficient=True: recomputes the whole bottleneck in backward, BatchNorm included,
            # so the running statistics are updated twice per step (pytorch issue 96136).
            def bottleneck(*maps: Tensor) -> Tensor:
                return conv(norm(DenseFeatures(list(maps))))

            return cp.checkpoint(bottleneck, *features.maps, use_reentrant=False)
        return conv(norm(features))


class DenseLayer(_NormActConv):
    """torchvision's ``_DenseLayer``: norm1 -> ReLU -> conv1 (1x1, bn_size * k) -> norm2 -> ReLU -> conv2 (3x3, k).

    The ReLUs live in ``norm1`` / ``norm2`` (:class:`DenseNormAct2d`), so torchvision's ``relu1`` / ``relu2``
    (parameter-free) are not modules here; parameter and buffer names are torchvision's.

    Args:
        num_input_features: channels of the concatenated input.
        growth_rate: k, the new feature maps.
        bn_size: bottleneck width factor (bn_size * k channels after conv1).
        drop_rate: dropout after conv2 (training only).
        fused: use the fused kernels; False builds the pure PyTorch reference.
        memory_efficient: (fused) recompute both BN/act outputs in backward instead of keeping them.
        checkpoint: (reference only) torchvision-style ``torch.utils.checkpoint`` of cat + norm1 + ReLU + conv1.
    """

    def __init__(
        self,
        num_input_features: int,
        growth_rate: int,
        bn_size: int,
        drop_rate: float = 0.0,
        *,
        fused: bool = True,
        memory_efficient: bool = True,
        checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if checkpoint and fused:
            raise ValueError("checkpoint=True is the reference's torchvision-style baseline: it needs fused=False")
        self.fused = bool(fused)
        self.memory_efficient = bool(memory_efficient)
        self.checkpoint = bool(checkpoint)
        self.norm1 = DenseNormAct2d(num_input_features, fused=fused)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        self.norm2 = DenseNormAct2d(bn_size * growth_rate, fused=fused)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = float(drop_rate)

    def forward(self, input: Tensor | DenseFeatures | list[Tensor]) -> Tensor:
        """The block's maps so far (DenseFeatures, a list, or one Tensor[N, C, H, W]) -> Tensor[N, k, H, W]."""
        features = _as_features(input)
        bottleneck = self._norm_act_conv(self.norm1, self.conv1, features)
        stats = [feature_stats(bottleneck)] if self.fused and self.training else None
        if self.fused or not self.checkpoint:
            new = self._norm_act_conv(self.norm2, self.conv2, DenseFeatures([bottleneck], stats))
        else:  # torchvision's checkpointing covers only the first half
            new = self.conv2(self.norm2(bottleneck))
        if self.drop_rate > 0:
            new = F.dropout(new, p=self.drop_rate, training=self.training)
        return new


class DenseBlock(nn.ModuleDict):
    """torchvision's ``_DenseBlock`` (``denselayer1`` ... ``denselayerL``) returning :class:`DenseFeatures`.

    Each feature map's batch statistics are computed once, when it is produced (fused, training), and reused by
    every later layer and by the following transition / final norm. Arguments as :class:`DenseLayer`.
    """

    def __init__(
        self,
        num_layers: int,
        num_input_features: int,
        bn_size: int,
        growth_rate: int,
        drop_rate: float = 0.0,
        *,
        fused: bool = True,
        memory_efficient: bool = True,
        checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.fused = bool(fused)
        for i in range(num_layers):
            layer = DenseLayer(
                num_input_features + i * growth_rate,
                growth_rate,
                bn_size,
                drop_rate,
                fused=fused,
                memory_efficient=memory_efficient,
                checkpoint=checkpoint,
            )
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, init_features: Tensor) -> DenseFeatures:
        """Tensor[N, C_0, H, W] -> DenseFeatures with maps [init_features, new_1, ..., new_L]."""
        track = self.fused and self.training
        features = DenseFeatures([init_features], [feature_stats(init_features)] if track else None)
        for layer in self.values():
            new = layer(features)
            features.maps.append(new)
            if track:
                features.stats.append(feature_stats(new))
        return features


class DenseTransition(_NormActConv):
    """torchvision's ``_Transition``: norm -> ReLU -> conv (1x1) -> pool (2x2 average), reading a block's maps.

    Args:
        num_input_features, num_output_features: channels in and out.
        fused, memory_efficient: as :class:`DenseLayer` (torchvision's checkpointing covers dense layers only).
    """

    def __init__(
        self,
        num_input_features: int,
        num_output_features: int,
        *,
        fused: bool = True,
        memory_efficient: bool = True,
    ) -> None:
        super().__init__()
        self.fused = bool(fused)
        self.memory_efficient = bool(memory_efficient)
        self.checkpoint = False
        self.norm = DenseNormAct2d(num_input_features, fused=fused)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, input: Tensor | DenseFeatures | list[Tensor]) -> Tensor:
        """DenseFeatures (or a Tensor) with sum C_j = num_input_features -> Tensor[N, num_output_features, H/2, W/2]."""
        return self.pool(self._norm_act_conv(self.norm, self.conv, _as_features(input)))
