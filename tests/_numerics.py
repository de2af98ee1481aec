"""Shared by the property, large-mean and every-model tests: tensors in a chosen storage, error measures, the
2x-PyTorch rule, and the mask of ambiguous activation branches.

The rule (CONVENTIONS.md): the oracle is plain PyTorch in float64 on the same rounded inputs; our error may be at
most twice PyTorch's own error in the same dtype, plus a small floor of a few units of rounding of the result's dtype
times the size of the terms the result is made of (PyTorch can be exact by luck, e.g. on tiny reductions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

HALF = (torch.bfloat16, torch.float16)
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Units of rounding of the floor: float64 has no higher-precision oracle, so the floor is its whole allowance
# (different summation orders differ by a few ulps of the sum of |terms|).
FLOOR_ULPS = {torch.float64: 64.0, torch.float32: 8.0, torch.bfloat16: 1.0, torch.float16: 1.0}


def storage_layouts(ndim: int) -> list[str]:
    """The storages a tensor of ``ndim`` dimensions can be given in (see :func:`arrange`)."""
    out = ["contiguous", "permuted", "sliced"]
    if ndim in (4, 5):
        out.append("channels_last")
    return out


def arrange(values: Tensor, dtype: torch.dtype, layout: str, perm_seed: int = 0) -> Tensor:
    """``values`` rounded to ``dtype`` and stored as ``layout``, as a leaf tensor (no autograd history).

    Layouts: "contiguous"; "channels_last" (4-D / 5-D); "permuted" (dense, stored in a shuffled dimension order
    chosen by ``perm_seed``); "sliced" (not dense: every other element of the last dimension of a larger buffer,
    at an odd offset so the data is also misaligned).
    """
    t = values.to(dtype)
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
        return t.contiguous(memory_format=fmt)
    if layout == "permuted":
        g = torch.Generator().manual_seed(perm_seed)
        perm = torch.randperm(t.dim(), generator=g).tolist()
        inverse = [perm.index(i) for i in range(t.dim())]
        return t.permute(perm).contiguous().permute(inverse)
    if layout == "sliced":
        if t.dim() == 0:
            return t.clone()
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=dtype)
        out = big[..., 1::2]
        out.copy_(t)
        return out
    raise ValueError(f"unknown layout {layout!r}")


def max_abs(t: Tensor | None) -> float:
    return 0.0 if t is None or t.numel() == 0 else t.detach().double().abs().max().item()


def max_err(got: Tensor, ref: Tensor) -> float:
    """max |got - ref| in float64 (0 for empty tensors)."""
    if ref.numel() == 0:
        return 0.0
    return (got.detach().double() - ref.detach().double()).abs().max().item()


def floor_for(dtype: torch.dtype, scale: float) -> float:
    return FLOOR_ULPS[dtype] * torch.finfo(dtype).eps * scale


def assert_2x(
    name: str,
    got: Tensor | None,
    ref64: Tensor | None,
    same: Tensor | None,
    scale: float,
    dtype: torch.dtype,
    extra: float = 0.0,
) -> None:
    """``got`` (ours) within 2x ``same`` (PyTorch, same dtype) of ``ref64`` (float64 oracle) plus the floor.

    Args:
        name: what is compared (in the message).
        got, ref64, same: the same quantity from the fused op, the float64 oracle and PyTorch in the same dtype.
        scale: size of the terms the quantity is made of (the floor is a few units of rounding of it).
        dtype: the dtype whose rounding the floor is expressed in (the result's).
        extra: an absolute allowance added to the floor (see :func:`fold_allowance`).
    """
    if ref64 is None:
        assert got is None, f"{name}: expected no result, got a tensor"
        return
    assert got is not None, f"{name}: missing result"
    assert tuple(got.shape) == tuple(ref64.shape), f"{name}: shape {list(got.shape)} != {list(ref64.shape)}"
    finite = torch.isfinite(ref64)
    assert torch.equal(torch.isfinite(got), finite), f"{name}: non-finite values where the float64 oracle has none"
    if not finite.all():
        got, ref64, same = got[finite], ref64[finite], same[finite] if same is not None else None
    err = max_err(got, ref64)
    torch_err = max_err(same, ref64) if same is not None else 0.0
    floor = floor_for(dtype, scale) + extra
    assert err <= 2.0 * torch_err + floor, (
        f"{name}: error {err:.3g} > 2 x PyTorch's {dtype} error {torch_err:.3g} + floor {floor:.3g} (scale {scale:.3g})"
    )


def fold_allowance(x: Tensor, invstd: Tensor, weight: Tensor | None, dtype: torch.dtype) -> float:
    """One unit of rounding of the largest ``x * invstd * |w|``: PyTorch's CPU BatchNorm itself normalises as
    ``x * alpha + beta`` (alpha = invstd * w, beta = b - mean * alpha), so a kernel that computes the same with a
    fused multiply-add differs from it by the rounding of that product (visible when x - mean ~ 0, e.g. a constant
    channel). Rounding in float32 for reduced-precision inputs (the kernels compute in float)."""
    if x.numel() == 0:
        return 0.0
    nd = x.dim()
    w = channel_view(weight.double().abs(), nd) if weight is not None else 1.0
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.finfo(compute).eps * max_abs(x.double() * channel_view(invstd.double(), nd) * w)


def ratio_2x(got: Tensor, ref64: Tensor, same: Tensor, scale: float, dtype: torch.dtype) -> tuple[float, float]:
    """(our error, PyTorch's same-dtype error) against the float64 oracle, for reports."""
    return max_err(got, ref64), max_err(same, ref64)


def channel_view(v: Tensor, ndim: int) -> Tensor:
    """A per-channel Tensor[C] shaped to broadcast against Tensor[N, C, *] of ``ndim`` dimensions."""
    return v.reshape([1, -1] + [1] * (ndim - 2))


def reduce_dims(ndim: int) -> list[int]:
    return [0] + list(range(2, ndim))


def ambiguous_branch(
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    dtype: torch.dtype,
    ulps: float = 8.0,
    kinks: Sequence[float] = (0.0,),
) -> Tensor:
    """Where the side of a kink of the activation (``kinks``: 0 for relu / leaky_relu, 0 and 6 for relu6) the
    pre-activation ``z = (x - mean) * invstd * w + b + r`` lies on is not decided at ``dtype``'s rounding: |z - k|
    within ``ulps`` units of rounding of the terms z is computed from (all float64).

    The error of a float pre-activation scales with |x| and |mean| (not only |x - mean|) times invstd * |w|, so
    inputs with a large mean have a wider band. Upstream gradients are zeroed there so that the gradients do
    not depend on a branch any implementation may take either way.
    """
    nd = x.dim()
    w = channel_view(weight.double(), nd) if weight is not None else torch.ones((), dtype=torch.float64)
    b = channel_view(bias.double(), nd) if bias is not None else torch.zeros((), dtype=torch.float64)
    m, s = channel_view(mean.double(), nd), channel_view(invstd.double(), nd)
    x = x.double()
    z = (x - m) * s * w + b
    terms = ((x - m).abs() + x.abs() + m.abs()) * s * w.abs() + b.abs()
    if residual is not None:
        z = z + residual.double()
        terms = terms + residual.double().abs()
    out = torch.zeros_like(z, dtype=torch.bool)
    for k in kinks:
        out |= (z - k).abs() <= ulps * torch.finfo(dtype).eps * (terms + abs(k))
    return out


def activation_kinks(activation: str) -> tuple[float, ...]:
    """The pre-activation values where the activation's derivative jumps (none for identity and silu)."""
    return {"relu": (0.0,), "leaky_relu": (0.0,), "relu6": (0.0, 6.0)}.get(activation, ())


def values(shape: Sequence[int], gen: torch.Generator, scale: float = 1.0, offset: float | Tensor = 0.0) -> Tensor:
    """float64 normal values ``* scale + offset`` (offset may be a per-channel Tensor[C])."""
    out = torch.randn(tuple(shape), generator=gen, dtype=torch.float64) * scale
    if isinstance(offset, Tensor):
        return out + channel_view(offset, len(shape))
    return out + offset


def is_power_of_ten(v: float) -> bool:
    return v > 0 and abs(math.log10(v) - round(math.log10(v))) < 1e-12
