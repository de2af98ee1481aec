"""Pure-PyTorch dense concatenation + BatchNorm + activation: ``act(batch_norm(torch.cat(inputs, 1)))``.

The oracle for the tests and the fallback when the native module cannot be loaded; same signature and semantics as
:func:`fusedres.ops.dense.dense_batch_norm_act`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fusedres.reference.bn_act import batch_norm_act
from fusedres.validation import (
    BASIC_ACTIVATIONS,
    check_activation,
    check_dense_args,
    check_dense_inputs,
    concat_input_stats,
)

__all__ = ["dense_batch_norm_act"]

def _with_given_stats(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float,
    eps: float,
    activation: str,
    negative_slope: float,
) -> Tensor:
    """Training-mode BN + act of x normalised with the given batch statistics (in the accumulation dtype).

    The given statistics are the batch statistics of x, so the gradient is the training-form one (through the
    statistics): the forward value uses the given mean / var, the derivative that of x's own batch statistics.
    """
    C = x.shape[1]
    numel = x.numel()
    M = numel // C if C else 0
    acc = mean.dtype
    view = [1, C] + [1] * (x.dim() - 2)
    xa = x.to(acc)
    if torch.is_grad_enabled() and x.requires_grad and numel != 0:
        dims = [0, *range(2, x.dim())]
        own_mean, own_var = xa.mean(dims), xa.var(dims, unbiased=False)
        mean = mean + (own_mean - own_mean.detach())  # the given value, x's own derivative (adds exact zeros)
        var = var + (own_var - own_var.detach())
    z = (xa - mean.view(view)) * torch.rsqrt(var + eps).view(view)
    if weight is not None:
        z = z * weight.to(acc).view(view)
    if bias is not None:
        z = z + bias.to(acc).view(view)
    if activation == "relu":
        z = torch.relu(z)
    elif activation == "leaky_relu":
        z = F.leaky_relu(z, negative_slope)
    out = z.to(x.dtype)
    if running_mean is not None and numel != 0:  # after the output exists: a failing call changes nothing
        with torch.no_grad():
            new_mean = (1 - momentum) * running_mean.to(acc) + momentum * mean.detach()
            new_var = (1 - momentum) * running_var.to(acc) + momentum * var.detach() * (M / (M - 1))
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
    return out


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
    """``act(F.batch_norm(torch.cat(inputs, 1), ...))`` in plain PyTorch.

    Args:
        inputs: list of Tensor[N, C_j, *] agreeing in N, spatial size, dtype and device.
        running_mean, running_var: Tensor[C] (C = sum of C_j) or None; updated in place when ``training``.
        weight, bias: Tensor[C] or None.
        training: use batch statistics (and update the running ones) instead of the running statistics.
        momentum: running-statistics update factor.
        eps: added to the variance.
        activation: "relu", "identity" or "leaky_relu".
        negative_slope: slope of leaky_relu for negative values.
        input_stats: training only: per input ``(mean_j, var_j)`` (Tensor[C_j] each, biased variance, accumulation
            dtype), the batch statistics of ``inputs[j]`` computed beforehand (``fusedres.ops.bn_stats``): used to
            normalise and to update the running statistics (unbiased with M = N * spatial) instead of reducing.

    Returns:
        Tensor[N, C, *] of the inputs' dtype.
    """
    inputs = check_dense_inputs(inputs)
    check_activation(activation, BASIC_ACTIVATIONS, "dense_batch_norm_act")
    if momentum is None:
        raise TypeError("momentum must be a float, got None (the DenseBatchNormAct modules handle momentum=None)")
    check_dense_args(inputs, running_mean, running_var, weight, bias, training)
    stats = concat_input_stats(input_stats, inputs, training)
    x = torch.cat(inputs, 1)
    if stats is None:
        return batch_norm_act(
            x,
            running_mean,
            running_var,
            weight,
            bias,
            training,
            momentum,
            eps,
            activation=activation,
            negative_slope=negative_slope,
        )
    return _with_given_stats(
        x, *stats, running_mean, running_var, weight, bias, momentum, eps, activation, negative_slope
    )
