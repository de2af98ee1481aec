"""The building blocks of ``bn_act`` (docs/design.md section 7): fake kernels and the ``bn_stats`` functional.

``torch.ops.fusedres.bn_stats`` (per-channel batch mean and biased variance), ``bn_act_elemt`` (normalise with
given statistics), ``bn_act_backward_reduce`` (per-channel gradient sums) and ``bn_act_backward_elemt`` (input
gradient from given sums over ``count`` values) run the same kernels as the single-call op. Synchronised
BatchNorm puts a collective between them; dense blocks compute each feature map's statistics once with
``bn_stats`` and hand them to every later layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fusedres import _native
from fusedres.ops._common import acc_dtype as _acc_dtype
from fusedres.ops._common import check_acc_vector, check_mask
from fusedres.ops._common import check_channel_vector as _check_channel_vector
from fusedres.ops._common import check_input as _check_input
from fusedres.ops._common import memory_format as _memory_format
from fusedres.ops.bn_act import _check_grad_out, _fake_forward
from fusedres.validation import MASK_ACTIVATIONS, check_activation

__all__ = ["bn_stats"]


def _fake_bn_stats(input: Tensor) -> tuple[Tensor, Tensor]:
    _check_input(input)
    acc = _acc_dtype(input.dtype)
    C = input.shape[1]
    return input.new_empty((C,), dtype=acc), input.new_empty((C,), dtype=acc)


def _fake_elemt(
    input: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    activation: str,
    negative_slope: float,
) -> tuple[Tensor, Tensor]:
    # bn_act_forward's checks in eval form (given statistics stand in for the running ones).
    output, _m, _i, mask = _fake_forward(
        input, residual, weight, bias, None, None, True, 0.0, 1.0, activation, negative_slope, check_batch=False
    )
    C = input.shape[1]
    check_acc_vector(mean, "mean", input, C)
    check_acc_vector(invstd, "invstd", input, C)
    return output, mask


def _fake_backward_reduce(
    grad_out: Tensor,
    input: Tensor,
    save_mean: Tensor,
    save_invstd: Tensor,
    mask: Tensor,
    activation: str,
    negative_slope: float,
    op: str = "bn_act_backward_reduce",
) -> tuple[Tensor, Tensor]:
    # silu's backward needs the pre-activation (bias and residual), which the building blocks do not take.
    check_activation(activation, MASK_ACTIVATIONS, op)
    _check_input(input)
    _check_grad_out(grad_out, input)
    C = input.shape[1]
    check_acc_vector(save_mean, "save_mean", input, C)
    check_acc_vector(save_invstd, "save_invstd", input, C)
    check_mask(mask, input, activation)
    acc = _acc_dtype(input.dtype)
    return input.new_empty((C,), dtype=acc), input.new_empty((C,), dtype=acc)


def _fake_backward_elemt(
    grad_out: Tensor,
    input: Tensor,
    weight: Tensor | None,
    save_mean: Tensor,
    save_invstd: Tensor,
    mask: Tensor,
    sum_dz: Tensor,
    sum_dz_xhat: Tensor,
    count: int,
    activation: str,
    negative_slope: float,
    output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor]:
    _fake_backward_reduce(
        grad_out, input, save_mean, save_invstd, mask, activation, negative_slope, op="bn_act_backward_elemt"
    )
    C = input.shape[1]
    _check_channel_vector(weight, "weight", input, C)
    check_acc_vector(sum_dz, "sum_dz", input, C)
    check_acc_vector(sum_dz_xhat, "sum_dz_xhat", input, C)
    torch._check(
        count >= 1, lambda: f"count must be at least 1 (values per channel the sums were taken over), got {count}"
    )
    fmt = _memory_format(input)

    def full(wanted: bool) -> Tensor:
        return torch.empty_like(input, memory_format=fmt) if wanted else input.new_empty((0,))

    return full(output_mask[0]), full(output_mask[1])


if _native.native_loaded:
    torch.library.register_fake("fusedres::bn_stats")(_fake_bn_stats)
    torch.library.register_fake("fusedres::bn_act_elemt")(_fake_elemt)
    torch.library.register_fake("fusedres::bn_act_backward_reduce")(_fake_backward_reduce)
    torch.library.register_fake("fusedres::bn_act_backward_elemt")(_fake_backward_elemt)


# Device types with a native bn_stats kernel, decided once at import (torch.compile cannot trace the dispatcher query).
_STATS_DEVICE_TYPES = frozenset(
    d for d in ("cpu", "cuda", "meta") if _native.native_loaded and _native.has_kernel(d, op="fusedres::bn_stats")
)


def bn_stats(input: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel batch mean and biased variance of ``input`` (no gradient, no side effects).

    The statistics ``batch_norm_act`` computes in training mode, by the same kernels: shifted two-pass sums,
    accurate for inputs with a large mean. A dense block calls this once per feature map and passes the
    results to every later layer (``dense_batch_norm_act(..., input_stats=...)``).

    Args:
        input: Tensor[N, C, *] with 0 to 3 spatial dimensions; float32, float64, bfloat16 or float16.

    Returns:
        (mean, var): two Tensor[C], float64 for float64 input and float32 otherwise; zeros for an empty input.
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
    if input.device.type not in _STATS_DEVICE_TYPES:
        x = input.detach().transpose(0, 1).reshape(input.shape[1], -1).to(_acc_dtype(input.dtype))
        if x.shape[1] == 0:
            return x.new_zeros(x.shape[0]), x.new_zeros(x.shape[0])
        var, mean = torch.var_mean(x, dim=1, correction=0)
        return mean, var
    with torch.no_grad():
        return torch.ops.fusedres.bn_stats(input)
