"""Pure-PyTorch highway gate: the oracle for the tests and the fallback when the native module cannot be loaded.
Same signatures and semantics as :func:`fusedres.ops.highway.highway` and :func:`fusedres.ops.highway.highway_packed`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedres.validation import check_highway_activation, check_packed_dim

__all__ = ["highway", "highway_packed"]

def _act(h: Tensor, activation: str) -> Tensor:
    if activation == "relu":
        return torch.relu(h)
    if activation == "tanh":
        return torch.tanh(h)
    if activation == "sigmoid":
        return torch.sigmoid(h)
    return h


def highway(
    transform: Tensor, gate: Tensor, carry: Tensor, *, activation: str = "relu", carry_gate: Tensor | None = None
) -> Tensor:
    """``act(transform) * sigmoid(gate) + carry * (1 - sigmoid(gate))``, or with ``carry_gate``
    ``act(transform) * sigmoid(gate) + carry * sigmoid(carry_gate)``, in plain PyTorch.

    Args:
        transform, gate, carry, carry_gate: Tensor[*] of one shape and dtype.
        activation: "relu" (default), "tanh", "sigmoid" or "identity".
    """
    check_highway_activation(activation)
    t = torch.sigmoid(gate)  # stable for any |gate|: exactly 0 / 1 at -inf / +inf
    h = _act(transform, activation)
    if carry_gate is None:
        return h * t + carry * (1 - t)
    return h * t + carry * torch.sigmoid(carry_gate)


def highway_packed(
    projected: Tensor, carry: Tensor, *, activation: str = "relu", dim: int = -1, free_carry: bool = False
) -> Tensor:
    """:func:`highway` on ``projected`` split along ``dim`` into (transform, gate) or, with ``free_carry``,
    (transform, gate, carry_gate) with ``torch.chunk``.

    Args:
        projected: Tensor[..., 2 * F, ...] (3 * F for free_carry), e.g. the output of ``Linear(d, 2 * F)``.
        carry: Tensor of one part's shape (``F`` along ``dim``).
    """
    check_highway_activation(activation)
    check_packed_dim(projected, dim, free_carry)
    parts = torch.chunk(projected, 3 if free_carry else 2, dim=dim)
    return highway(parts[0], parts[1], carry, activation=activation, carry_gate=parts[2] if free_carry else None)
