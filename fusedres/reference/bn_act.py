"""Pure-PyTorch BatchNorm + residual + activation: the oracle for the tests and the fallback when the native
module cannot be loaded. Same signature and semantics as :func:`fusedres.ops.bn_act.batch_norm_act`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fusedres.validation import check_activation

__all__ = ["batch_norm_act"]


class _ScaleBranch(torch.autograd.Function):
    """``scale * z`` whose backward scales z's gradient by ``backward_scale`` instead (Shake-Shake's beta).

    The gradient of ``scale`` itself is the true one, sum(grad * z) over what it broadcasts to.
    """

    @staticmethod
    def forward(z: Tensor, scale: Tensor, backward_scale: Tensor) -> Tensor:
        return z * scale

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        z, scale, backward_scale = inputs
        ctx.save_for_backward(z, scale, backward_scale)

    @staticmethod
    def backward(ctx, grad):
        z, scale, backward_scale = ctx.saved_tensors
        grad_z = grad * backward_scale if ctx.needs_input_grad[0] else None
        grad_scale = None
        if ctx.needs_input_grad[1]:
            grad_scale = (grad * z).sum_to_size(scale.shape)
        return grad_z, grad_scale, None


def _per_sample(t: Tensor, name: str, input: Tensor) -> Tensor:
    """``t`` ((N,) or (N, C)) viewed to broadcast over input [N, C, *]."""
    n, c = input.shape[0], input.shape[1]
    if t.dim() == 1 and t.shape[0] == n:
        return t.reshape((n,) + (1,) * (input.dim() - 1))
    if t.dim() == 2 and tuple(t.shape) == (n, c):
        return t.reshape((n, c) + (1,) * (input.dim() - 2))
    raise ValueError(f"{name} must have shape (N,) = ({n},) or (N, C) = ({n}, {c}), got {tuple(t.shape)}")


def _pad_channels(residual: Tensor, input: Tensor) -> Tensor:
    """residual [N, Cr, *] with Cr <= C zero-padded to input's C channels (PyramidNet's shortcut)."""
    c, cr = input.shape[1], residual.shape[1]
    if residual.dim() != input.dim() or residual.shape[0] != input.shape[0] or residual.shape[2:] != input.shape[2:]:
        raise ValueError(
            f"residual must have input's shape {tuple(input.shape)} except for fewer channels, "
            f"got {tuple(residual.shape)}"
        )
    if cr > c:
        raise ValueError(f"residual must have at most input's {c} channels, got {cr}")
    if cr == c:
        return residual
    return F.pad(residual, [0, 0] * (input.dim() - 2) + [0, c - cr])

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
    """``act(scale * F.batch_norm(input, ...) + residual)`` in plain PyTorch.

    Args:
        input: Tensor[N, C, *] with 0 to 3 spatial dimensions.
        running_mean, running_var: Tensor[C] or None; updated in place when ``training``.
        weight, bias: Tensor[C] or None.
        training: use batch statistics (and update the running ones) instead of the running statistics.
        momentum: running-statistics update factor.
        eps: added to the variance.
        residual: Tensor[N, Cr, *] (input's shape, Cr <= C channels: the missing ones are zeros) added after the
            normalisation, or None.
        activation: "relu", "identity", "leaky_relu", "relu6" or "silu".
        negative_slope: slope of leaky_relu for negative values.
        scale: Tensor (N,) or (N, C) multiplying the normalised input before the residual is added, or None.
        backward_scale: Tensor of scale's shape used instead of scale for the gradients of input, weight and bias
            (Shake-Shake's beta), or None. scale's own gradient is always sum(grad * batch_norm(input)).

    Returns:
        Tensor[N, C, *] of input's dtype.
    """
    check_activation(activation)
    if momentum is None:
        raise TypeError("momentum must be a float, got None (the BatchNormAct modules handle momentum=None)")
    if backward_scale is not None and scale is None:
        raise ValueError("backward_scale needs scale (the forward's scale), got scale=None")
    s = _per_sample(scale, "scale", input) if scale is not None else None
    bs = _per_sample(backward_scale, "backward_scale", input) if backward_scale is not None else None
    if bs is not None and bs.shape != s.shape:
        raise ValueError(
            f"backward_scale must have scale's shape {tuple(scale.shape)}, got {tuple(backward_scale.shape)}"
        )
    if residual is not None:
        residual = _pad_channels(residual, input)
    z = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if s is not None:
        z = _ScaleBranch.apply(z, s, bs) if bs is not None else z * s
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
