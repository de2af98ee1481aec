"""Pure-PyTorch BatchNorm + residual + activation: the oracle for the tests and the fallback when the native
module cannot be loaded. Same signature and semantics as :func:`fusedres.ops.bn_act.batch_norm_act`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fusedres.validation import check_activation

__all__ = ["batch_norm_act"]

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
) -> Tensor:
    """``act(F.batch_norm(input, ...) + residual)`` in plain PyTorch.

    Args:
        input: Tensor[N, C, *] with 0 to 3 spatial dimensions.
        running_mean, running_var: Tensor[C] or None; updated in place when ``training``.
        weight, bias: Tensor[C] or None.
        training: use batch statistics (and update the running ones) instead of the running statistics.
        momentum: running-statistics update factor.
        eps: added to the variance.
        residual: Tensor[N, C, *] (input's shape) added after the normalisation, or None.
        activation: "relu", "identity", "leaky_relu", "relu6" or "silu".
        negative_slope: slope of leaky_relu for negative values.

    Returns:
        Tensor[N, C, *] of input's dtype.
    """
    check_activation(activation)
    if momentum is None:
        raise TypeError("momentum must be a float, got None (the BatchNormAct modules handle momentum=None)")
    z = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        z = z + residual
    if activation == "relu":
        return torch.relu(z)
    if activation == "leaky_relu":
        return F.leaky_relu(z, negative_slope)
    if activation == "relu6":
        return F.relu6(z)
    if activation == "silu":
        return F.silu(z)
    return z
