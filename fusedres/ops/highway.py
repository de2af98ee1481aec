"""Highway gate: fake kernels, autograd and the public functionals.

The kernels are ``torch.ops.fusedres.highway_forward`` / ``highway_backward`` and the packed forms
``highway_packed_forward`` / ``highway_packed_backward`` (schemas in csrc/fusedres.cpp, math in
csrc/common/highway_math.h). Autograd saves only the inputs (transform, gate, carry, carry_gate / projected,
carry); the backward recomputes the sigmoid and the activation from them in the same pass that writes the
gradients. In eager mode the functionals call ``torch.ops.fusedres.highway`` / ``highway_packed``, whose autograd
nodes are C++ (csrc/highway_autograd.cpp); under torch.compile they call the Python Functions below, which Dynamo
traces. Both call the same ops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from fusedres import _native
from fusedres.ops._common import check_same, refuse_double_backward, warn_fallback
from fusedres.validation import check_highway_activation, check_packed_dim
from fusedres.reference.highway import highway as _reference_highway
from fusedres.reference.highway import highway_packed as _reference_highway_packed

__all__ = ["highway", "highway_packed"]

_FORWARD = "fusedres::highway_forward"
_BACKWARD = "fusedres::highway_backward"
_PACKED_FORWARD = "fusedres::highway_packed_forward"
_PACKED_BACKWARD = "fusedres::highway_packed_backward"
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
DOUBLE_BACKWARD_ERROR = "fusedres.highway does not support double backward"


def _memory_format(t: Tensor) -> torch.memory_format:
    """The memory format of every tensor the kernels return (``t``'s suggested one, as in csrc/highway_host.cpp)."""
    return suggest_memory_format(t) if t.dim() in (4, 5) else torch.contiguous_format


def _empty(shape: Sequence[int], like: Tensor, fmt: torch.memory_format) -> Tensor:
    return torch.empty(tuple(shape), dtype=like.dtype, device=like.device, memory_format=fmt)


def _check_highway(transform: Tensor, gate: Tensor, carry: Tensor, carry_gate: Tensor | None) -> None:
    torch._check(
        transform.dtype in _FLOAT_DTYPES,
        lambda: f"transform must have a floating dtype (float32, float64, bfloat16 or float16), got {transform.dtype}",
    )
    check_same(gate, "gate", transform.shape, transform, "transform")
    check_same(carry, "carry", transform.shape, transform, "transform")
    if carry_gate is not None:
        check_same(carry_gate, "carry_gate", transform.shape, transform, "transform")


def _part_shape(projected: Tensor, dim: int, free_carry: bool) -> list[int]:
    shape = list(projected.shape)
    shape[dim] = shape[dim] // (3 if free_carry else 2)
    return shape


def _check_packed(projected: Tensor, carry: Tensor, dim: int, free_carry: bool) -> tuple[int, list[int]]:
    torch._check(
        projected.dtype in _FLOAT_DTYPES,
        lambda: f"projected must have a floating dtype (float32, float64, bfloat16 or float16), got {projected.dtype}",
    )
    d = check_packed_dim(projected, dim, free_carry)
    part = _part_shape(projected, d, free_carry)
    check_same(carry, "carry", part, projected, "one part of projected")
    return d, part


def _fake_forward(transform: Tensor, gate: Tensor, carry: Tensor, carry_gate: Tensor | None, activation: str) -> Tensor:
    check_highway_activation(activation)
    _check_highway(transform, gate, carry, carry_gate)
    return _empty(transform.shape, transform, _memory_format(transform))


def _fake_backward(
    grad_out: Tensor,
    transform: Tensor,
    gate: Tensor,
    carry: Tensor,
    carry_gate: Tensor | None,
    activation: str,
    output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    check_highway_activation(activation)
    _check_highway(transform, gate, carry, carry_gate)
    check_same(grad_out, "grad_out", transform.shape, transform, "transform")
    fmt = _memory_format(transform)
    wanted = list(output_mask[:3]) + [output_mask[3] and carry_gate is not None]
    return tuple(_empty(transform.shape, transform, fmt) if w else transform.new_empty((0,)) for w in wanted)


def _fake_packed_forward(projected: Tensor, carry: Tensor, dim: int, free_carry: bool, activation: str) -> Tensor:
    check_highway_activation(activation)
    _, part = _check_packed(projected, carry, dim, free_carry)
    return _empty(part, projected, _memory_format(projected))


def _fake_packed_backward(
    grad_out: Tensor,
    projected: Tensor,
    carry: Tensor,
    dim: int,
    free_carry: bool,
    activation: str,
    output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor]:
    check_highway_activation(activation)
    _, part = _check_packed(projected, carry, dim, free_carry)
    check_same(grad_out, "grad_out", part, projected, "one part of projected")
    fmt = _memory_format(projected)
    grad_projected = _empty(projected.shape, projected, fmt) if output_mask[0] else projected.new_empty((0,))
    grad_carry = _empty(part, projected, fmt) if output_mask[1] else projected.new_empty((0,))
    return grad_projected, grad_carry


class _HighwayFunction(torch.autograd.Function):
    @staticmethod
    def forward(transform, gate, carry, carry_gate, activation):
        return torch.ops.fusedres.highway_forward(transform, gate, carry, carry_gate, activation)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        transform, gate, carry, carry_gate, activation = inputs
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(transform, gate, carry, carry_gate)
        ctx.activation = activation

    @staticmethod
    def backward(ctx, grad_out):
        transform, gate, carry, carry_gate = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:4])
        needs[3] = needs[3] and carry_gate is not None
        if grad_out is None or not any(needs):
            return (None,) * 5
        with torch.no_grad():
            grads = torch.ops.fusedres.highway_backward(
                grad_out, transform, gate, carry, carry_gate, ctx.activation, needs
            )
        grads = tuple(g if w else None for g, w in zip(grads, needs))
        if torch.is_grad_enabled():  # create_graph=True: make a second differentiation fail loudly.
            grads = refuse_double_backward(DOUBLE_BACKWARD_ERROR, grads, (transform, gate, carry, carry_gate, grad_out))
        return (*grads, None)


