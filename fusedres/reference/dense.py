"""Pure-PyTorch dense concatenation + BatchNorm + activation: ``act(batch_norm(torch.cat(inputs, 1)))``.

The oracle for the tests and the fallback when the native module cannot be loaded; same signature and semantics as
:func:`fusedres.ops.dense.dense_batch_norm_act`. Also holds the argument validation both share.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fusedres.reference.bn_act import BASIC_ACTIVATIONS, batch_norm_act, check_activation

__all__ = ["check_dense_args", "check_dense_inputs", "concat_input_stats", "dense_batch_norm_act"]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_dense_inputs(inputs: object) -> list[Tensor]:
    """Validates the list of feature maps and returns it as a list.

    They must be Tensors of 2 to 5 dimensions that agree in batch size, spatial size, dtype and device (they may
    differ in channels, dim 1). Errors name the offending input by its index.
    """
    if isinstance(inputs, Tensor) or not isinstance(inputs, Sequence):
        raise TypeError(f"inputs must be a list or tuple of Tensors, got {type(inputs).__name__}")
    inputs = list(inputs)
    if not inputs:
        raise ValueError("inputs must be a non-empty list of Tensors, got an empty list")
    for j, x in enumerate(inputs):
        if not isinstance(x, Tensor):
            raise TypeError(f"inputs[{j}] must be a Tensor, got {type(x).__name__}")
    x0 = inputs[0]
    if not 2 <= x0.dim() <= 5:
        raise ValueError(
            "inputs[0] must have 2 to 5 dimensions ((N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W)), got "
            f"{x0.dim()} dimensions of shape {list(x0.shape)}"
        )
    if x0.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"inputs must have a floating dtype (float32, float64, bfloat16 or float16), got {x0.dtype}")
    for j, x in enumerate(inputs[1:], 1):
        if x.dim() != x0.dim() or x.shape[0] != x0.shape[0] or x.shape[2:] != x0.shape[2:]:
            # Built only on failure: str() of a symbolic size would break a torch.compile graph on every call.
            expected = "[" + ", ".join([str(x0.shape[0]), "*", *map(str, x0.shape[2:])]) + "]"
            raise ValueError(
                f"inputs[{j}] must have the batch size and spatial size of inputs[0] (shape {expected}; only the "
                f"channels, dim 1, may differ), got shape {list(x.shape)}"
            )
        if x.dtype != x0.dtype:
            raise ValueError(f"inputs[{j}] must have the dtype of inputs[0] ({x0.dtype}), got {x.dtype}")
        if x.device != x0.device:
            raise ValueError(f"inputs[{j}] must be on the device of inputs[0] ({x0.device}), got {x.device}")
    return inputs


def concat_input_stats(input_stats: object, inputs: Sequence[Tensor], training: bool) -> tuple[Tensor, Tensor] | None:
    """Validates per-input statistics and concatenates them into the batch (mean, biased var) of the concatenation.

    Args:
        input_stats: None, or one ``(mean_j, var_j)`` pair per input: Tensor[C_j] each, in the accumulation dtype
            (float64 for float64 inputs, else float32) on the inputs' device, as ``fusedres.ops.bn_stats`` returns.
        inputs: the validated inputs.
        training: precomputed statistics are batch statistics: only valid when training.

    Returns:
        None when input_stats is None, else (Tensor[C], Tensor[C]) with C = sum of the inputs' channels.
    """
    if input_stats is None:
        return None
    if not training:
        raise ValueError(
            "input_stats (precomputed batch statistics) can only be given when training=True: eval mode normalises "
            "with running_mean / running_var"
        )
    if isinstance(input_stats, Tensor) or not isinstance(input_stats, Sequence):
        raise TypeError(f"input_stats must be a list of (mean, var) pairs, got {type(input_stats).__name__}")
    if len(input_stats) != len(inputs):
        raise ValueError(
            f"input_stats must have one (mean, var) pair per input ({len(inputs)}), got {len(input_stats)}"
        )
    dtype, device = inputs[0].dtype, inputs[0].device
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    means, variances = [], []
    for j, pair in enumerate(input_stats):
        if isinstance(pair, Tensor) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise TypeError(f"input_stats[{j}] must be a (mean, var) pair of Tensors, got {type(pair).__name__}")
        C_j = inputs[j].shape[1]
        for k, what in enumerate(("mean", "var")):
            t = pair[k]
            name = f"input_stats[{j}][{k}] ({what} of inputs[{j}])"
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
            if t.dim() != 1 or t.shape[0] != C_j:
                raise ValueError(
                    f"{name} must be a 1-D tensor with {C_j} elements (the channels of inputs[{j}]), got shape "
                    f"{list(t.shape)}"
                )
            if t.dtype != acc:
                raise ValueError(
                    f"{name} must have dtype {acc} (the statistics dtype of {dtype} inputs, as "
                    f"fusedres.ops.bn_stats returns), got {t.dtype}"
                )
            if t.device != device:
                raise ValueError(f"{name} must be on the device of the inputs ({device}), got {t.device}")
        means.append(pair[0])
        variances.append(pair[1])
    return torch.cat(means), torch.cat(variances)


def check_dense_args(
    inputs: Sequence[Tensor],
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
) -> None:
    """The per-channel vectors have C = sum of the inputs' channels, the running statistics come in pairs and
    training has more than one value per channel (F.batch_norm's rule, for the concatenation)."""
    C = sum(x.shape[1] for x in inputs)
    for t, name in ((weight, "weight"), (bias, "bias"), (running_mean, "running_mean"), (running_var, "running_var")):
        if t is not None and (not isinstance(t, Tensor) or t.dim() != 1 or t.numel() != C):
            got = f"shape {list(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 1-D tensor with {C} elements (the channels of all inputs), got {got}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (both or neither)")
    x0 = inputs[0]
    numel = x0.shape[0] * C * math.prod(x0.shape[2:])
    if training and numel != 0 and numel // C <= 1:
        size = [x0.shape[0], C, *x0.shape[2:]]
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


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
