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
from torch.autograd.function import once_differentiable

from fusedres.nn.dense import DenseBatchNormAct2d
from fusedres.ops import dense as _dense_ops
from fusedres.ops.bn_act_blocks import bn_stats
from fusedres.validation import BASIC_ACTIVATIONS, check_activation
from fusedres.validation import check_dense_args, check_dense_inputs, concat_input_stats

__all__ = ["DenseBlock", "DenseFeatures", "DenseLayer", "DenseNormAct2d", "DenseTransition", "dense_bn_act_conv"]

Stats = tuple[Tensor, Tensor]


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


def feature_stats(x: Tensor) -> Stats:
    """Per-channel batch mean and biased variance of a feature map Tensor[N, C, *] (no autograd, no side effects)."""
    return bn_stats(x.detach())


def _native_dense(x: Tensor) -> bool:
    """Whether the native dense kernels serve x's device (else fusedres.dense_batch_norm_act runs the reference)."""
    return x.device.type in _dense_ops._NATIVE_DEVICE_TYPES


def _describe(t: object) -> str:
    return f"shape {list(t.shape)}" if isinstance(t, Tensor) else type(t).__name__


def _conv(x: Tensor, weight: Tensor, padding: int) -> Tensor:
    return torch.ops.aten.convolution(x, weight, None, [1, 1], [padding, padding], [1, 1], False, [0, 0], 1)


def _autocast_dtype(t: Tensor) -> torch.dtype:
    """The dtype autocast gives ``t`` as an operand of a convolution (on every device's lower-precision list).

    Autocast casts a floating operand on its device to the autocast dtype unless it is float64; the unit calls
    ``aten.convolution`` (which autocast does not intercept) and its backward runs outside any autocast region,
    so it applies that rule itself and records the result for backward.
    """
    device = t.device.type
    if t.is_floating_point() and t.dtype != torch.float64 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return t.dtype


class _DenseBnActConvFunction(torch.autograd.Function):
    """conv(act(BN(cat(inputs)))) in training mode, keeping only the inputs and per-channel vectors."""

    @staticmethod
    def forward(
        ctx,
        conv_weight: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        batch_mean: Tensor,
        batch_var: Tensor,
        momentum: float,
        eps: float,
        padding: int,
        activation: str,
        negative_slope: float,
        *inputs: Tensor,
    ) -> Tensor:
        normed, _mean, _invstd, _mask = torch.ops.fusedres.dense_bn_act_forward(
            list(inputs), weight, bias, running_mean, running_var, batch_mean, batch_var, True, momentum, eps,
            activation, negative_slope,
        )  # fmt: skip
        # Under autocast the convolution runs in the autocast dtype, as F.conv2d would; BatchNorm + act (not on
        # any autocast list) run in the inputs' dtype, as F.batch_norm would.
        ctx.normed_dtype, ctx.conv_dtypes = normed.dtype, (_autocast_dtype(normed), _autocast_dtype(conv_weight))
        out = _conv(normed.to(ctx.conv_dtypes[0]), conv_weight.to(ctx.conv_dtypes[1]), padding)
        del normed  # the point of the exercise: backward recomputes it
        ctx.save_for_backward(conv_weight, weight, bias, batch_mean, batch_var, *inputs)
        ctx.eps = eps
        ctx.padding = padding
        ctx.activation = activation
        ctx.negative_slope = negative_slope
        ctx.weight_dtype = weight.dtype if weight is not None else None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        conv_weight, weight, bias, batch_mean, batch_var, *inputs = ctx.saved_tensors
        need_conv_weight, need_weight, need_bias = ctx.needs_input_grad[:3]
        input_mask = list(ctx.needs_input_grad[12:])
        need_bn = any(input_mask) or need_weight or need_bias
        # Same inputs, same statistics, no running statistics: bitwise the forward's BN/act output and mask.
        normed, save_mean, save_invstd, mask = torch.ops.fusedres.dense_bn_act_forward(
            inputs, weight, bias, None, None, batch_mean, batch_var, True, 0.0, ctx.eps, ctx.activation,
            ctx.negative_slope,
        )  # fmt: skip
        p = ctx.padding
        normed_dtype, weight_dtype = ctx.conv_dtypes
        grad_normed, grad_conv_weight, _ = torch.ops.aten.convolution_backward(
            grad_out.to(normed_dtype), normed.to(normed_dtype), conv_weight.to(weight_dtype), None, [1, 1], [p, p],
            [1, 1], False, [0, 0], 1, [need_bn, need_conv_weight, False],
        )  # fmt: skip
        del normed
        if need_bn:  # the gradients of autocast's casts: back to the dtypes of the tensors that were cast
            grad_normed = grad_normed.to(ctx.normed_dtype)
        if need_conv_weight:
            grad_conv_weight = grad_conv_weight.to(conv_weight.dtype)
        grad_inputs: list[Tensor | None] = [None] * len(inputs)
        grad_weight = grad_bias = None
        if need_bn:
            gi, gw, gb = torch.ops.fusedres.dense_bn_act_backward(
                grad_normed, inputs, weight, save_mean, save_invstd, mask, True, ctx.activation,
                ctx.negative_slope, input_mask, [need_weight, need_bias],
            )  # fmt: skip
            grad_inputs = [g if need else None for g, need in zip(gi, input_mask)]
            grad_weight = gw.to(ctx.weight_dtype) if need_weight else None
            grad_bias = gb.to(ctx.bias_dtype) if need_bias else None
        return (
            grad_conv_weight if need_conv_weight else None,
            grad_weight,
            grad_bias,
            *(None,) * 9,
            *grad_inputs,
        )


