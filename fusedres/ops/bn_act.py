"""BatchNorm + residual + activation: fake kernels, autograd and the public functional.

The kernels are ``torch.ops.fusedres.bn_act_forward`` / ``bn_act_backward`` (schemas in csrc/fusedres.cpp). In eager
mode the functional calls ``torch.ops.fusedres.bn_act``, whose autograd node is C++ (csrc/bn_act_autograd.cpp); under
torch.compile it calls the Python Function below, which Dynamo traces. Both call the same two ops.
Autograd saves only ``input``, ``weight``, the per-channel ``save_mean`` / ``save_invstd`` and the 1-bit
activation mask (relu, leaky_relu, relu6) — never the pre-activation or the output. silu keeps no mask: its backward
recomputes the pre-activation from those and references to ``bias`` and ``residual`` (docs/design.md section 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fusedres import _native
from fusedres.ops._common import acc_dtype as _acc_dtype
from fusedres.ops._common import check_channel_vector as _check_channel_vector
from fusedres.ops._common import (
    check_acc_vector,
    check_batch_args,
    check_functional_args,
    check_mask,
    check_same,
    has_mask,
    mask_bytes,
    refuse_double_backward,
    warn_fallback,
)
from fusedres.ops._common import check_input as _check_input
from fusedres.ops._common import memory_format as _memory_format
from fusedres.ops.block_end import block_end
from fusedres.reference import bn_act as _reference
from fusedres.validation import check_activation

__all__ = ["batch_norm_act", "mask_bytes"]

_FORWARD = "fusedres::bn_act_forward"
_BACKWARD = "fusedres::bn_act_backward"
DOUBLE_BACKWARD_ERROR = "fusedres.batch_norm_act does not support double backward"


def _check_grad_out(grad_out: Tensor, input: Tensor) -> None:
    check_same(grad_out, "grad_out", input.shape, input, "input")


def _fake_forward(
    input: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    activation: str,
    negative_slope: float,
    *,
    check_batch: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # check_batch=False: only the checks bn_act_elemt shares (input, residual, weight, bias, activation).
    check_activation(activation)
    _check_input(input)
    C = input.shape[1]
    if residual is not None:
        check_same(residual, "residual", input.shape, input, "input")
    for t, name in ((weight, "weight"), (bias, "bias"), (running_mean, "running_mean"), (running_var, "running_var")):
        _check_channel_vector(t, name, input, C)
    if check_batch:
        check_batch_args(list(input.shape), input.numel(), running_mean, running_var, training, momentum, eps)
    acc = _acc_dtype(input.dtype)
    output = torch.empty_like(input, memory_format=_memory_format(input))
    save_mean = input.new_empty((C,), dtype=acc)
    save_invstd = input.new_empty((C,), dtype=acc)
    mask = input.new_empty((mask_bytes(input.numel()) if has_mask(activation) else 0,), dtype=torch.uint8)
    return output, save_mean, save_invstd, mask


def _fake_backward(
    grad_out: Tensor,
    input: Tensor,
    weight: Tensor | None,
    save_mean: Tensor,
    save_invstd: Tensor,
    mask: Tensor,
    training: bool,
    activation: str,
    negative_slope: float,
    output_mask: Sequence[bool],
    bias: Tensor | None = None,
    residual: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    check_activation(activation)
    _check_input(input)
    _check_grad_out(grad_out, input)
    C = input.shape[1]
    _check_channel_vector(weight, "weight", input, C)
    _check_channel_vector(bias, "bias", input, C)
    if residual is not None:
        check_same(residual, "residual", input.shape, input, "input")
    acc = _acc_dtype(input.dtype)
    check_acc_vector(save_mean, "save_mean", input, C)
    check_acc_vector(save_invstd, "save_invstd", input, C)
    check_mask(mask, input, activation)
    fmt = _memory_format(input)
    param_dtype = weight.dtype if weight is not None else acc

    def full(wanted: bool) -> Tensor:
        return torch.empty_like(input, memory_format=fmt) if wanted else input.new_empty((0,))

    def per_channel(wanted: bool) -> Tensor:  # the [0] placeholders are in the accumulation dtype
        return input.new_empty((C,), dtype=param_dtype) if wanted else input.new_empty((0,), dtype=acc)

    return full(output_mask[0]), full(output_mask[1]), per_channel(output_mask[2]), per_channel(output_mask[3])


class _BnActFunction(torch.autograd.Function):
    @staticmethod
    def forward(*args):  # (input, residual, weight, bias, running_mean, running_var, training, ...): the op's schema
        return torch.ops.fusedres.bn_act_forward(*args)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        input, residual, weight, bias, _rm, _rv, training, _momentum, _eps, activation, negative_slope = inputs
        _output, save_mean, save_invstd, mask = output
        ctx.mark_non_differentiable(save_mean, save_invstd, mask)
        ctx.set_materialize_grads(False)
        # silu recomputes its pre-activation in backward from bias and residual too (references to inputs).
        needs_z = activation == "silu"
        ctx.save_for_backward(
            input, weight, save_mean, save_invstd, mask, bias if needs_z else None, residual if needs_z else None
        )
        ctx.training = training
        ctx.activation = activation
        ctx.negative_slope = negative_slope
        ctx.weight_dtype = weight.dtype if weight is not None else None
        ctx.bias_dtype = bias.dtype if bias is not None else None

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_invstd, _grad_mask):
        nones = (None,) * 7
        if grad_out is None:
            return (None,) * 4 + nones
        input, weight, save_mean, save_invstd, mask, bias, residual = ctx.saved_tensors
        need_input, need_residual, need_weight, need_bias = ctx.needs_input_grad[:4]
        # For identity d(residual) is grad_out itself: no need to have the kernel copy it.
        residual_from_kernel = need_residual and ctx.activation != "identity"
        output_mask = [need_input, residual_from_kernel, need_weight, need_bias]
        if not any(output_mask):
            grad_residual = grad_out if need_residual else None
            return (None, grad_residual, None, None) + nones
        with torch.no_grad():
            gi, gr, gw, gb = torch.ops.fusedres.bn_act_backward(
                grad_out,
                input,
                weight,
                save_mean,
                save_invstd,
                mask,
                ctx.training,
                ctx.activation,
                ctx.negative_slope,
                output_mask,
                bias,
                residual,
            )
        grad_input = gi if need_input else None
        grad_residual = gr if residual_from_kernel else (grad_out if need_residual else None)
        grad_weight = gw.to(ctx.weight_dtype) if need_weight else None
        grad_bias = gb.to(ctx.bias_dtype) if need_bias else None
        if torch.is_grad_enabled():  # create_graph=True: make a second differentiation fail loudly.
            grad_input, grad_residual, grad_weight, grad_bias = refuse_double_backward(
                DOUBLE_BACKWARD_ERROR, (grad_input, grad_residual, grad_weight, grad_bias), (input, weight, grad_out)
            )
        return (grad_input, grad_residual, grad_weight, grad_bias) + nones


def _fake_bn_act(*args) -> Tensor:  # fusedres::bn_act: bn_act_forward's output
    return _fake_forward(*args)[0]


if _native.native_loaded:
    torch.library.register_fake(_FORWARD)(_fake_forward)
    torch.library.register_fake(_BACKWARD)(_fake_backward)
    torch.library.register_fake("fusedres::bn_act")(_fake_bn_act)

# Device types the native kernels serve; anything else runs the reference (one warning per device type).
_NATIVE_DEVICE_TYPES = frozenset(d for d in ("cpu", "cuda", "meta") if _native.has_kernel(d))
_warned_devices: set[str] = set()


def _narrower(residual: object, input: object) -> bool:
    """Whether residual is a tensor with fewer channels than input (a block end's padded shortcut)."""
    return (
        isinstance(residual, Tensor)
        and isinstance(input, Tensor)
        and residual.dim() >= 2
        and input.dim() >= 2
        and residual.shape[1] < input.shape[1]
    )


def batch_norm_act(
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
    """Fused ``act(scale * batch_norm(input) + residual)``; arguments in the order of ``F.batch_norm``.

    Training mode normalises with the batch statistics and, when ``running_mean`` / ``running_var`` are given,
    updates them in place (``running = (1 - momentum) * running + momentum * batch``, unbiased variance), only
    if the call succeeds. Eval mode normalises with the running statistics. Backward saves ``input``,
    ``weight``, two per-channel vectors and a 1-bit mask (nothing for identity; for silu no mask but references to
    ``bias`` and ``residual``, from which it recomputes the pre-activation); double backward is refused.
    When the native module did not load (see ``fusedres.info()``), or has no kernel for the input's device,
    this runs :func:`fusedres.reference.batch_norm_act` instead.

    Args:
        input: Tensor[N, C, *] with 0 to 3 spatial dimensions; float32, float64, bfloat16 or float16.
        running_mean, running_var: Tensor[C] (float32 or input's dtype) or None; required when not training.
        weight, bias: Tensor[C] (float32 or input's dtype) or None (ones / zeros).
        training: use and update batch statistics (True) or use the running statistics (False).
        momentum: running-statistics update factor (a float; the modules handle ``momentum=None``).
        eps: added to the variance.
        residual: Tensor[N, C, *] (input's shape and dtype) added before the activation, or None. With ``scale``
            or fewer channels than input it is a block end (docs/design.md section 10): Tensor[N, Cr, *], Cr <= C
            (channels Cr.. get no residual: PyramidNet's zero-padded shortcut), any strides (a subsampled view is
            read in place, not copied).
        activation: "relu" (default), "identity", "leaky_relu", "relu6" or "silu" ("silu" not with ``scale`` or
            a narrower residual).
        negative_slope: slope of "leaky_relu" below zero.
        scale: None, or Tensor (N,) or (N, C) (float32 or input's dtype) multiplying the normalised input before
            the residual is added: stochastic depth's per-sample mask / keep probability, squeeze-and-excitation,
            a gate, Shake-Shake's alpha. Differentiable. A zero scale drops the branch: its values are not read.
        backward_scale: None, or Tensor of scale's shape used in place of ``scale`` for the gradients of input,
            weight and bias (Shake-Shake's beta); scale's own gradient stays sum(grad * batch_norm(input)).

    Returns:
        Tensor[N, C, *]: input's dtype, dense in the input's suggested memory format.
    """
    if scale is not None or backward_scale is not None or _narrower(residual, input):
        return block_end(
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
    check_functional_args(input, residual, activation, momentum, "the BatchNormAct modules handle momentum=None")
    if input.device.type not in _NATIVE_DEVICE_TYPES:
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
        )
    args = (
        input,
        residual,
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
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, residual, weight, bias)):
        if torch.compiler.is_compiling():
            # Traced: the Python Function, whose forward and backward ops Dynamo / AOTAutograd see and compile.
            return _BnActFunction.apply(*args)[0]
        # Eager: the same two ops under a C++ autograd node (csrc/bn_act_autograd.cpp), ~100 us less per call.
        return torch.ops.fusedres.bn_act(*args)
    return torch.ops.fusedres.bn_act_forward(*args)[0]
