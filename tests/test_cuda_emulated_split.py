"""The CUDA launch sequences of the bn_act building blocks and of the dense ops, executed by the CUDA emulator.

The emulator's bn_act test library (tests/cuda_emu/emu_bn_act.cpp: the ``emu`` fixture of tests/conftest.py) also
exposes the sequences the launchers csrc/cuda/bn_act_split.cu (bn_stats, bn_act_elemt, bn_act_backward_reduce,
bn_act_backward_elemt) and csrc/cuda/dense.cu (dense_bn_act_forward / dense_bn_act_backward, through
csrc/cuda/dense_launch.cuh) call. Each is run on
small odd shapes in both layouts and compared with the CPU ops: the building blocks with the CPU bn_act ops they
split (the same statistics, sums and gradients) and with a float64 evaluation of their formulas; the dense ops with
the CPU bn_act ops on the concatenation, the mask segments bit for bit against the concatenation's mask rearranged
per input. Outputs written as channel slices (a leading dimension wider than dense) are checked to leave every
other element of the wide buffer untouched. Last, the coverage check of bn_act_kernels.cuh (it runs both files'
sequences).
"""

from __future__ import annotations

import math

import pytest
import torch
from _cuda_emu import (
    EPS,
    ORDERS,
    SHAPE_IDS,
    SHAPES,
    SLOPE,
    acc_dtype,
    assert_all_launched,
    assert_mask_equal,
    flat_buffer,
    make_inputs,
    mask_bits,
    run_backward,
    run_forward,
    seed_of,
    spatial_dims,
    tolerance,
)

pytestmark = pytest.mark.needs_native

ACT_NAMES = ["identity", "relu", "leaky_relu"]
SENTINEL = -777.0
# A subset of the bn_act shapes: partial warps, C = 1 and S = 1, partial channels_last tiles, P > 1 reductions.
SPLIT_SHAPES = [SHAPES[0], SHAPES[1], SHAPES[3], SHAPES[4], SHAPES[6]]
SPLIT_IDS = [SHAPE_IDS[SHAPES.index(s)] for s in SPLIT_SHAPES]

# (channels of the inputs, N, S, num_sms)
DENSE_CASES = [
    ([3], 2, 5, 2),  # one input: the leading dimension is the dense one
    ([4, 1, 2], 3, 7, 1),  # a one-channel input, odd sizes (not first: a one-channel inputs[0] would make the
    # op's layout NCHW, inputs[0]'s suggested memory format, whatever the others' layout)
    ([5, 0, 3], 2, 9, 1),  # an input without channels (its mask segment is the zeroed spare word)
    ([2, 3], 3, 1, 2),  # S = 1: (N, C) rows
    ([2, 1], 3, 2000, 1),  # P > 1 partial reductions, grid-stride elementwise loop
    ([37, 4], 2, 49, 1),  # channels_last: P = 2 and partial channel tiles
]
DENSE_IDS = ["-".join(map(str, c)) + f"_{n}x{s}" for c, n, s, _ in DENSE_CASES]


# ------------------------------------------------------------------------------------------------ helpers


