"""Synchronised BatchNorm + residual + activation over ``torch.distributed`` (training mode).

The statistics are those of the global batch (the concatenation of every rank's local batch along N), as with
``nn.SyncBatchNorm``, and the kernels are the building blocks of the fused op (schemas in csrc/fusedres.cpp):

forward:  ``bn_stats`` (local mean, biased variance) -> ONE ``all_gather`` of ``(mean, var, count)`` packed in one
          float64 tensor -> per-channel merge (Chan et al.'s parallel formula in float64; ranks with an empty
          batch send count 0 and weigh nothing) -> ``bn_act_elemt`` (normalise + residual + activation + 1-bit
          mask) -> running statistics updated from the global mean and unbiased global variance.
backward: ``bn_act_backward_reduce`` (local ``sum_dz``, ``sum_dz_xhat``) -> ONE ``all_reduce`` of the two packed
          -> ``bn_act_backward_elemt`` with the global count.

That is PyTorch's own collective pattern (``torch.nn.modules._functions.SyncBatchNorm``: one all_gather forward,
one all_reduce backward per layer, the backward one only when the input needs a gradient), with the residual add
and the activation fused into the same passes. As in PyTorch, ``grad_weight`` / ``grad_bias`` are the LOCAL
sums: ``DistributedDataParallel`` all-reduces (averages) parameter gradients, so DDP training with a per-rank mean
loss equals single-process training on the global batch for equal per-rank batch sizes.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from fusedres import _native
from fusedres.ops._common import acc_dtype as _acc_dtype
from fusedres.ops._common import check_channel_vector as _check_channel_vector
from fusedres.ops._common import check_functional_args, refuse_double_backward
from fusedres.ops._common import check_input as _check_input
from fusedres.ops._common import memory_format as _memory_format
from fusedres.ops.bn_act import batch_norm_act
from fusedres.validation import MASK_ACTIVATIONS, RUNNING_PAIR, one_value_per_channel

__all__ = ["distributed_world_size", "has_sync_kernels", "sync_batch_norm_act"]

DOUBLE_BACKWARD_ERROR = "fusedres.ops.sync_batch_norm_act does not support double backward"

_SPLIT_OPS = (
    "fusedres::bn_stats",
    "fusedres::bn_act_elemt",
    "fusedres::bn_act_backward_reduce",
    "fusedres::bn_act_backward_elemt",
)


# Decided once at import: torch.compile cannot trace the dispatcher query behind has_kernel.
_SYNC_DEVICE_TYPES = frozenset(
    d for d in ("cpu", "cuda", "meta") if all(_native.has_kernel(d, op) for op in _SPLIT_OPS)
)


def has_sync_kernels(device_type: str) -> bool:
    """Whether the native module has the four building-block kernels for tensors on ``device_type``."""
    return device_type in _SYNC_DEVICE_TYPES


def distributed_world_size(process_group: object | None = None) -> int:
    """Size of ``process_group`` (default: the world), or 1 when torch.distributed is unavailable or not
    initialised: the cases in which synchronised BatchNorm is the single-process one."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def _all_gather_rows(packed: Tensor, process_group: object | None, world_size: int) -> Tensor:
    """One collective: every rank's ``packed`` (1-D) stacked into Tensor[world_size, packed.numel()]."""
    if packed.device.type == "cpu":  # gloo has no all_gather_into_tensor
        rows = [torch.empty_like(packed) for _ in range(world_size)]
        dist.all_gather(rows, packed, group=process_group)
        return torch.stack(rows)
    out = packed.new_empty((world_size, packed.numel()))
    dist.all_gather_into_tensor(out, packed, group=process_group)
    return out


def _merge_stats(gathered: Tensor, C: int) -> tuple[Tensor, Tensor, int]:
    """Global per-channel mean and biased variance (float64) and the global count from the gathered rows
    ``[mean (C) | var (C) | count (1)]`` of every rank (Chan et al.: M2 = sum n_r var_r + sum n_r (m_r - m)^2)."""
    mean_all, var_all, count_all = gathered.split([C, C, 1], dim=1)
    total = float(count_all.sum())  # the shapes below do not depend on it: no filtering of empty ranks needed
    if total <= 1:
        raise ValueError(
            one_value_per_channel(
                f"a global batch of {int(total)} value(s) per channel over {gathered.shape[0]} processes"
            )
        )
    weights = count_all / total  # [W, 1]; an empty rank sends zeros and count 0, so it weighs nothing
    mean = (weights * mean_all).sum(0)
    var = (weights * (var_all + (mean_all - mean).square())).sum(0)
    return mean, var, int(total)


