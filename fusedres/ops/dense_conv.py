"""The dense BatchNorm + activation + convolution unit of memory-efficient DenseNets (Pleiss et al. 2017):
``conv2d(act(BN(cat(x_1, ..., x_k))), weight)`` as one autograd unit. Forward runs
``torch.ops.fusedres.dense_bn_act_forward`` (the concatenation is never built), the convolution, and frees the
BN / act output; backward recomputes that output bit for bit from the inputs and the batch statistics (running
statistics untouched), then runs the convolution backward and ``dense_bn_act_backward``. Saved: nothing but
per-channel vectors (the inputs are the block's feature maps, alive anyway). The modules are in
:mod:`fusedres.nn.dense_layer`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from fusedres.ops.bn_act_blocks import bn_stats
from fusedres.ops.dense import dense_batch_norm_act, native_serves
from fusedres.validation import BASIC_ACTIVATIONS, check_activation, check_dense_args, check_dense_inputs
from fusedres.validation import concat_input_stats

__all__ = ["Stats", "dense_bn_act_conv", "feature_stats"]

Stats = tuple[Tensor, Tensor]


def feature_stats(x: Tensor) -> Stats:
    """Per-channel batch mean and biased variance of a feature map Tensor[N, C, *] (no autograd, no side effects)."""
    return bn_stats(x.detach())


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
    if training and records and memory_efficient and native_serves(inputs[0].device):
        check_dense_args(inputs, running_mean, running_var, weight, bias, training)
        stats = concat_input_stats(input_stats, inputs, training)
        batch_mean, batch_var = stats if stats is not None else _cat_stats([feature_stats(t) for t in inputs])
        return _DenseBnActConvFunction.apply(
            conv_weight, weight, bias, running_mean, running_var, batch_mean, batch_var, float(momentum),
            float(eps), int(padding), activation, float(negative_slope), *inputs,
        )  # fmt: skip
    y = dense_batch_norm_act(
        inputs, running_mean, running_var, weight, bias, training, momentum, eps,
        activation=activation, negative_slope=negative_slope, input_stats=input_stats if training else None,
    )  # fmt: skip
    return F.conv2d(y, conv_weight, padding=padding)
