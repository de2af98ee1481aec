"""The building blocks of bn_act: torch.ops.fusedres.bn_stats / bn_act_elemt / bn_act_backward_reduce /
bn_act_backward_elemt (and the functional fusedres.ops.bn_stats).

Oracles: float64 torch math for the statistics; the single-call ops (bn_act_forward / bn_act_backward, themselves
tested against the reference in test_bn_act.py) for the compositions, which must agree to rounding.
"""

from __future__ import annotations

import pytest
import torch

import fusedres  # noqa: F401  (registers the fake kernels)
from fusedres.ops import bn_stats

ops = torch.ops.fusedres
ACTIVATIONS = ("relu", "identity", "leaky_relu")
SLOPE = 0.1


def arrange(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
    return t.contiguous()


def tol(dtype):
    return {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-5}


STATS_CASES = [
    (shape, layout)
    for shape in [(4, 5, 3, 7), (2, 37, 9, 11), (6, 3), (3, 4, 10), (2, 3, 2, 3, 4)]
    for layout in (["contiguous", "channels_last"] if len(shape) >= 4 else ["contiguous"])
]


@pytest.mark.parametrize(("shape", "layout"), STATS_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bn_stats_matches_float64(shape, layout, dtype):
    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 2
    x = arrange(x64.to(dtype), layout)
    mean, var = ops.bn_stats(x)
    flat = x.to(torch.float64).transpose(0, 1).reshape(shape[1], -1)
    assert mean.dtype == var.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(mean.double(), flat.mean(1), **tol(dtype))
    torch.testing.assert_close(var.double(), flat.var(1, correction=0), **tol(dtype))
    # The same statistics the single-call training forward uses.
    _y, save_mean, save_invstd, _m = ops.bn_act_forward(x, None, None, None, None, None, True, 0.1, 1e-5, "relu", 0.0)
    assert torch.equal(save_mean, mean)
    torch.testing.assert_close(save_invstd.double(), (var.double() + 1e-5).rsqrt(), **tol(dtype))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bn_stats_large_mean(layout):
    # Naive E[x^2] - E[x]^2 in float32 loses everything at mean 1e4 with unit variance; shifted sums do not.
    g = torch.Generator().manual_seed(1)
    x64 = torch.randn(8, 6, 16, 16, generator=g, dtype=torch.float64) + 1e4
    x = arrange(x64.float(), layout)
    _mean, var = bn_stats(x)
    xf = x.double()  # the float32 values exactly
    ref = xf.transpose(0, 1).reshape(6, -1).var(1, correction=0)
    torch.testing.assert_close(var.double(), ref, rtol=1e-4, atol=0)


def test_bn_stats_empty_and_bf16():
    mean, var = bn_stats(torch.empty(0, 3, 4, 4))
    assert torch.equal(mean, torch.zeros(3)) and torch.equal(var, torch.zeros(3))
    x = torch.randn(4, 3, 5, 5).bfloat16()
    mean, var = bn_stats(x)
    assert mean.dtype == torch.float32
    flat = x.double().transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(mean.double(), flat.mean(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.double(), flat.var(1, correction=0), rtol=1e-5, atol=1e-6)


def make_case(shape, dtype, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = arrange(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype), layout)
    r = arrange(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype), layout)
    w = torch.rand(C, generator=g, dtype=torch.float64).to(dtype) + 0.5
    b = torch.randn(C, generator=g, dtype=torch.float64).to(dtype)
    dy = arrange(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype), layout)
    return x, r, w, b, dy


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_composition_equals_single_call(activation, layout, dtype):
    """bn_stats -> elemt -> backward_reduce -> backward_elemt(count = N*S) == bn_act_forward/backward (training)."""
    shape = (3, 13, 5, 7)
    x, r, w, b, dy = make_case(shape, dtype, layout)
    y_ref, mean_ref, invstd_ref, mask_ref = ops.bn_act_forward(
        x, r, w, b, None, None, True, 0.1, 1e-5, activation, SLOPE
    )
    mean, var = ops.bn_stats(x)
    invstd = (var.double() + 1e-5).rsqrt().to(mean.dtype)
    assert torch.equal(mean, mean_ref)
    torch.testing.assert_close(invstd, invstd_ref, rtol=1e-6 if dtype != torch.float64 else 1e-14, atol=0)
    y, mask = ops.bn_act_elemt(x, r, w, b, mean_ref, invstd_ref, activation, SLOPE)
    assert y.stride() == y_ref.stride() and y.dtype == y_ref.dtype
    # Same per-element arithmetic; the single call may fold scale/shift in double: allow an ulp or two.
    torch.testing.assert_close(
        y, y_ref, rtol=1e-6 if dtype == torch.float32 else None, atol=1e-6 if dtype == torch.float32 else None
    )
    if dtype != torch.bfloat16:
        assert torch.equal(mask, mask_ref)

    gi_ref, gr_ref, gw_ref, gb_ref = ops.bn_act_backward(
        dy, x, w, mean_ref, invstd_ref, mask_ref, True, activation, SLOPE, [True, True, True, True]
    )
    sum_dz, sum_dz_xhat = ops.bn_act_backward_reduce(dy, x, mean_ref, invstd_ref, mask_ref, activation, SLOPE)
    torch.testing.assert_close(
        sum_dz.to(gb_ref.dtype), gb_ref, **tol(torch.float64 if dtype == torch.float64 else torch.float32)
    )
    torch.testing.assert_close(
        sum_dz_xhat.to(gw_ref.dtype), gw_ref, **tol(torch.float64 if dtype == torch.float64 else torch.float32)
    )
    M = shape[0] * shape[2] * shape[3]
    gi, gr = ops.bn_act_backward_elemt(
        dy, x, w, mean_ref, invstd_ref, mask_ref, sum_dz, sum_dz_xhat, M, activation, SLOPE, [True, True]
    )
    assert gi.stride() == gi_ref.stride()
    torch.testing.assert_close(gi, gi_ref, **({} if dtype == torch.bfloat16 else tol(dtype)))
    assert torch.equal(gr, gr_ref)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_backward_elemt_global_count(layout):
    """Sums over a larger (global) batch: dx = w*invstd*(dz - sum_dz/count - xhat*sum_dz_xhat/count), float64."""
    shape = (2, 6, 4, 5)
    x, _r, w, _b, dy = make_case(shape, torch.float64, layout, seed=3)
    mean = torch.randn(6, dtype=torch.float64)
    invstd = torch.rand(6, dtype=torch.float64) + 0.5
    _y, mask = ops.bn_act_elemt(x, None, w, None, mean, invstd, "relu", 0.0)
    sum_dz = torch.randn(6, dtype=torch.float64) * 10
    sum_dz_xhat = torch.randn(6, dtype=torch.float64) * 10
    count = 1000
    gi, gr = ops.bn_act_backward_elemt(
        dy, x, w, mean, invstd, mask, sum_dz, sum_dz_xhat, count, "relu", 0.0, [True, False]
    )
    assert gr.numel() == 0
    v = lambda t: t.view(1, -1, 1, 1)
    z = (x - v(mean)) * v(invstd) * v(w)
    dz = dy * (z > 0)
    xhat = (x - v(mean)) * v(invstd)
    expect = v(w * invstd) * (dz - v(sum_dz) / count - xhat * v(sum_dz_xhat) / count)
    torch.testing.assert_close(gi, expect, rtol=1e-12, atol=1e-12)


def test_opcheck_blocks():
    x, r, w, b, dy = make_case((2, 5, 3, 4), torch.float32, "channels_last")
    mean, var = ops.bn_stats(x)
    invstd = (var + 1e-5).rsqrt()
    torch.library.opcheck(ops.bn_stats.default, (x,))
    torch.library.opcheck(ops.bn_act_elemt.default, (x, r, w, b, mean, invstd, "relu", 0.0))
    _y, mask = ops.bn_act_elemt(x, r, w, b, mean, invstd, "relu", 0.0)
    torch.library.opcheck(ops.bn_act_backward_reduce.default, (dy, x, mean, invstd, mask, "relu", 0.0))
    sdz, sdzx = ops.bn_act_backward_reduce(dy, x, mean, invstd, mask, "relu", 0.0)
    torch.library.opcheck(
        ops.bn_act_backward_elemt.default, (dy, x, w, mean, invstd, mask, sdz, sdzx, 120, "relu", 0.0, [True, True])
    )


def test_block_errors():
    x = torch.randn(2, 4, 3, 3)
    good = torch.zeros(4)
    with pytest.raises(RuntimeError, match=r"mean must be a 1-D Float tensor with 4 elements"):
        ops.bn_act_elemt(x, None, None, None, torch.zeros(3), good, "relu", 0.0)
    with pytest.raises(RuntimeError, match=r"invstd must be a 1-D Float tensor with 4 elements"):
        ops.bn_act_elemt(x, None, None, None, good, good.double(), "relu", 0.0)
    with pytest.raises(RuntimeError, match=r"input must have 2 to 5 dimensions"):
        ops.bn_stats(torch.randn(4))
    _y, mask = ops.bn_act_elemt(x, None, None, None, good, good + 1, "relu", 0.0)
    with pytest.raises(RuntimeError, match=r"count must be at least 1"):
        ops.bn_act_backward_elemt(x, x, None, good, good + 1, mask, good, good, 0, "relu", 0.0, [True, False])
    with pytest.raises(RuntimeError, match=r"sum_dz_xhat must be a 1-D Float tensor with 4 elements"):
        ops.bn_act_backward_elemt(
            x, x, None, good, good + 1, mask, good, torch.zeros(5), 10, "relu", 0.0, [True, False]
        )
    with pytest.raises(RuntimeError, match=r"mask must be the uint8 tensor of"):
        ops.bn_act_backward_reduce(x, x, good, good + 1, mask[:-4], "relu", 0.0)
    with pytest.raises(TypeError, match="input must be a Tensor"):
        bn_stats([1.0])


@pytest.mark.needs_cuda
@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_blocks_cuda_match_cpu(activation, layout, dtype):
    """The four building blocks on CUDA against the CPU kernels (themselves checked above), with a global count."""
    shape = (4, 19, 6, 7)
    x, r, w, b, dy = make_case(shape, dtype, layout, seed=3)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    close = {} if dtype == torch.bfloat16 else tol(dtype)

    def blocks(device):
        xd, rd, wd, bd, dyd = (t.to(device) for t in (x, r, w, b, dy))
        mean, var = ops.bn_stats(xd)
        invstd = (var.double() + 1e-5).rsqrt().to(acc)
        y, mask = ops.bn_act_elemt(xd, rd, wd, bd, mean, invstd, activation, SLOPE)
        sum_dz, sum_dz_xhat = ops.bn_act_backward_reduce(dyd, xd, mean, invstd, mask, activation, SLOPE)
        count = 3 * shape[0] * shape[2] * shape[3]  # as if two more ranks held the rest of the batch
        gi, gr = ops.bn_act_backward_elemt(
            dyd, xd, wd, mean, invstd, mask, sum_dz, sum_dz_xhat, count, activation, SLOPE, [True, True]
        )
        return [t.cpu() for t in (mean, var, y, sum_dz, sum_dz_xhat, gi, gr)]

    names = ("mean", "var", "y", "sum_dz", "sum_dz_xhat", "grad_input", "grad_residual")
    for name, got, want in zip(names, blocks("cuda"), blocks("cpu"), strict=True):
        torch.testing.assert_close(
            got, want, **(tol(acc) if got.dtype == acc else close), msg=lambda m, n=name: f"{n}: {m}"
        )
