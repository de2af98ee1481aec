"""The block end ``act(scale * batch_norm(input) + residual)``: fake kernels, autograd and the functional behind
:func:`fusedres.batch_norm_act`'s ``scale`` / ``backward_scale`` / narrower ``residual`` (docs/design.md section 10).

The kernels are ``torch.ops.fusedres.block_end_forward`` / ``block_end_backward`` (schemas in csrc/fusedres.cpp).
In eager mode the functional calls ``torch.ops.fusedres.block_end``, whose autograd node is C++
(csrc/block_end_autograd.cpp); under torch.compile the Python Function below, which Dynamo traces. Both save
``input``, ``weight``, ``bias`` (the scale's gradient reads it), the scale the backward uses, the
per-channel statistics and the 1-bit mask; never the pre-activation, the output or the residual.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fusedres import _native
from fusedres.ops._common import (
    acc_dtype,
    check_acc_vector,
    check_batch_args,
    check_channel_vector,
    check_input,
    check_mask,
    check_same,
    has_mask,
    mask_bytes,
    memory_format,
    refuse_double_backward,
    warn_fallback,
)
from fusedres.reference import bn_act as _reference
from fusedres.validation import MASK_ACTIVATIONS, check_activation

__all__ = ["block_end"]

_FORWARD = "fusedres::block_end_forward"
_BACKWARD = "fusedres::block_end_backward"
_OP = "the block end (batch_norm_act with scale or a residual with fewer channels)"
DOUBLE_BACKWARD_ERROR = "fusedres.batch_norm_act (block end) does not support double backward"
_warned_devices: set[str] = set()


def _check_scale(scale: Tensor | None, name: str, input: Tensor) -> None:
    if scale is None:
        return
    N, C = input.shape[0], input.shape[1]
    torch._check(
        tuple(scale.shape) in ((N,), (N, C)),
        lambda: (
            f"{name} must have shape (N,) = ({N},) or (N, C) = ({N}, {C}) for input of shape {list(input.shape)}, "
            f"got {list(scale.shape)}"
        ),
    )
    torch._check(scale.dtype.is_floating_point, lambda: f"{name} must have a floating dtype, got {scale.dtype}")
    torch._check(
        scale.device == input.device,
        lambda: f"{name} must be on the same device as input ({input.device}), got {scale.device}",
    )


def _check_residual(residual: Tensor | None, input: Tensor) -> None:
    if residual is None:
        return
    same = (
        residual.dim() == input.dim()
        and residual.shape[0] == input.shape[0]
        and residual.shape[1] <= input.shape[1]
        and residual.shape[2:] == input.shape[2:]
    )
    torch._check(
        same,
        lambda: (
            f"residual must have input's shape {list(input.shape)} except for at most as many channels (dim 1), "
            f"got {list(residual.shape)}"
        ),
    )
    torch._check(
        residual.dtype == input.dtype,
        lambda: f"residual must have the same dtype as input ({input.dtype}), got {residual.dtype}",
    )
    torch._check(
        residual.device == input.device,
        lambda: f"residual must be on the same device as input ({input.device}), got {residual.device}",
    )


def _fake_forward(
    input: Tensor,
    residual: Tensor | None,
    scale: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    activation: str,
    negative_slope: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    check_activation(activation, MASK_ACTIVATIONS, _OP)
    check_input(input)
    C = input.shape[1]
    _check_residual(residual, input)
    _check_scale(scale, "scale", input)
    for t, name in ((weight, "weight"), (bias, "bias"), (running_mean, "running_mean"), (running_var, "running_var")):
        check_channel_vector(t, name, input, C)
    check_batch_args(list(input.shape), input.numel(), running_mean, running_var, training, momentum, eps)
    acc = acc_dtype(input.dtype)
    output = torch.empty_like(input, memory_format=memory_format(input))
    mask = input.new_empty((mask_bytes(input.numel()) if has_mask(activation) else 0,), dtype=torch.uint8)
    return output, input.new_empty((C,), dtype=acc), input.new_empty((C,), dtype=acc), mask


def _fake_backward(
    grad_out: Tensor,
    input: Tensor,
    scale: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    save_mean: Tensor,
    save_invstd: Tensor,
    mask: Tensor,
    residual_channels: int,
    training: bool,
    activation: str,
    negative_slope: float,
    output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    check_activation(activation, MASK_ACTIVATIONS, _OP)
    check_input(input)
    check_same(grad_out, "grad_out", input.shape, input, "input")
    C = input.shape[1]
    _check_scale(scale, "scale", input)
    check_channel_vector(weight, "weight", input, C)
    check_channel_vector(bias, "bias", input, C)
    check_acc_vector(save_mean, "save_mean", input, C)
    check_acc_vector(save_invstd, "save_invstd", input, C)
    check_mask(mask, input, activation, "block_end_forward")
    torch._check(
        0 <= residual_channels <= C,
        lambda: f"residual_channels must be in [0, {C}] (input's channels), got {residual_channels}",
    )
    acc = acc_dtype(input.dtype)
    fmt = memory_format(input)

    def empty() -> Tensor:  # a fresh [0] placeholder per output (outputs must not alias)
        return input.new_empty((0,), dtype=acc)

    grad_input = torch.empty_like(input, memory_format=fmt) if output_mask[0] else input.new_empty((0,))
    grad_residual = input.new_empty((0,))
    if output_mask[1]:
        shape = (input.shape[0], residual_channels, *input.shape[2:])
        grad_residual = input.new_empty(shape).contiguous(memory_format=fmt)
    grad_scale = input.new_empty(tuple(scale.shape), dtype=acc) if output_mask[2] and scale is not None else empty()
    weight_dtype = weight.dtype if weight is not None else acc
    bias_dtype = bias.dtype if bias is not None else acc
    grad_weight = input.new_empty((C,), dtype=weight_dtype) if output_mask[3] else empty()
    grad_bias = input.new_empty((C,), dtype=bias_dtype) if output_mask[4] else empty()
    return grad_input, grad_residual, grad_scale, grad_weight, grad_bias


class _BlockEndFunction(torch.autograd.Function):
    @staticmethod
    def forward(input, residual, scale, backward_scale, weight, bias, running_mean, running_var, *rest):
        # rest = (training, momentum, eps, activation, negative_slope); backward_scale only matters to backward.
        return torch.ops.fusedres.block_end_forward(
            input, residual, scale, weight, bias, running_mean, running_var, *rest
        )

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        input, residual, scale, backward_scale, weight, bias, _rm, _rv, training, _m, _eps, activation, slope = inputs
        _output, save_mean, save_invstd, mask = output
        ctx.mark_non_differentiable(save_mean, save_invstd, mask)
        ctx.set_materialize_grads(False)
        grad_scale = backward_scale if backward_scale is not None else scale
        ctx.save_for_backward(input, weight, bias, grad_scale, save_mean, save_invstd, mask)
        ctx.residual_channels = residual.shape[1] if residual is not None else 0
        ctx.training = training
        ctx.activation = activation
        ctx.negative_slope = slope
        ctx.scale_dtype = scale.dtype if scale is not None else None

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_invstd, _grad_mask):
        nones = (None,) * 7
        if grad_out is None:
            return (None,) * 6 + nones
        input, weight, bias, grad_scale, save_mean, save_invstd, mask = ctx.saved_tensors
        need_input, need_residual, need_scale, _need_bs, need_weight, need_bias = ctx.needs_input_grad[:6]
        output_mask = [need_input, need_residual, need_scale, need_weight, need_bias]
        if not any(output_mask):
            return (None,) * 6 + nones
        with torch.no_grad():
            gi, gr, gs, gw, gb = torch.ops.fusedres.block_end_backward(
                grad_out,
                input,
                grad_scale,
                weight,
                bias,
                save_mean,
                save_invstd,
                mask,
                ctx.residual_channels,
                ctx.training,
                ctx.activation,
                ctx.negative_slope,
                output_mask,
            )
        grads = (
            gi if need_input else None,
            gr if need_residual else None,
            gs.to(ctx.scale_dtype) if need_scale else None,
            gw if need_weight else None,
            gb if need_bias else None,
        )
        if torch.is_grad_enabled():  # create_graph=True: make a second differentiation fail loudly.
            grads = refuse_double_backward(DOUBLE_BACKWARD_ERROR, grads, (input, weight, grad_out))
        gi, gr, gs, gw, gb = grads
        return (gi, gr, gs, None, gw, gb) + nones


def _fake_block_end(input, residual, scale, backward_scale, weight, bias, *rest) -> Tensor:
    """fusedres::block_end: block_end_forward's output (backward_scale only matters to backward)."""
    return _fake_forward(input, residual, scale, weight, bias, *rest)[0]