class _HighwayPackedFunction(torch.autograd.Function):
    @staticmethod
    def forward(projected, carry, dim, free_carry, activation):
        return torch.ops.fusedres.highway_packed_forward(projected, carry, dim, free_carry, activation)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        projected, carry, dim, free_carry, activation = inputs
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(projected, carry)
        ctx.dim, ctx.free_carry, ctx.activation = dim, free_carry, activation

    @staticmethod
    def backward(ctx, grad_out):
        projected, carry = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:2])
        if grad_out is None or not any(needs):
            return (None,) * 5
        with torch.no_grad():
            grads = torch.ops.fusedres.highway_packed_backward(
                grad_out, projected, carry, ctx.dim, ctx.free_carry, ctx.activation, needs
            )
        grads = tuple(g if w else None for g, w in zip(grads, needs))
        if torch.is_grad_enabled():
            grads = refuse_double_backward(DOUBLE_BACKWARD_ERROR, grads, (projected, carry, grad_out))
        return (*grads, None, None, None)


if _native.native_loaded:
    torch.library.register_fake(_FORWARD)(_fake_forward)
    torch.library.register_fake(_BACKWARD)(_fake_backward)
    torch.library.register_fake(_PACKED_FORWARD)(_fake_packed_forward)
    torch.library.register_fake(_PACKED_BACKWARD)(_fake_packed_backward)
    torch.library.register_fake("fusedres::highway")(_fake_forward)
    torch.library.register_fake("fusedres::highway_packed")(_fake_packed_forward)

# Device types the native kernels serve; anything else runs the reference (one warning per device type).
_NATIVE_DEVICE_TYPES = frozenset(d for d in ("cpu", "cuda", "meta") if _native.has_kernel(d, op=_FORWARD))
_warned_devices: set[str] = set()


def _check_tensor(t: object, name: str, optional: bool = False) -> None:
    if optional and t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor{' or None' if optional else ''}, got {type(t).__name__}")


