"""Dense concatenation + BatchNorm + activation: fake kernels, autograd and the public functional.

``act(batch_norm(torch.cat(inputs, 1)))`` without building the concatenation: the kernels
``torch.ops.fusedres.dense_bn_act_forward`` / ``dense_bn_act_backward`` (schemas in csrc/fusedres.cpp) read every
input where it lies. Autograd saves the inputs (a dense block's feature maps, alive anyway), ``weight``, the
per-channel ``save_mean`` / ``save_invstd`` and the 1-bit activation mask — never the concatenation or the output.
In eager mode the functional calls ``torch.ops.fusedres.dense_bn_act``, whose autograd node is C++
(csrc/dense_autograd.cpp); under torch.compile it calls the Python Function below, which Dynamo traces. Both call
the same two ops.

Statistics once per feature map: ``input_stats`` hands the op each input's batch mean and biased variance
(``fusedres.ops.bn_stats``), computed once when the map was produced, instead of reducing all inputs again.
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
    check_same,
    mask_bytes,
    memory_format,
    refuse_double_backward,
    warn_fallback,
)
from fusedres.reference import dense as _reference
from fusedres.validation import BASIC_ACTIVATIONS, check_activation
from fusedres.validation import check_dense_args, check_dense_inputs, concat_input_stats

__all__ = ["dense_batch_norm_act", "dense_mask_bytes", "native_serves"]

_FORWARD = "fusedres::dense_bn_act_forward"
_BACKWARD = "fusedres::dense_bn_act_backward"
DOUBLE_BACKWARD_ERROR = "fusedres.dense_batch_norm_act does not support double backward"
_CHANNELS = "the channels of all inputs"


def dense_mask_bytes(inputs: Sequence[Tensor]) -> list[int]:
    """Bytes of each input's segment of the dense op's mask (segment j covers inputs[j], in order)."""
    return [mask_bytes(x.numel()) for x in inputs]


def _check_inputs(inputs: Sequence[Tensor]) -> tuple[Tensor, int]:
    """The op's checks of the input list; returns (inputs[0], total channels)."""
    torch._check(len(inputs) > 0, lambda: "inputs must be a non-empty list of Tensors, got an empty list")
    x0 = inputs[0]
    check_input(x0, "inputs[0]")
    for j, x in enumerate(inputs[1:], 1):
        torch._check(
            x.dim() == x0.dim() and x.shape[0] == x0.shape[0] and x.shape[2:] == x0.shape[2:],
            lambda x=x, j=j: (
                f"inputs[{j}] must have the batch size and spatial size of inputs[0] ({list(x0.shape)}; only the "
                f"channels, dim 1, may differ), got shape {list(x.shape)}"
            ),
        )
        torch._check(
            x.dtype == x0.dtype,
            lambda x=x, j=j: f"inputs[{j}] must have the dtype of inputs[0] ({x0.dtype}), got {x.dtype}",
        )
        torch._check(
            x.device == x0.device,
            lambda x=x, j=j: f"inputs[{j}] must be on the device of inputs[0] ({x0.device}), got {x.device}",
        )
    return x0, sum(x.shape[1] for x in inputs)


def _mask_numel(inputs: Sequence[Tensor], activation: str) -> int:
    return sum(dense_mask_bytes(inputs)) if activation != "identity" else 0