def _mask_bytes(numel: int) -> int:
    return ((numel + 31) // 32 + 1) * 4


def _pack(bits: torch.Tensor) -> torch.Tensor:
    """Element bits (bool, memory order) -> the packed mask of math::mask_bytes(numel) bytes, padding bits 0."""
    n = bits.numel()
    padded = torch.zeros(_mask_bytes(n) * 8, dtype=torch.int32)
    padded[:n] = bits.to(torch.int32)
    return (padded.view(-1, 8) << torch.arange(8)).sum(1).to(torch.uint8)


def _unflat(buf: torch.Tensor, shape: tuple[int, ...], cl: bool) -> torch.Tensor:
    """Inverse of flat_buffer: a buffer in the layout -> the logical (N, C, H, W) tensor (a view)."""
    N, C, H, W = shape
    return buf.view(N, H, W, C).permute(0, 3, 1, 2) if cl else buf.view(N, C, H, W)


def _chan(shape: tuple[int, ...], cl: bool) -> torch.Tensor:
    """The channel of every element of a tensor of this shape, in the layout's order."""
    return flat_buffer(torch.arange(shape[1]).view(1, -1, 1, 1).expand(shape), cl)


def _z(x, w, b, mean, invstd, r, cl) -> torch.Tensor:
    """Pre-activation in float64 with the kernels' formula (scale = w * invstd, shift = b - mean * scale)."""
    chan = _chan(tuple(x.shape), cl)
    scale = w.double() * invstd.double()
    shift = b.double() - mean.double() * scale
    z = flat_buffer(x, cl).double() * scale[chan] + shift[chan]
    return z if r is None else z + flat_buffer(r, cl).double()


def _act_backward(dy: torch.Tensor, positive: torch.Tensor, act: str) -> torch.Tensor:
    if act == "identity":
        return dy
    return torch.where(positive, dy, dy * (SLOPE if act == "leaky_relu" else 0.0))


def _wide(N, C, H, W, c0, extra, dtype, cl, fill=None):
    """A (N, C + extra, H, W) buffer (flat, in the layout) and the element offset / leading dimension of its channel
    slice [c0, c0 + C) as the kernels address it."""
    Cw = C + extra
    buf = torch.full((N * Cw * H * W,), SENTINEL, dtype=dtype) if fill is None else flat_buffer(fill, cl).clone()
    S = H * W
    off, ld = (c0, Cw) if cl else (c0 * S, Cw * S)
    return buf, off, ld, Cw


def _slice_of(buf: torch.Tensor, N, Cw, H, W, c0, C, cl) -> torch.Tensor:
    return _unflat(buf, (N, Cw, H, W), cl)[:, c0 : c0 + C]


def _sum_tol(dtype: torch.dtype, M: int) -> dict[str, float]:
    tol = tolerance(dtype)
    return {"rtol": tol["rtol"] * 10, "atol": tol["atol"] * 10 * math.sqrt(max(M, 1))}


def _running(C: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Running statistics of C channels (a fixed function of C)."""
    acc = acc_dtype(dtype)
    gen = torch.Generator().manual_seed(C)
    rm = (torch.randn(C, generator=gen, dtype=torch.float64) * 0.3).to(acc)
    rv = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).to(acc)
    return rm, rv


def _cpu_forward(x, w, b, training, act, dtype):
    return torch.ops.fusedres.bn_act_forward(
        x, None, w, b, *_running(x.shape[1], dtype), training, 0.1, EPS, act, SLOPE
    )


# ------------------------------------------------------------------------------------------------ building blocks


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", SPLIT_SHAPES, ids=SPLIT_IDS)
def test_bn_stats(emu, shape, cl, dtype, order):
    """Statistics only: mean and biased variance as the training forward computes them; nothing else written."""
    N, C, S, sms = shape
    x, *_ = make_inputs(N, C, S, cl, dtype, seed_of(shape, cl, dtype))
    acc = acc_dtype(dtype)
    mean, var = torch.full((C,), math.nan, dtype=acc), torch.full((C,), math.nan, dtype=acc)
    emu.configure(order, seed_of("stats", shape, cl, dtype, order))
    emu.bn_stats(dtype, N, C, S, cl, sms, flat_buffer(x, cl), mean, var)
    tol = tolerance(dtype)
    x64 = x.double()
    torch.testing.assert_close(mean.double(), x64.mean((0, 2, 3)), **tol)
    torch.testing.assert_close(var.double(), x64.var((0, 2, 3), unbiased=False), **tol)
    # The same statistics as the fused training forward (CPU op) returns, and as the CPU bn_stats op.
    _, smean, _, _ = _cpu_forward(x, None, None, True, "identity", dtype)
    torch.testing.assert_close(mean, smean, **tol)
    cpu_mean, cpu_var = torch.ops.fusedres.bn_stats(x)
    torch.testing.assert_close(mean, cpu_mean, **tol)
    torch.testing.assert_close(var, cpu_var, **tol)


@pytest.mark.parametrize("slice_out", [False, True], ids=["dense", "slice"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("act", ACT_NAMES)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", SPLIT_SHAPES, ids=SPLIT_IDS)
def test_bn_act_elemt(emu, shape, cl, act, dtype, slice_out):
    """Normalise with given statistics == the eval forward of the CPU op with those statistics; y as a slice too."""
    N, C, S, sms = shape
    H, W = spatial_dims(S)
    x, r, _, w, b, rm, rv = make_inputs(N, C, S, cl, dtype, seed_of(shape, cl, dtype))
    for residual in (None, r):
        # The eval forward returns the statistics it normalised with: (running mean, 1 / sqrt(running var + eps)).
        out, mean, invstd, mask = torch.ops.fusedres.bn_act_forward(
            x, residual, w, b, rm, rv, False, 0.1, EPS, act, SLOPE
        )
        c0, extra = (2, 3) if slice_out else (0, 0)
        buf, off, ld, Cw = _wide(N, C, H, W, c0, extra, dtype, cl)
        e_mask = torch.full((mask.numel(),), 0xAB, dtype=torch.uint8) if act != "identity" else None
        emu.configure("rand", seed_of("elemt", shape, cl, act, dtype, slice_out, residual is None))
        emu.elemt(
            dtype,
            N,
            C,
            S,
            cl,
            sms,
            act,
            flat_buffer(x, cl),
            None if residual is None else flat_buffer(residual, cl),
            w,
            b,
            mean,
            invstd,
            buf[off:],
            ld if slice_out else 0,
            e_mask,
        )
        cpu_y, cpu_mask = torch.ops.fusedres.bn_act_elemt(x, residual, w, b, mean, invstd, act, SLOPE)
        torch.testing.assert_close(cpu_y, out, **tolerance(dtype))  # the eval forward is this op
        torch.testing.assert_close(_slice_of(buf, N, Cw, H, W, c0, C, cl), out, **tolerance(dtype))
        if slice_out:  # nothing outside the slice written
            rest = torch.ones(N, Cw, H, W, dtype=torch.bool)
            rest[:, c0 : c0 + C] = False
            assert bool((_unflat(buf, (N, Cw, H, W), cl)[rest] == SENTINEL).all())
        if act == "identity":
            assert mask.numel() == 0
        else:
            assert torch.equal(cpu_mask, mask)
            assert_mask_equal(e_mask, mask, _z(x, w, b, mean, invstd, residual, cl), dtype)


def _backward_setup(shape, cl, act, dtype):
    N, C, S, _ = shape
    x, _, dy, w, b, _, _ = make_inputs(N, C, S, cl, dtype, seed_of(shape, cl, dtype))
    _, smean, sinv, mask = _cpu_forward(x, w, b, True, act, dtype)
    return x, dy, w, smean, sinv, mask


@pytest.mark.parametrize("slice_dy", [False, True], ids=["dense", "slice"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("act", ACT_NAMES)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", SPLIT_SHAPES, ids=SPLIT_IDS)
def test_bn_act_backward_reduce(emu, shape, cl, act, dtype, slice_dy):
    """sum_dz, sum_dz_xhat == the bias / weight gradients of the CPU backward (weight None); grad_out as a slice."""
    N, C, S, sms = shape
    H, W = spatial_dims(S)
    x, dy, _, smean, sinv, mask = _backward_setup(shape, cl, act, dtype)
    _, _, gw, gb = torch.ops.fusedres.bn_act_backward(
        dy, x, None, smean, sinv, mask, True, act, SLOPE, [False, False, True, True]
    )
    acc = acc_dtype(dtype)
    if slice_dy:  # dy inside a wider tensor whose other channels hold garbage the kernels must not read
        wide = torch.randn(N, C + 4, H, W, dtype=torch.float64).mul(1e6).to(dtype)
        wide[:, 1 : 1 + C] = dy
        buf, off, ld, _ = _wide(N, C, H, W, 1, 4, dtype, cl, fill=wide)
        dy_buf, dy_ld = buf[off:], ld
    else:
        dy_buf, dy_ld = flat_buffer(dy, cl), 0
    sdz, sdzx = torch.full((C,), math.nan, dtype=acc), torch.full((C,), math.nan, dtype=acc)
    emu.configure("rand", seed_of("reduce", shape, cl, act, dtype, slice_dy))
    emu.backward_reduce(
        dtype,
        N,
        C,
        S,
        cl,
        sms,
        act,
        dy_buf,
        dy_ld,
        flat_buffer(x, cl),
        mask if act != "identity" else None,
        smean,
        sinv,
        sdz,
        sdzx,
    )
    tol = _sum_tol(dtype, N * S)
    torch.testing.assert_close(sdz, gb, **tol)
    torch.testing.assert_close(sdzx, gw, **tol)
    cpu_sdz, cpu_sdzx = torch.ops.fusedres.bn_act_backward_reduce(dy, x, smean, sinv, mask, act, SLOPE)
    torch.testing.assert_close(sdz, cpu_sdz, **tol)
    torch.testing.assert_close(sdzx, cpu_sdzx, **tol)


ELEMT_MASKS = [(True, True), (True, False), (False, True)]


@pytest.mark.parametrize("count", ["M", "3M", "7"])
@pytest.mark.parametrize("output_mask", ELEMT_MASKS, ids=lambda m: "".join("ir"[i] for i in range(2) if m[i]))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("act", ACT_NAMES)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3], SHAPES[4]], ids=[SHAPE_IDS[0], SHAPE_IDS[3], SHAPE_IDS[4]])
def test_bn_act_backward_elemt(emu, shape, cl, act, dtype, output_mask, count):
    """Training-form gradients from given sums over `count` values.

    count = M with the CPU backward's own sums (and 3M with sums three times as large) must give the CPU backward's
    grad_input; count = 7 with arbitrary sums is checked against the float64 formula.
    """
    N, C, S, sms = shape
    M = N * S
    x, dy, w, smean, sinv, mask = _backward_setup(shape, cl, act, dtype)
    gi, gr, gw, gb = torch.ops.fusedres.bn_act_backward(
        dy, x, w, smean, sinv, mask, True, act, SLOPE, [True, True, True, True]
    )
    acc = acc_dtype(dtype)
    sdz, sdzx = gb.to(acc), gw.to(acc)
    n = M
    if count == "3M":
        sdz, sdzx, n = sdz * 3, sdzx * 3, 3 * M
    elif count == "7":
        gen = torch.Generator().manual_seed(seed_of(shape, C))
        sdz = torch.randn(C, generator=gen, dtype=torch.float64).to(acc)
        sdzx = torch.randn(C, generator=gen, dtype=torch.float64).to(acc)
        n = 7
    want_i, want_r = output_mask
    numel = x.numel()
    e_gi = torch.full((numel,), SENTINEL, dtype=dtype) if want_i else None
    e_gr = torch.full((numel,), SENTINEL, dtype=dtype) if want_r else None
    emu.configure("rand", seed_of("elemt_bwd", shape, cl, act, dtype, output_mask, count))
    emu.backward_elemt(
        dtype,
        N,
        C,
        S,
        cl,
        sms,
        act,
        flat_buffer(dy, cl),
        0,
        flat_buffer(x, cl),
        mask if act != "identity" else None,
        smean,
        sinv,
        w,
        sdz,
        sdzx,
        n,
        e_gi,
        e_gr,
    )
    tol = tolerance(dtype)
    sum_tol = _sum_tol(dtype, M)
    if count == "7":
        chan = _chan(tuple(x.shape), cl)
        positive = mask_bits(mask)[:numel] if act != "identity" else torch.zeros(numel, dtype=torch.bool)
        dz = _act_backward(flat_buffer(dy, cl).double(), positive, act)
        xhat = (flat_buffer(x, cl).double() - smean.double()[chan]) * sinv.double()[chan]
        k = (w.double() * sinv.double())[chan]
        ref_gi = k * (dz - sdz.double()[chan] / n - xhat * sdzx.double()[chan] / n)
        ref_gr = dz
    else:
        ref_gi, ref_gr = flat_buffer(gi, cl), flat_buffer(gr, cl)
    cpu_gi, cpu_gr = torch.ops.fusedres.bn_act_backward_elemt(
        dy, x, w, smean, sinv, mask, sdz, sdzx, n, act, SLOPE, list(output_mask)
    )
    gi_tol = {"rtol": sum_tol["rtol"], "atol": sum_tol["atol"] / math.sqrt(M)}
    if want_r:
        torch.testing.assert_close(e_gr.double(), ref_gr.double(), **tol)
        torch.testing.assert_close(e_gr, flat_buffer(cpu_gr, cl), **tol)
    else:
        assert cpu_gr.numel() == 0
    if want_i:
        torch.testing.assert_close(e_gi.double(), ref_gi.double(), **gi_tol)
        torch.testing.assert_close(e_gi, flat_buffer(cpu_gi, cl), **gi_tol)
    else:
        assert cpu_gi.numel() == 0


# ------------------------------------------------------------------------------------------------ dense


def _dense_inputs(case, cl, dtype):
    channels, N, S, _ = case
    xs = []
    for j, c in enumerate(channels):
        x, *_ = make_inputs(N, c, S, cl, dtype, seed_of(case, cl, dtype, j))
        xs.append(x + j)  # a different mean per input
    C = sum(channels)
    _, _, dy, w, b, _, _ = make_inputs(N, C, S, cl, dtype, seed_of(case, cl, dtype, "wide"))
    return xs, dy, w, b


def _cat(xs, cl):
    """The concatenation in the inputs' layout (its CPU op mask is then in that layout's order)."""
    cat = torch.cat(xs, 1)
    return cat.contiguous(memory_format=torch.channels_last) if cl else cat.contiguous()


def _segment_masks(cat_mask: torch.Tensor, shape, channels, cl) -> list[torch.Tensor]:
    """The concatenation's mask rearranged into the dense op's segments (input j's elements in its own order)."""
    N, C, H, W = shape
    bits = _unflat(mask_bits(cat_mask)[: N * C * H * W].clone(), shape, cl)
    out, c0 = [], 0
    for c in channels:
        out.append(_pack(flat_buffer(bits[:, c0 : c0 + c], cl)))
        c0 += c
    return out


def _empty_mask_buffer(channels, N, S, act) -> torch.Tensor | None:
    """The mask buffer as the launcher allocates it: a sentinel where kernels must write, zeros in the segments of
    inputs without elements (the launcher zeroes the buffer then)."""
    if act == "identity":
        return None
    parts = [torch.full((_mask_bytes(N * c * S),), 0xAB if N * c * S else 0, dtype=torch.uint8) for c in channels]
    return torch.cat(parts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("act", ACT_NAMES)
@pytest.mark.parametrize("mode", ["train", "eval", "given"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("case", DENSE_CASES, ids=DENSE_IDS)
def test_dense_forward(emu, case, cl, mode, act, dtype):
    """dense forward == bn_act_forward of the concatenation: output, statistics, variance, mask segments.

    mode: train (batch statistics reduced per input, the running statistics updated by each input's finalize), eval
    (normalised with the running statistics, mean / invstd written per input from them), given (precomputed batch
    statistics of the concatenation with invstd as the launcher computes it; no running statistics in the kernels).
    """
    channels, N, S, sms = case
    H, W = spatial_dims(S)
    C = sum(channels)
    xs, _, w, b = _dense_inputs(case, cl, dtype)
    cat = _cat(xs, cl)
    acc = acc_dtype(dtype)
    cfg = emu.dense_launch_config(N, S, channels, cl, act != "identity", sms)
    assert cfg["output_ld"] == (C if cl else C * S)
    if act != "identity":
        assert cfg["mask_words"] * 4 == sum(_mask_bytes(N * c * S) for c in channels)
    if mode == "given":
        bm = cat.double().mean((0, 2, 3)).to(acc)
        bv = cat.double().var((0, 2, 3), unbiased=False).to(acc)
        out, smean, sinv, cat_mask = torch.ops.fusedres.bn_act_forward(
            cat, None, w, b, bm, bv, False, 0.1, EPS, act, SLOPE
        )
        e_mean, e_invstd = bm.clone(), (bv.double() + EPS).rsqrt().to(acc)  # dense.cu's formula
    else:
        out, smean, sinv, cat_mask = _cpu_forward(cat, w, b, mode == "train", act, dtype)
        e_mean, e_invstd = torch.full((C,), math.nan, dtype=acc), torch.full((C,), math.nan, dtype=acc)
    # The running statistics as the launcher passes them (contiguous, not with precomputed statistics).
    e_rm, e_rv = _running(C, dtype) if mode != "given" else (None, None)
    e_var = torch.full((C,), math.nan, dtype=acc) if mode == "train" else None
    e_y = torch.full((N * C * S,), SENTINEL, dtype=dtype)
    e_mask = _empty_mask_buffer(channels, N, S, act)
    emu.configure("rand", seed_of("dense_fwd", case, cl, mode, act, dtype))
    emu.dense_forward(
        dtype,
        N,
        S,
        channels,
        cl,
        sms,
        mode == "train",
        act,
        [flat_buffer(x, cl) for x in xs],
        w,
        b,
        e_mean,
        e_invstd,
        e_var,
        e_y,
        e_mask,
        e_rm,
        e_rv,
    )

    # The CPU dense op itself.
    rm, rv = _running(C, dtype)
    stats = (None, None, bm, bv) if mode == "given" else (rm, rv, None, None)
    d_y, d_mean, d_invstd, d_mask = torch.ops.fusedres.dense_bn_act_forward(
        xs, w, b, *stats, mode != "eval", 0.1, EPS, act, SLOPE
    )

    tol = tolerance(dtype)
    e_y = _unflat(e_y, (N, C, H, W), cl)
    for ref_mean, ref_invstd, ref_y in ((smean, sinv, out), (d_mean, d_invstd, d_y)):
        torch.testing.assert_close(e_mean, ref_mean, **tol)
        torch.testing.assert_close(e_invstd, ref_invstd, rtol=tol["rtol"] * 4, atol=tol["atol"])
        torch.testing.assert_close(e_y, ref_y, **tol)
    if mode == "train":
        torch.testing.assert_close(e_var.double(), cat.double().var((0, 2, 3), unbiased=False), **tol)
        # Updated by the kernels as the CPU op updated rm / rv in place.
        torch.testing.assert_close(e_rm, rm, **tol)
        torch.testing.assert_close(e_rv, rv, **tol)
    elif mode == "eval":
        assert all(torch.equal(a, b) for a, b in zip((e_rm, e_rv), _running(C, dtype)))  # read, never written
    if act == "identity":
        assert d_mask.numel() == 0
    else:
        z_cat = _unflat(_z(cat, w, b, smean, sinv, None, cl), (N, C, H, W), cl)
        ref_segments = _segment_masks(cat_mask, (N, C, H, W), channels, cl)
        assert d_mask.numel() == e_mask.numel()
        pos, c0 = 0, 0
        for c, ref in zip(channels, ref_segments):
            seg = slice(pos, pos + ref.numel())
            z_seg = flat_buffer(z_cat[:, c0 : c0 + c], cl)
            assert_mask_equal(e_mask[seg], ref, z_seg, dtype)
            assert_mask_equal(e_mask[seg], d_mask[seg], z_seg, dtype)
            pos += ref.numel()
            c0 += c
        assert pos == e_mask.numel()


# (which input gradients, parameter gradients): every input with the parameters; only the first input without them
# (the other inputs are skipped, and in eval no sums are computed at all); the parameters alone.
REQUESTS = [("all", True), ("first", False), ("none", True)]


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: f"{r[0]}-{'params' if r[1] else 'noparams'}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("act", ACT_NAMES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("case", DENSE_CASES, ids=DENSE_IDS)
def test_dense_backward(emu, case, cl, training, act, dtype, request_):
    """dense backward == bn_act_backward of the concatenation, grad_out read as channel slices per input."""
    inputs_wanted, want_params = request_
    channels, N, S, sms = case
    H, W = spatial_dims(S)
    C = sum(channels)
    xs, dy, w, b = _dense_inputs(case, cl, dtype)
    cat = _cat(xs, cl)
    acc = acc_dtype(dtype)
    _, smean, sinv, cat_mask = _cpu_forward(cat, w, b, training, act, dtype)
    gi, _, gw, gb = torch.ops.fusedres.bn_act_backward(
        dy, cat, w, smean, sinv, cat_mask, training, act, SLOPE, [True, False, True, True]
    )
    mask = torch.cat(_segment_masks(cat_mask, (N, C, H, W), channels, cl)) if act != "identity" else None
    wanted = [inputs_wanted == "all" or (inputs_wanted == "first" and j == 0) for j in range(len(channels))]
    e_gis = [torch.full((N * c * S,), SENTINEL, dtype=dtype) if want else None for c, want in zip(channels, wanted)]
    any_sums = want_params or (training and any(wanted))
    e_sdz = torch.full((C,), math.nan, dtype=acc) if any_sums else None
    e_sdzx = torch.full((C,), math.nan, dtype=acc) if any_sums else None
    emu.configure("rand", seed_of("dense_bwd", case, cl, training, act, dtype, inputs_wanted, want_params))
    emu.dense_backward(
        dtype,
        N,
        S,
        channels,
        cl,
        sms,
        training,
        want_params,
        act,
        flat_buffer(dy, cl),
        [flat_buffer(x, cl) for x in xs],
        mask,
        smean,
        sinv,
        w,
        e_gis,
        e_sdz,
        e_sdzx,
    )

    # The CPU dense op itself, with the same segment mask.
    d_gis, d_gw, d_gb = torch.ops.fusedres.dense_bn_act_backward(
        dy,
        xs,
        w,
        smean,
        sinv,
        mask if mask is not None else torch.empty(0, dtype=torch.uint8),
        training,
        act,
        SLOPE,
        wanted,
        [want_params, want_params],
    )

    M = N * S
    sum_tol = _sum_tol(dtype, M)
    gi_tol = {"rtol": sum_tol["rtol"], "atol": sum_tol["atol"] / math.sqrt(M)}
    c0 = 0
    for c, e_gi, d_gi in zip(channels, e_gis, d_gis):
        if e_gi is not None:
            torch.testing.assert_close(_unflat(e_gi, (N, c, H, W), cl), gi[:, c0 : c0 + c], **gi_tol)
            torch.testing.assert_close(_unflat(e_gi, (N, c, H, W), cl), d_gi, **gi_tol)
        else:
            assert d_gi.numel() == 0
        c0 += c
    if want_params:
        for ref_gb, ref_gw in ((gb, gw), (d_gb, d_gw)):
            torch.testing.assert_close(e_sdz, ref_gb.to(acc), **sum_tol)
            torch.testing.assert_close(e_sdzx, ref_gw.to(acc), **sum_tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_dense_half(emu, cl, dtype):
    """float16 / bfloat16 storage: dense forward (training) and backward vs the CPU ops on the concatenation."""
    if not emu.has_half:
        pytest.skip("the emulator library was built without cuda_fp16.h / cuda_bf16.h (no CUDA toolkit headers)")
    case = DENSE_CASES[1]
    channels, N, S, sms = case
    H, W = spatial_dims(S)
    C = sum(channels)
    xs, dy, w, b = _dense_inputs(case, cl, dtype)
    cat = _cat(xs, cl)
    out, smean, sinv, cat_mask = _cpu_forward(cat, w, b, True, "relu", dtype)
    e_mean, e_invstd, e_var = (torch.full((C,), math.nan) for _ in range(3))
    e_y = torch.full((N * C * S,), SENTINEL, dtype=dtype)
    e_mask = _empty_mask_buffer(channels, N, S, "relu")
    emu.configure("rand", 1)
    emu.dense_forward(
        dtype,
        N,
        S,
        channels,
        cl,
        sms,
        True,
        "relu",
        [flat_buffer(x, cl) for x in xs],
        w,
        b,
        e_mean,
        e_invstd,
        e_var,
        e_y,
        e_mask,
    )
    tol = tolerance(dtype)
    torch.testing.assert_close(_unflat(e_y, (N, C, H, W), cl), out, **tol)
    torch.testing.assert_close(e_mean, smean, **tol)
    gi, _, gw, gb = torch.ops.fusedres.bn_act_backward(
        dy, cat, w, smean, sinv, cat_mask, True, "relu", SLOPE, [True, False, True, True]
    )
    mask = torch.cat(_segment_masks(cat_mask, (N, C, H, W), channels, cl))
    e_gis = [torch.full((N * c * S,), SENTINEL, dtype=dtype) for c in channels]
    e_sdz, e_sdzx = torch.full((C,), math.nan), torch.full((C,), math.nan)
    emu.dense_backward(
        dtype,
        N,
        S,
        channels,
        cl,
        sms,
        True,
        True,
        "relu",
        flat_buffer(dy, cl),
        [flat_buffer(x, cl) for x in xs],
        mask,
        smean,
        sinv,
        w,
        e_gis,
        e_sdz,
        e_sdzx,
    )
    c0 = 0
    for c, e_gi in zip(channels, e_gis):
        torch.testing.assert_close(_unflat(e_gi, (N, c, H, W), cl), gi[:, c0 : c0 + c], **tol)
        c0 += c
    torch.testing.assert_close(e_sdz, gb.float(), **_sum_tol(dtype, N * S))
    torch.testing.assert_close(e_sdzx, gw.float(), **_sum_tol(dtype, N * S))


# ------------------------------------------------------------------------------------------------ coverage


def test_every_kernel_is_emulated(emu):
    """Each __global__ kernel of bn_act_kernels.cuh, and each KERNEL_LAUNCH site of bn_act_launch.cuh, ran.

    Runs the smallest forward/backward of every (layout, training, dtype) of test_cuda_emulated.py and of the
    building-block and dense sequences above (each in both layouts and dtypes), then reads the emulator's launch log
    (which also holds the launches of every test that ran before in this session). The other kernel headers are
    checked the same way by their own test files (EMULATED_HEADERS).
    """
    for cl in (False, True):
        for training in (True, False):
            for dtype in (torch.float32, torch.float64):
                run_forward(emu, SHAPES[0], cl, training, "relu", True, dtype, "asc")
                run_backward(emu, SHAPES[0], cl, training, "relu", dtype, "asc")
    # The building-block and dense sequences (bn_act_split.cu, dense.cu) use the same kernels and launch header.
    shape = SHAPES[0]
    for cl in (False, True):
        for dtype in (torch.float32, torch.float64):
            test_bn_stats(emu, shape, cl, dtype, "asc")
            test_bn_act_elemt(emu, shape, cl, "relu", dtype, True)
            test_bn_act_backward_reduce(emu, shape, cl, "relu", dtype, True)
            test_bn_act_backward_elemt(emu, shape, cl, "relu", dtype, (True, True), "M")
            for mode in ("train", "eval", "given"):
                test_dense_forward(emu, DENSE_CASES[1], cl, mode, "relu", dtype)
            test_dense_backward(emu, DENSE_CASES[1], cl, True, "relu", dtype, ("all", True))
    assert_all_launched(emu.launch_log(), "bn_act_kernels.cuh", min_kernels=7, min_sites=11)