def _cat_stats(stats: list[Stats]) -> Stats:
    if len(stats) == 1:
        return stats[0]
    return torch.cat([m for m, _ in stats]), torch.cat([v for _, v in stats])


def dense_bn_act_conv(
    inputs: list[Tensor],
    conv_weight: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    input_stats: list[Stats] | None = None,
    padding: int = 0,
    activation: str = "relu",
    negative_slope: float = 0.01,
    memory_efficient: bool = True,
) -> Tensor:
    """``conv2d(act(batch_norm(torch.cat(inputs, 1))), conv_weight, padding=padding)`` without the concatenation.

    With ``memory_efficient`` (and training with autograd recording) the BN/act output is freed after the
    convolution and recomputed in backward from the inputs and the batch statistics, without updating the
    running statistics again: autograd keeps only the inputs, ``conv_weight``, ``weight``, ``bias`` and two
    per-channel vectors. Otherwise the BN/act output is materialised by ``fusedres.dense_batch_norm_act``.
    Without native kernels for the inputs' device, runs the pure PyTorch reference (cat + BN + act + conv).

    Args:
        inputs: non-empty list of Tensor[N, C_j, H, W] (same N, H, W, dtype, device; channels may differ).
        conv_weight: Tensor[C_out, sum C_j, kh, kw], applied with stride 1, no bias.
        running_mean, running_var: Tensor[sum C_j] or None; updated in place (once) when ``training``.
        weight, bias: BatchNorm affine Tensor[sum C_j] or None.
        training: normalise with batch statistics (and update the running ones).
        momentum, eps: as for ``F.batch_norm`` (momentum a float).
        input_stats: per input (mean, biased var) Tensor[C_j] in the accumulation dtype, as returned by
            :func:`feature_stats`, used instead of reducing the inputs (training only); computed when None.
        padding: convolution padding (same on both sides of H and W).
        activation, negative_slope: "relu", "identity" or "leaky_relu", and the leaky slope.
        memory_efficient: recompute the BN/act output in backward instead of keeping it.

    Returns:
        Tensor[N, C_out, H', W'].
    """
    inputs = check_dense_inputs(inputs)
    check_activation(activation, BASIC_ACTIVATIONS, "dense_batch_norm_act")
    if momentum is None:
        raise TypeError("momentum must be a float, got None (the DenseNormAct2d module handles momentum=None)")
    if not isinstance(conv_weight, Tensor) or conv_weight.dim() != 4:
        raise ValueError(f"conv_weight must be a 4-D Tensor [C_out, C_in, kh, kw], got {_describe(conv_weight)}")
    records = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (conv_weight, weight, bias, *inputs)
    )
    if training and records and memory_efficient and _native_dense(inputs[0]):
        check_dense_args(inputs, running_mean, running_var, weight, bias, training)
        stats = concat_input_stats(input_stats, inputs, training)
        batch_mean, batch_var = stats if stats is not None else _cat_stats([feature_stats(t) for t in inputs])
        return _DenseBnActConvFunction.apply(
            conv_weight, weight, bias, running_mean, running_var, batch_mean, batch_var, float(momentum),
            float(eps), int(padding), activation, float(negative_slope), *inputs,
        )  # fmt: skip
    y = _dense_ops.dense_batch_norm_act(
        inputs, running_mean, running_var, weight, bias, training, momentum, eps,
        activation=activation, negative_slope=negative_slope, input_stats=input_stats if training else None,
    )  # fmt: skip
    return F.conv2d(y, conv_weight, padding=padding)


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
