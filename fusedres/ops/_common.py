"""Helpers shared by the BatchNorm-family ops (ops/bn_act.py, ops/dense.py): fake-kernel checks, the output
geometry the kernels use, the double-backward guard and the once-per-device fallback warning."""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from fusedres import _native
from fusedres.validation import ACTIVATIONS, MASK_ACTIVATIONS, RUNNING_PAIR, check_activation, one_value_per_channel

__all__ = [
    "FLOAT_DTYPES",
    "acc_dtype",
    "check_acc_vector",
    "check_channel_vector",
    "check_input",
    "check_mask",
    "has_mask",
    "mask_bytes",
    "memory_format",
    "refuse_double_backward",
    "warn_fallback",
]

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def mask_bytes(numel: int) -> int:
    """Bytes of the packed activation mask (csrc/common/bn_act_math.h): whole 32-bit words plus a spare one."""
    return ((numel + 31) // 32 + 1) * 4


def has_mask(activation: str) -> bool:
    """Whether the activation's backward reads a 1-bit mask (math::act_has_mask): relu, leaky_relu, relu6.
    identity needs nothing; silu recomputes its pre-activation instead."""
    return activation in MASK_ACTIVATIONS and activation != "identity"


def memory_format(t: Tensor) -> torch.memory_format:
    """The memory format of every full-size tensor the kernels return (the input's suggested one)."""
    return suggest_memory_format(t) if t.dim() in (4, 5) else torch.contiguous_format


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the per-channel statistics: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_channel_vector(
    t: Tensor | None, name: str, input: Tensor, C, channels: str = "the number of channels of input, dim 1"
) -> None:
    """A per-channel parameter or buffer: 1-D with C elements, float32 or the input's dtype, on its device."""
    if t is None:
        return
    torch._check(
        t.dim() == 1 and t.numel() == C,
        lambda: f"{name} must be a 1-D tensor with {C} elements ({channels}), got shape {list(t.shape)}",
    )
    torch._check(
        t.dtype in (torch.float32, input.dtype),
        lambda: f"{name} must have dtype float32 or the input's dtype ({input.dtype}), got {t.dtype}",
    )
    torch._check(
        t.device == input.device,
        lambda: f"{name} must be on the same device as input ({input.device}), got {t.device}",
    )


def check_acc_vector(t: Tensor, name: str, input: Tensor, C, channels: str | None = None) -> None:
    """A per-channel vector of the accumulation dtype on input's device (statistics, sums); ``channels`` says
    what C counts when that is not obvious."""
    acc = acc_dtype(input.dtype)
    what = f" ({channels})" if channels else ""
    torch._check(
        t.dim() == 1 and t.numel() == C and t.dtype == acc and t.device == input.device,
        lambda: (
            f"{name} must be a 1-D {acc} tensor with {C} elements{what} on {input.device}, got {t.dtype} of shape "
            f"{list(t.shape)} on {t.device}"
        ),
    )


def check_mask(mask: Tensor, input: Tensor, activation: str, op: str = "bn_act_forward") -> None:
    """The 1-bit activation mask ``op`` returned for ``input`` (no bytes for activations without one)."""
    want = mask_bytes(input.numel()) if has_mask(activation) else 0
    torch._check(
        mask.dtype == torch.uint8 and mask.dim() == 1 and mask.numel() == want and mask.device == input.device,
        lambda: (
            f"mask must be the uint8 tensor of {want} bytes returned by {op}, got {mask.dtype} of "
            f"shape {list(mask.shape)}"
        ),
    )


def check_input(input: Tensor, name: str = "input") -> None:
    """2 to 5 dimensions and a floating dtype."""
    torch._check(
        2 <= input.dim() <= 5,
        lambda: (
            f"{name} must have 2 to 5 dimensions ((N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W)), got "
            f"{input.dim()} dimensions of shape {list(input.shape)}"
        ),
    )
    torch._check(
        input.dtype in FLOAT_DTYPES,
        lambda: f"{name} must have a floating dtype (float32, float64, bfloat16 or float16), got {input.dtype}",
    )


class _RefuseDoubleBackward(torch.autograd.Function):
    """Identity on already computed gradients whose graph leads back to what they depend on (the forward's
    inputs, weight and grad_out) and whose backward refuses: used only when backward runs with create_graph=True.

    apply(message, num_grads, *grads, *dependencies) -> grads (None entries stay None).
    """

    @staticmethod
    def forward(message: str, num_grads: int, *args: Tensor | None) -> tuple[Tensor | None, ...]:
        return tuple(g.view_as(g) if g is not None else None for g in args[:num_grads])

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.message = inputs[0]

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.message)