if _native.native_loaded:
    torch.library.register_fake(_FORWARD)(_fake_forward)
    torch.library.register_fake(_BACKWARD)(_fake_backward)
    torch.library.register_fake("fusedres::block_end")(_fake_block_end)


def block_end(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    residual: Tensor | None = None,
    activation: str = "relu",
    negative_slope: float = 0.01,
    scale: Tensor | None = None,
    backward_scale: Tensor | None = None,
) -> Tensor:
    """``act(scale * batch_norm(input) + residual)`` on the native kernels: :func:`fusedres.batch_norm_act` calls
    this when given ``scale`` / ``backward_scale`` or a residual with fewer channels (same arguments)."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
    for t, name in ((residual, "residual"), (scale, "scale"), (backward_scale, "backward_scale")):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor or None, got {type(t).__name__}")
    check_activation(activation, MASK_ACTIVATIONS, _OP)
    if momentum is None:
        raise TypeError("momentum must be a float, got None (the BatchNormAct modules handle momentum=None)")
    if backward_scale is not None:
        if scale is None:
            raise ValueError("backward_scale needs scale (the forward's scale), got scale=None")
        if backward_scale.shape != scale.shape:
            raise ValueError(
                f"backward_scale must have scale's shape {list(scale.shape)}, got {list(backward_scale.shape)}"
            )
        if backward_scale.device != scale.device or not backward_scale.dtype.is_floating_point:
            raise ValueError(
                f"backward_scale must be a floating tensor on scale's device ({scale.device}), got "
                f"{backward_scale.dtype} on {backward_scale.device}"
            )
    if not _native.native_loaded:  # the whole package runs on the reference then (fusedres.info() says why)
        warn_fallback("fusedres.batch_norm_act", input.device.type, _warned_devices)
        return _reference.batch_norm_act(
            input,
            running_mean,
            running_var,
            weight,
            bias,
            training,
            momentum,
            eps,
            residual=residual,
            activation=activation,
            negative_slope=negative_slope,
            scale=scale,
            backward_scale=backward_scale,
        )
    device = input.device.type
    if device not in ("cpu", "meta") and not (device == "cuda" and _native.has_kernel("cuda", _FORWARD)):
        raise NotImplementedError(
            f"{_OP} has CPU kernels and CUDA kernels (the latter in a build with FUSEDRES_CUDA=1), none for this "
            f"{device} input in this build; use fused=False modules or fusedres.reference.batch_norm_act on this "
            "device"
        )
    args = (
        input,
        residual,
        scale,
        backward_scale,
        weight,
        bias,
        running_mean,
        running_var,
        bool(training),
        float(momentum),
        float(eps),
        activation,
        float(negative_slope),
    )
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, residual, scale, weight, bias)
    ):
        if torch.compiler.is_compiling():
            # Traced: the Python Function, whose forward and backward ops Dynamo / AOTAutograd see and compile.
            return _BlockEndFunction.apply(*args)[0]
        # Eager: the same two ops under a C++ autograd node (csrc/block_end_autograd.cpp), no Python per call.
        return torch.ops.fusedres.block_end(*args)
    return torch.ops.fusedres.block_end_forward(
        input, residual, scale, weight, bias, running_mean, running_var, *args[8:]
    )[0]