class _SyncBnActFunction(torch.autograd.Function):
    """Thin shell over the building-block ops with the two collectives in between (see the module docstring)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        input: Tensor,
        residual: Tensor | None,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float,
        eps: float,
        activation: str,
        negative_slope: float,
        process_group: object | None,
        world_size: int,
    ) -> Tensor:
        C = input.shape[1]
        acc = _acc_dtype(input.dtype)
        local_count = input.numel() // C
        packed = input.new_zeros((2 * C + 1,), dtype=torch.float64)
        if local_count > 0:
            mean, var = torch.ops.fusedres.bn_stats(input)
            packed[:C] = mean
            packed[C : 2 * C] = var
            packed[2 * C] = local_count
        mean64, var64, count = _merge_stats(_all_gather_rows(packed, process_group, world_size), C)
        save_mean = mean64.to(acc)
        save_invstd = (var64 + eps).rsqrt().to(acc)
        if local_count > 0:
            output, mask = torch.ops.fusedres.bn_act_elemt(
                input, residual, weight, bias, save_mean, save_invstd, activation, negative_slope
            )
        else:
            output = torch.empty_like(input, memory_format=_memory_format(input))
            mask = input.new_empty((0,), dtype=torch.uint8)
        if running_mean is not None:  # only after the kernels succeeded: a failing call changes no state
            unbiased = var64 * (count / (count - 1))
            running_mean.copy_(running_mean.to(torch.float64).mul_(1 - momentum).add_(mean64, alpha=momentum))
            running_var.copy_(running_var.to(torch.float64).mul_(1 - momentum).add_(unbiased, alpha=momentum))
        ctx.save_for_backward(input, weight, save_mean, save_invstd, mask)
        ctx.count = count
        ctx.activation = activation
        ctx.negative_slope = negative_slope
        ctx.process_group = process_group
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return output

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        input, weight, save_mean, save_invstd, mask = ctx.saved_tensors
        with torch.no_grad():
            grads = _SyncBnActFunction._backward(ctx, grad_out, input, weight, save_mean, save_invstd, mask)
        if torch.is_grad_enabled():  # create_graph=True: make a second differentiation fail loudly.
            grads = refuse_double_backward(DOUBLE_BACKWARD_ERROR, grads, (input, weight, grad_out))
        return (*grads, *(None,) * 8)

    @staticmethod
    def _backward(ctx, grad_out, input, weight, save_mean, save_invstd, mask):
        need_input, need_residual, need_weight, need_bias = ctx.needs_input_grad[:4]
        C = input.shape[1]
        acc = save_mean.dtype
        grad_input = grad_residual = grad_weight = grad_bias = None
        if input.numel() == 0:
            # Nothing to compute here, but the peers' all_reduce needs this rank (PyTorch does the same).
            if need_input:
                dist.all_reduce(input.new_zeros((2 * C,), dtype=acc), group=ctx.process_group)
                grad_input = torch.empty_like(input, memory_format=_memory_format(input))
            if need_residual:
                grad_residual = grad_out
            # Zeros rather than None, so that every parameter gets a gradient on every rank (DDP's reducer).
            if need_weight:
                grad_weight = torch.zeros_like(weight)
            if need_bias:
                grad_bias = input.new_zeros((C,), dtype=ctx.bias_dtype)
            return grad_input, grad_residual, grad_weight, grad_bias
        # For identity d(residual) is grad_out itself: no need to have the kernel copy it.
        residual_from_kernel = need_residual and ctx.activation != "identity"
        if need_input or need_weight or need_bias:
            sum_dz, sum_dz_xhat = torch.ops.fusedres.bn_act_backward_reduce(
                grad_out, input, save_mean, save_invstd, mask, ctx.activation, ctx.negative_slope
            )
            # Local parameter gradients, as PyTorch's SyncBatchNorm: DDP reduces them with the other parameters.
            if need_weight:
                grad_weight = sum_dz_xhat.to(weight.dtype)
            if need_bias:
                grad_bias = sum_dz.to(ctx.bias_dtype)
        else:
            sum_dz = sum_dz_xhat = save_mean.new_zeros((C,))  # only grad_residual (dz) is wanted: sums unused
        if need_input:
            packed = torch.cat([sum_dz, sum_dz_xhat])
            dist.all_reduce(packed, group=ctx.process_group)
            sum_dz, sum_dz_xhat = packed.split(C)
        if need_input or residual_from_kernel:
            gi, gr = torch.ops.fusedres.bn_act_backward_elemt(
                grad_out,
                input,
                weight,
                save_mean,
                save_invstd,
                mask,
                sum_dz,
                sum_dz_xhat,
                ctx.count,
                ctx.activation,
                ctx.negative_slope,
                [need_input, residual_from_kernel],
            )
            grad_input = gi if need_input else None
            grad_residual = gr if residual_from_kernel else None
        if need_residual and not residual_from_kernel:
            grad_residual = grad_out
        return grad_input, grad_residual, grad_weight, grad_bias


def _check_sync_args(
    input: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
) -> None:
    """The checks the kernels would make, made before any collective: a rank with an empty batch never reaches
    the kernels, and a rank that fails alone would leave its peers waiting in the collective."""
    _check_input(input)
    C = input.shape[1]
    if C == 0:
        raise ValueError(f"input must have at least one channel (dim 1), got shape {list(input.shape)}")
    if residual is not None:
        if residual.shape != input.shape:
            raise ValueError(
                f"residual must have the same shape as input, got {list(residual.shape)} and {list(input.shape)}"
            )
        if residual.dtype != input.dtype or residual.device != input.device:
            raise ValueError(
                f"residual must have the dtype and device of input ({input.dtype}, {input.device}), got "
                f"{residual.dtype}, {residual.device}"
            )
    for t, name in ((weight, "weight"), (bias, "bias"), (running_mean, "running_mean"), (running_var, "running_var")):
        _check_channel_vector(t, name, input, C)
    if (running_mean is None) != (running_var is None):
        raise ValueError(RUNNING_PAIR)
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if not math.isfinite(momentum):
        raise ValueError(f"momentum must be a finite number, got {momentum}")


def sync_batch_norm_act(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    residual: Tensor | None = None,
    activation: str = "relu",
    negative_slope: float = 0.01,
    process_group: object | None = None,
) -> Tensor:
    """Training-mode ``act(batch_norm(input) + residual)`` with the statistics of the global batch of
    ``process_group`` (every rank must call it, in the same order, with the same C and dtype).

    Two collectives per call through ``torch.distributed`` (so any backend: gloo on CPU, NCCL on CUDA): one
    ``all_gather`` of (mean, var, count) in forward, one ``all_reduce`` of (sum_dz, sum_dz_xhat) in backward
    (only when ``input`` needs a gradient). Local batch sizes may differ, and may be 0 (the rank then takes part
    in the collectives and returns an empty output). ``running_mean`` / ``running_var`` are updated in place on
    every rank with the global mean and unbiased global variance, only if the call succeeds. ``weight`` /
    ``bias`` gradients are the local ones, as with ``nn.SyncBatchNorm`` (DDP averages them across ranks).
    Without an initialised process group, or with a group of one process, this is
    :func:`fusedres.batch_norm_act` with ``training=True``.

    Args:
        input: Tensor[N, C, *] with 0 to 3 spatial dimensions (N may be 0 on some ranks); float32, float64,
            bfloat16 or float16.
        running_mean, running_var: Tensor[C] (float32 or input's dtype), or None to not track them.
        weight, bias: Tensor[C] (float32 or input's dtype) or None (ones / zeros).
        momentum: running-statistics update factor (a float; the module handles ``momentum=None``).
        eps: added to the variance.
        residual: Tensor[N, C, *] (input's shape and dtype) added before the activation, or None.
        activation: "relu" (default), "identity", "leaky_relu" or "relu6" ("silu" is not supported: its backward
            recomputes the pre-activation, which the building-block backward ops cannot).
        negative_slope: slope of "leaky_relu" below zero.
        process_group: the group whose ranks share the statistics (default: the world).

    Returns:
        Tensor[N, C, *]: input's dtype, dense in the input's suggested memory format.
    """
    check_functional_args(
        input,
        residual,
        activation,
        momentum,
        "SyncBatchNormAct2d handles momentum=None",
        MASK_ACTIVATIONS,
        "sync_batch_norm_act (its backward runs bn_act_backward_reduce / bn_act_backward_elemt)",
    )
    world_size = distributed_world_size(process_group)
    if world_size == 1:
        return batch_norm_act(
            input,
            running_mean,
            running_var,
            weight,
            bias,
            True,
            momentum,
            eps,
            residual=residual,
            activation=activation,
            negative_slope=negative_slope,
        )
    if not has_sync_kernels(input.device.type):
        raise RuntimeError(
            f"fusedres.ops.sync_batch_norm_act: the native module has no building-block kernels (bn_stats, "
            f"bn_act_elemt, ...) for {input.device.type} tensors (native_loaded={_native.native_loaded}); "
            "SyncBatchNormAct2d falls back to nn.SyncBatchNorm in that case"
        )
    _check_sync_args(input, residual, weight, bias, running_mean, running_var, float(momentum), float(eps))
    return _SyncBnActFunction.apply(
        input,
        residual,
        weight,
        bias,
        running_mean,
        running_var,
        float(momentum),
        float(eps),
        activation,
        float(negative_slope),
        process_group,
        world_size,
    )