def check_batch_args(
    size: list[int],
    numel: int,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> None:
    """The fake kernels' BatchNorm rules (symbolic-safe torch._check, as the C++ host checks raise them): running
    statistics in pairs and required in eval, a positive eps, a finite momentum, more than one value per channel
    when training. ``size``: [N, C, *] of the (concatenated) input, ``numel`` its number of values."""
    torch._check((running_mean is None) == (running_var is None), lambda: RUNNING_PAIR)
    torch._check(
        training or running_mean is not None, lambda: "running_mean and running_var must be given when training=False"
    )
    torch._check(eps > 0 or (eps == 0 and not training), lambda: f"eps must be positive, got {eps}")
    torch._check(math.isfinite(momentum), lambda: f"momentum must be a finite number, got {momentum}")
    if training and numel != 0:
        torch._check_value(numel // size[1] > 1, lambda: one_value_per_channel(f"input size {list(size)}"))


def check_same(t: Tensor, name: str, shape, like: Tensor, like_name: str) -> None:
    """``t`` has ``shape`` and ``like``'s dtype and device; the errors name ``t`` and ``like_name``."""
    torch._check(
        tuple(t.shape) == tuple(shape),
        lambda: f"{name} must have the same shape as {like_name}, got {list(t.shape)} and {list(shape)}",
    )
    torch._check(
        t.dtype == like.dtype,
        lambda: f"{name} must have the same dtype as {like_name} ({like.dtype}), got {t.dtype}",
    )
    torch._check(
        t.device == like.device,
        lambda: f"{name} must be on the same device as {like_name} ({like.device}), got {t.device}",
    )


def check_functional_args(
    input: object,
    residual: object,
    activation: str,
    momentum: object,
    momentum_none_hint: str,
    activations: tuple[str, ...] = ACTIVATIONS,
    op: str | None = None,
) -> None:
    """The public BatchNorm functionals' first checks: tensor types, the activation name, a float momentum.

    ``momentum_none_hint`` names what handles ``momentum=None`` (the modules do, the functionals do not);
    ``activations`` / ``op``: the activations the calling op supports and its name for the error.
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
    if residual is not None and not isinstance(residual, Tensor):
        raise TypeError(f"residual must be a Tensor or None, got {type(residual).__name__}")
    check_activation(activation, activations, op)
    if momentum is None:
        raise TypeError(f"momentum must be a float, got None ({momentum_none_hint})")


def refuse_double_backward(
    message: str, grads: tuple[Tensor | None, ...], dependencies: tuple[Tensor | None, ...]
) -> tuple[Tensor | None, ...]:
    """``grads`` unchanged, but differentiating them again raises RuntimeError(message).

    Call it from an autograd.Function's backward when ``torch.is_grad_enabled()`` (create_graph=True);
    ``dependencies`` are the tensors the gradients are functions of (so the refusal sits on their graph).
    """
    return _RefuseDoubleBackward.apply(message, len(grads), *grads, *dependencies)


def warn_fallback(op: str, device_type: str, warned: set[str]) -> None:
    """Warns once per device type (recorded in ``warned``) that ``op`` runs the pure PyTorch reference."""
    if device_type not in warned and _native.native_loaded:
        warned.add(device_type)
        warnings.warn(
            f"{op}: the native module has no kernel for {device_type} tensors (cuda_compiled="
            f"{_native.info()['cuda_compiled']}); using the pure PyTorch reference",
            RuntimeWarning,
            stacklevel=3,
        )
