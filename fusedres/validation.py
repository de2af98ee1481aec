"""Argument rules shared by the fused ops, the modules and the pure-PyTorch references: each rule (allowed
activation names, the dense op's inputs and per-channel vectors, the highway packed dim) is written once, here, so
the references (the test oracle) and the fused ops (what the oracle judges) both use it without importing each
other. Every check names the argument and what was expected."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "ACTIVATIONS",
    "RUNNING_PAIR",
    "BASIC_ACTIVATIONS",
    "HIGHWAY_ACTIVATIONS",
    "MASK_ACTIVATIONS",
    "check_activation",
    "check_dense_args",
    "check_dense_inputs",
    "check_highway_activation",
    "check_packed_dim",
    "concat_input_stats",
    "one_value_per_channel",
]

# Every activation of batch_norm_act. relu, leaky_relu and relu6 keep a 1-bit mask for backward; silu recomputes
# its pre-activation instead (docs/design.md section 1).
ACTIVATIONS = ("relu", "identity", "leaky_relu", "relu6", "silu")
# The activations of the ops whose backward cannot recompute the pre-activation (synchronised BatchNorm and the
# building blocks bn_act_backward_reduce / bn_act_backward_elemt, which take no bias and residual).
MASK_ACTIVATIONS = ("relu", "identity", "leaky_relu", "relu6")
# The activations of the dense op (dense_batch_norm_act): its kernels implement these only.
BASIC_ACTIVATIONS = ("relu", "identity", "leaky_relu")


# The BatchNorm rules every op states in its own words nowhere else: the text of the error, once (the eager checks
# raise it as ValueError, the fake kernels through torch._check, the C++ host checks as RuntimeError / ValueError).
RUNNING_PAIR = "running_mean and running_var must be given together (both or neither)"


def one_value_per_channel(size: object) -> str:
    """F.batch_norm's training rule, violated: ``size`` is what the caller got (an input size or a description)."""
    return f"Expected more than 1 value per channel when training, got {size}"


def check_activation(activation: object, allowed: tuple[str, ...] = ACTIVATIONS, op: str | None = None) -> str:
    """Validates an activation name (the part of the op's arguments the user spells out).

    ``allowed``: the names the calling op supports; ``op``: its name, said in the error when given.
    """
    names = ", ".join(map(repr, allowed))
    where = f" for {op}" if op else ""
    if not isinstance(activation, str):
        raise TypeError(f"activation must be a str, one of {names}{where}, got {type(activation).__name__}")
    if activation not in allowed:
        raise ValueError(f"activation must be one of {names}{where}, got {activation!r}")
    return activation


HIGHWAY_ACTIVATIONS = ("relu", "tanh", "sigmoid", "identity")


def check_highway_activation(activation: object) -> str:
    """Validates a highway activation name."""
    names = ", ".join(map(repr, HIGHWAY_ACTIVATIONS))
    if not isinstance(activation, str):
        raise TypeError(f"activation must be a str, one of {names}, got {type(activation).__name__}")
    if activation not in HIGHWAY_ACTIVATIONS:
        raise ValueError(f"activation must be one of {names}, got {activation!r}")
    return activation


def check_packed_dim(projected: Tensor, dim: object, free_carry: bool) -> int:
    """Validates ``dim`` of the packed form and returns it wrapped to ``[0, projected.dim())``."""
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    nd = projected.dim()
    if nd == 0:
        raise ValueError("projected must have at least one dimension, got a 0-dimensional tensor")
    if not -nd <= dim < nd:
        raise ValueError(f"dim must be in [{-nd}, {nd - 1}] for projected of shape {list(projected.shape)}, got {dim}")
    d = dim % nd
    parts = 3 if free_carry else 2
    if projected.shape[d] % parts != 0:
        what = (
            "divisible by 3 (3 * features: transform, gate, carry_gate)"
            if free_carry
            else "even (2 * features: transform, gate)"
        )
        raise ValueError(
            f"projected.size(dim) must be {what}, got projected of shape {list(projected.shape)} and dim={dim}"
        )
    return d


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
        raise ValueError(RUNNING_PAIR)
    x0 = inputs[0]
    numel = x0.shape[0] * C * math.prod(x0.shape[2:])
    if training and numel != 0 and numel // C <= 1:
        size = [x0.shape[0], C, *x0.shape[2:]]
        raise ValueError(one_value_per_channel(f"input size {size}"))