def highway(
    transform: Tensor, gate: Tensor, carry: Tensor, *, activation: str = "relu", carry_gate: Tensor | None = None
) -> Tensor:
    """Fused highway gate.

    Coupled form (default): ``T = sigmoid(gate)``, ``y = act(transform) * T + carry * (1 - T)``.
    Free carry form (``carry_gate`` given): ``y = act(transform) * sigmoid(gate) + carry * sigmoid(carry_gate)``.
    The sigmoid is the numerically stable one (no overflow for large ``|gate|``, exact 0 / 1 at -inf / +inf).
    Backward saves only the inputs and recomputes the rest in one pass; double backward is refused.

    Args:
        transform: Tensor[*]; float32, float64, bfloat16 or float16, any memory format.
        gate, carry, carry_gate: Tensor[*] with transform's shape, dtype and device.
        activation: "relu" (default), "tanh", "sigmoid" or "identity", applied to ``transform``.

    Returns:
        Tensor[*]: transform's dtype, dense in transform's suggested memory format.
    """
    _check_tensor(transform, "transform")
    _check_tensor(gate, "gate")
    _check_tensor(carry, "carry")
    _check_tensor(carry_gate, "carry_gate", optional=True)
    check_highway_activation(activation)
    if transform.device.type not in _NATIVE_DEVICE_TYPES:
        warn_fallback("fusedres.highway", transform.device.type, _warned_devices)
        return _reference_highway(transform, gate, carry, activation=activation, carry_gate=carry_gate)
    args = (transform, gate, carry, carry_gate, activation)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:4]):
        if torch.compiler.is_compiling():  # traced: the Python Function, whose ops Dynamo / AOTAutograd compile
            return _HighwayFunction.apply(*args)
        return torch.ops.fusedres.highway(*args)  # eager: the same ops under a C++ autograd node
    return torch.ops.fusedres.highway_forward(*args)


def highway_packed(
    projected: Tensor, carry: Tensor, *, activation: str = "relu", dim: int = -1, free_carry: bool = False
) -> Tensor:
    """Fused highway gate on a packed projection, read in place (no split copy of the parts).

    ``projected`` is ``[transform, gate]`` (``free_carry``: ``[transform, gate, carry_gate]``) concatenated along
    ``dim``, e.g. the output of one ``Linear(d, 2 * F)`` (``dim=-1``) or one conv to ``2 * C`` channels
    (``dim=1``): the transform part comes first. Same result as ``highway(*projected.chunk(2, dim), carry)``.

    Args:
        projected: Tensor[..., 2 * F, ...] (3 * F for free_carry) along ``dim``; float32, float64, bfloat16, float16.
        carry: Tensor of one part's shape (F along ``dim``), projected's dtype and device.
        activation: "relu" (default), "tanh", "sigmoid" or "identity".
        dim: the packed dimension (negative counts from the end).
        free_carry: the third part is a carry-gate logit (free carry form) instead of the coupled ``1 - T``.

    Returns:
        Tensor of carry's shape, dense in projected's suggested memory format.
    """
    _check_tensor(projected, "projected")
    _check_tensor(carry, "carry")
    check_highway_activation(activation)
    if not isinstance(free_carry, bool):
        raise TypeError(f"free_carry must be a bool, got {type(free_carry).__name__}")
    d = check_packed_dim(projected, dim, free_carry)
    if projected.device.type not in _NATIVE_DEVICE_TYPES:
        warn_fallback("fusedres.highway", projected.device.type, _warned_devices)
        return _reference_highway_packed(projected, carry, activation=activation, dim=d, free_carry=free_carry)
    args = (projected, carry, d, free_carry, activation)
    if torch.is_grad_enabled() and (projected.requires_grad or carry.requires_grad):
        if torch.compiler.is_compiling():
            return _HighwayPackedFunction.apply(*args)
        return torch.ops.fusedres.highway_packed(*args)
    return torch.ops.fusedres.highway_packed_forward(*args)