def _fake_forward(
    inputs: list[Tensor],
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    batch_mean: Tensor | None,
    batch_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    activation: str,
    negative_slope: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    check_activation(activation, BASIC_ACTIVATIONS, "dense_batch_norm_act")
    x0, C = _check_inputs(inputs)
    for t, name in ((weight, "weight"), (bias, "bias"), (running_mean, "running_mean"), (running_var, "running_var")):
        check_channel_vector(t, name, x0, C, _CHANNELS)
    size = [x0.shape[0], C, *x0.shape[2:]]
    check_batch_args(size, sum(x.numel() for x in inputs), running_mean, running_var, training, momentum, eps)
    torch._check(
        (batch_mean is None) == (batch_var is None),
        lambda: "batch_mean and batch_var must be given together (both or neither)",
    )
    torch._check(
        training or batch_mean is None,
        lambda: "batch_mean and batch_var (precomputed batch statistics) are only used when training=True",
    )
    if batch_mean is not None and batch_var is not None:
        check_acc_vector(batch_mean, "batch_mean", x0, C, _CHANNELS)
        check_acc_vector(batch_var, "batch_var", x0, C, _CHANNELS)
    acc = acc_dtype(x0.dtype)
    output = torch.empty(
        (x0.shape[0], C, *x0.shape[2:]), dtype=x0.dtype, device=x0.device, memory_format=memory_format(x0)
    )
    save_mean = x0.new_empty((C,), dtype=acc)
    save_invstd = x0.new_empty((C,), dtype=acc)
    mask = x0.new_empty((_mask_numel(inputs, activation),), dtype=torch.uint8)
    return output, save_mean, save_invstd, mask


def _fake_backward(
    grad_out: Tensor,
    inputs: list[Tensor],
    weight: Tensor | None,
    save_mean: Tensor,
    save_invstd: Tensor,
    mask: Tensor,
    training: bool,
    activation: str,
    negative_slope: float,
    input_mask: Sequence[bool],
    param_mask: Sequence[bool],
) -> tuple[list[Tensor], Tensor, Tensor]:
    check_activation(activation, BASIC_ACTIVATIONS, "dense_batch_norm_act")
    x0, C = _check_inputs(inputs)
    shape = [x0.shape[0], C, *x0.shape[2:]]
    check_same(grad_out, "grad_out", shape, x0, "the output")
    check_channel_vector(weight, "weight", x0, C, _CHANNELS)
    check_acc_vector(save_mean, "save_mean", x0, C, _CHANNELS)
    check_acc_vector(save_invstd, "save_invstd", x0, C, _CHANNELS)
    want = _mask_numel(inputs, activation)
    torch._check(
        mask.dtype == torch.uint8 and mask.dim() == 1 and mask.numel() == want and mask.device == x0.device,
        lambda: (
            f"mask must be the uint8 tensor of {want} bytes returned by dense_bn_act_forward, got {mask.dtype} of "
            f"shape {list(mask.shape)}"
        ),
    )
    torch._check(
        len(input_mask) == len(inputs),
        lambda: f"input_mask must have one entry per input ({len(inputs)}), got {len(input_mask)}",
    )
    fmt = memory_format(x0)
    acc = acc_dtype(x0.dtype)
    param_dtype = weight.dtype if weight is not None else acc
    grad_inputs = [
        torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt) if wanted else x.new_empty((0,))
        for x, wanted in zip(inputs, input_mask)
    ]

    def per_channel(wanted: bool) -> Tensor:  # the [0] placeholders are in the accumulation dtype
        return x0.new_empty((C,), dtype=param_dtype) if wanted else x0.new_empty((0,), dtype=acc)

    return grad_inputs, per_channel(param_mask[0]), per_channel(param_mask[1])


# apply(weight, bias, running_mean, running_var, batch_mean, batch_var, training, momentum, eps, activation,
#       negative_slope, *inputs): autograd.Function takes its tensors as separate arguments, so the list goes last.
_NUM_ARGS = 11


def _fake_dense_bn_act(inputs, *args) -> Tensor:  # fusedres::dense_bn_act: dense_bn_act_forward's output
    return _fake_forward(inputs, *args)[0]


class _DenseBnActFunction(torch.autograd.Function):
    @staticmethod
    def forward(*args):
        return torch.ops.fusedres.dense_bn_act_forward(list(args[_NUM_ARGS:]), *args[:_NUM_ARGS])

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        weight, bias, _rm, _rv, _bm, _bv, training, _momentum, _eps, activation, negative_slope = inputs[:_NUM_ARGS]
        _output, save_mean, save_invstd, mask = output
        ctx.mark_non_differentiable(save_mean, save_invstd, mask)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(weight, save_mean, save_invstd, mask, *inputs[_NUM_ARGS:])
        ctx.training = training
        ctx.activation = activation
        ctx.negative_slope = negative_slope
        ctx.weight_dtype = weight.dtype if weight is not None else None
        ctx.bias_dtype = bias.dtype if bias is not None else None

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_invstd, _grad_mask):
        weight, save_mean, save_invstd, mask, *inputs = ctx.saved_tensors
        nones = (None,) * (_NUM_ARGS - 2)
        need_weight, need_bias = ctx.needs_input_grad[:2]
        input_mask = list(ctx.needs_input_grad[_NUM_ARGS:])
        if grad_out is None or not (need_weight or need_bias or any(input_mask)):
            return (None, None) + nones + (None,) * len(inputs)
        with torch.no_grad():
            gi, gw, gb = torch.ops.fusedres.dense_bn_act_backward(
                grad_out,
                inputs,
                weight,
                save_mean,
                save_invstd,
                mask,
                ctx.training,
                ctx.activation,
                ctx.negative_slope,
                input_mask,
                [need_weight, need_bias],
            )
        grad_inputs = tuple(g if need else None for g, need in zip(gi, input_mask))
        grad_weight = gw.to(ctx.weight_dtype) if need_weight else None
        grad_bias = gb.to(ctx.bias_dtype) if need_bias else None
        if torch.is_grad_enabled():  # create_graph=True: make a second differentiation fail loudly.
            grad_weight, grad_bias, *rest = refuse_double_backward(
                DOUBLE_BACKWARD_ERROR, (grad_weight, grad_bias, *grad_inputs), (weight, grad_out, *inputs)
            )
            grad_inputs = tuple(rest)
        return (grad_weight, grad_bias) + nones + grad_inputs


# A native module built before the dense ops existed has no schema for them: such a build runs the reference.
_HAS_SCHEMA = _native.native_loaded and hasattr(torch.ops.fusedres, "dense_bn_act_forward")
if _HAS_SCHEMA:
    torch.library.register_fake(_FORWARD)(_fake_forward)
    torch.library.register_fake(_BACKWARD)(_fake_backward)
    torch.library.register_fake("fusedres::dense_bn_act")(_fake_dense_bn_act)

# Device types the native kernels serve; anything else runs the reference (one warning per device type).
_NATIVE_DEVICE_TYPES = frozenset(
    d for d in ("cpu", "cuda", "meta") if _HAS_SCHEMA and _native.has_kernel(d, op=_FORWARD)
)
_warned_devices: set[str] = set()


def native_serves(device: torch.device) -> bool:
    """Whether the native dense kernels serve ``device`` (else :func:`dense_batch_norm_act` runs the reference)."""
    return device.type in _NATIVE_DEVICE_TYPES


def dense_batch_norm_act(
    inputs: Sequence[Tensor],
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    activation: str = "relu",
    negative_slope: float = 0.01,
    input_stats: Sequence[tuple[Tensor, Tensor]] | None = None,
) -> Tensor:
    """Fused ``act(batch_norm(torch.cat(inputs, 1)))`` that never builds the concatenation.

    Arguments follow :func:`fusedres.batch_norm_act` with a list of inputs in place of ``input``. Training mode
    normalises with the batch statistics of the concatenation and, when ``running_mean`` / ``running_var`` are
    given, updates them in place (unbiased variance), only if the call succeeds; eval mode uses the running
    statistics. Backward returns a gradient for each input that requires one (dense in the output's memory format),
    and for weight and bias; it saves the inputs, ``weight``, two per-channel vectors and a 1-bit mask. Double
    backward is refused. Without a native kernel for the inputs' device this runs
    :func:`fusedres.reference.dense_batch_norm_act`.

    Args:
        inputs: non-empty list of Tensor[N, C_j, *] with 0 to 3 spatial dimensions, agreeing in N, spatial size,
            dtype (float32, float64, bfloat16 or float16) and device; C = sum of the C_j. Contiguous and
            channels_last inputs are read in place (any other input is copied to inputs[0]'s memory format).
        running_mean, running_var: Tensor[C] (float32 or the inputs' dtype) or None; required when not training.
        weight, bias: Tensor[C] (float32 or the inputs' dtype) or None (ones / zeros).
        training: use and update batch statistics (True) or use the running statistics (False).
        momentum: running-statistics update factor (a float; the modules handle ``momentum=None``).
        eps: added to the variance.
        activation: "relu" (default), "identity" or "leaky_relu".
        negative_slope: slope of "leaky_relu" below zero.
        input_stats: training only. Per input, ``(mean_j, var_j)``: Tensor[C_j] each in the accumulation dtype
            (float64 for float64 inputs, else float32), the batch mean and biased variance of ``inputs[j]`` as
            ``fusedres.ops.bn_stats(inputs[j])`` returns them. The op normalises with them and updates the running
            statistics from them instead of reducing the inputs (a dense block computes each feature map's
            statistics once). They are taken as the inputs' own batch statistics: the backward is the training-mode
            one, and no gradient flows into these tensors.

    Returns:
        Tensor[N, C, *]: the inputs' dtype, dense in inputs[0]'s suggested memory format.
    """
    inputs = check_dense_inputs(inputs)
    check_activation(activation, BASIC_ACTIVATIONS, "dense_batch_norm_act")
    if momentum is None:
        raise TypeError("momentum must be a float, got None (the DenseBatchNormAct modules handle momentum=None)")
    check_dense_args(inputs, running_mean, running_var, weight, bias, training)
    if inputs[0].device.type not in _NATIVE_DEVICE_TYPES:
        warn_fallback("fusedres.dense_batch_norm_act", inputs[0].device.type, _warned_devices)
        return _reference.dense_batch_norm_act(
            inputs,
            running_mean,
            running_var,
            weight,
            bias,
            training,
            momentum,
            eps,
            activation=activation,
            negative_slope=negative_slope,
            input_stats=input_stats,
        )
    stats = concat_input_stats(input_stats, inputs, training)
    batch_mean, batch_var = stats if stats is not None else (None, None)
    args = (
        weight,
        bias,
        running_mean,
        running_var,
        batch_mean,
        batch_var,
        bool(training),
        float(momentum),
        float(eps),
        activation,
        float(negative_slope),
    )
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (*inputs, weight, bias)):
        if torch.compiler.is_compiling():  # traced: the Python Function, whose ops Dynamo / AOTAutograd compile
            return _DenseBnActFunction.apply(*args, *inputs)[0]
        return torch.ops.fusedres.dense_bn_act(inputs, *args)  # eager: the same ops under a C++ autograd node
    return torch.ops.fusedres.dense_bn_act_forward(inputs, *args)[0]
