"""The block end's CUDA kernels (csrc/cuda/block_end_kernels.cuh) executed on the CPU by the CUDA emulator.

A small library (tests/cuda_emu/emu_block_end.cpp) is built with g++ (the build helper of tests/_cuda_emu.py) from
the project's kernel headers and the launch sequences the .cu launcher calls (csrc/cuda/block_end_launch.cuh), with
the same sizing function (block_end_launch_config). Every result is compared with the CPU op
``torch.ops.fusedres.block_end_forward`` / ``block_end_backward`` (the semantic reference, csrc/cpu/block_end.cpp) on
the same inputs: layouts NCHW / channels_last and 2-D to 5-D inputs, every dtype, the mask activations and identity,
scale none / (N,) / (N, C) / with zeros (dropped samples), residual none / full / narrower / strided views read in
place, training and eval, every output_mask, in ascending, descending and random thread order.
"""

from __future__ import annotations

import ctypes
import math
import zlib
from pathlib import Path

import pytest
import torch
from _cuda_emu import EMU_DIR, ORDERS, assert_all_launched, assert_mask_equal, compiled_library

LIB_SOURCE = EMU_DIR / "emu_block_end.cpp"
ACTS = {"identity": 0, "relu": 1, "leaky_relu": 2, "relu6": 3}  # math::ActKind (silu is refused by the op)
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
SLOPE = 0.1
EPS = 1e-5
SENTINEL = -777.0


def _has_cpu_ops() -> bool:
    return hasattr(torch.ops.fusedres, "block_end_forward") and hasattr(torch.ops.fusedres, "block_end_backward")


pytestmark = [
    pytest.mark.needs_native,
    pytest.mark.skipif(not _has_cpu_ops(), reason="the native module has no block_end CPU ops (the oracle)"),
]


# ------------------------------------------------------------------------------------------------ the library


class BlockEndEmuLib:
    """ctypes front end of emu_block_end.cpp."""

    def __init__(self, path: Path) -> None:
        self.lib = lib = ctypes.CDLL(str(path))
        p, i64, i, d = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
        lib.emu_configure.argtypes = [i, ctypes.c_uint]
        lib.emu_last_error.restype = ctypes.c_char_p
        lib.emu_launch_log.argtypes = [ctypes.c_char_p, i64]
        lib.emu_launch_log.restype = i64
        lib.emu_block_end_launch_config.argtypes = [i64, i64, i64, i, i, i64, ctypes.POINTER(i64)]
        # ... y, mask, running_mean, running_var, their dtype code (DTYPE_CODES), momentum
        lib.emu_block_end_forward.argtypes = [i, i64, i64, i64, i, i, i, i, d, d, p, p, i64, i64, i64, p, p, i] + [
            p
        ] * 9 + [i, d]
        lib.emu_block_end_backward.argtypes = [i, i64, i64, i64, i, i, i64, i, i, d] + [p] * 7 + [i, p, p, i64, p, p, p]
        self.has_half = bool(lib.emu_has_half())

    def configure(self, order: str, seed: int = 0) -> None:
        self.lib.emu_configure(ORDERS[order], seed)

    def launch_log(self) -> dict[str, int]:
        n = self.lib.emu_launch_log(None, 0)
        buf = ctypes.create_string_buffer(n + 1)
        self.lib.emu_launch_log(buf, n + 1)
        lines = [ln.split("\t", 1) for ln in buf.value.decode().splitlines()]
        return {name: int(count) for count, name in lines}

    def launch_config(self, N, C, S, cl, num_sms, max_samples=0) -> dict[str, int]:
        out = (ctypes.c_int64 * 4)()
        self.lib.emu_block_end_launch_config(N, C, S, int(cl), num_sms, max_samples or 65535, out)
        return dict(zip(("samples_per_launch", "grid_x", "block_x", "block_y"), out))

    def _check(self, rc: int) -> None:
        if rc != 0:
            raise RuntimeError(self.lib.emu_last_error().decode())

    def forward(self, dtype, N, C, S, cl, num_sms, training, act, x, res, scale, w, b, mean, invstd, var, y, mask,
                rm=None, rv=None):  # fmt: skip
        r_ptr, r_ch, r_sn, r_sc, r_off = res
        self._check(
            self.lib.emu_block_end_forward(
                DTYPE_CODES[dtype], N, C, S, int(cl), num_sms, int(training), ACTS[act], EPS, SLOPE,
                _ptr(x), r_ptr, r_ch, r_sn, r_sc, _ptr(r_off),
                _ptr(scale), int(scale is not None and scale.dim() == 2),
                *map(_ptr, (w, b, mean, invstd, var, y, mask, rm, rv)),
                DTYPE_CODES[rm.dtype] if rm is not None else 0, 0.1,
            )
        )  # fmt: skip

    def backward(self, dtype, N, C, S, cl, num_sms, max_samples, training, act, dy, x, mask, mean, invstd, w, beta,
                 gi, gr, Cr, nc_sums, sdz, sdzx):  # fmt: skip
        self._check(
            self.lib.emu_block_end_backward(
                DTYPE_CODES[dtype], N, C, S, int(cl), num_sms, max_samples, int(training), ACTS[act], SLOPE,
                *map(_ptr, (dy, x, mask, mean, invstd, w, beta)), int(beta is not None and beta.dim() == 2),
                _ptr(gi), _ptr(gr), Cr, *map(_ptr, (nc_sums, sdz, sdzx)),
            )
        )  # fmt: skip


def _ptr(t: torch.Tensor | None) -> int | None:
    if t is None:
        return None
    assert t.is_contiguous() and t.device.type == "cpu"
    return t.data_ptr()


@pytest.fixture(scope="module")
def emu(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> BlockEndEmuLib:
    """The emulator test library, compiled once per source hash (cached under .pytest_cache)."""
    return BlockEndEmuLib(compiled_library(request, tmp_path_factory, LIB_SOURCE))


# ------------------------------------------------------------------------------------------------ operands


def _seed(*key) -> int:
    return zlib.crc32(repr(key).encode())


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _is_cl(t: torch.Tensor) -> bool:
    """BnActGeom's layout: rows of C for channels_last formats and for spatial size 1."""
    if math.prod(t.shape[2:]) == 1:
        return True
    if t.dim() == 4:
        return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    if t.dim() == 5:
        return t.is_contiguous(memory_format=torch.channels_last_3d) and not t.is_contiguous()
    return False


def _flat(t: torch.Tensor, cl: bool) -> torch.Tensor:
    """t's elements as the kernels index them: (N, C, S) dense NCHW, or (N, S, C) rows."""
    return (t.movedim(1, -1) if cl else t).contiguous().reshape(-1)


def _in_format(t: torch.Tensor, cl: bool) -> torch.Tensor:
    if cl and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if cl and t.dim() == 5:
        return t.contiguous(memory_format=torch.channels_last_3d)
    return t.contiguous()


def _residual_arg(r: torch.Tensor | None):
    """(pointer, channels, stride_n, stride_c, spatial offsets or None) as BlockEndResidualLayout gives them."""
    if r is None:
        return None, 0, 0, 0, None
    sizes, strides = r.shape[2:], r.stride()[2:]
    off = torch.zeros((), dtype=torch.int64)
    for size, stride in zip(sizes, strides):
        off = (off.unsqueeze(-1) + torch.arange(size, dtype=torch.int64) * stride).reshape(-1)
    off = off.reshape(-1)
    dense = torch.equal(off, torch.arange(off.numel(), dtype=torch.int64))
    return r.data_ptr(), r.shape[1], r.stride(0), r.stride(1), None if dense else off.contiguous()


def _make_residual(kind: str, N, C, spatial, cl, dtype, gen) -> torch.Tensor | None:
    """none | full (input's shape and format) | narrow (Cr < C channels: a channel slice of a wider tensor) |
    sub (Cr < C, every other spatial position of a larger tensor: PyramidNet's downsampling shortcut, in place)."""
    if kind == "none":
        return None
    Cr = C if kind == "full" else max(1, C - 2)
    if kind == "full":
        return _in_format(torch.randn(N, C, *spatial, generator=gen, dtype=torch.float64).to(dtype), cl)
    if kind == "narrow":
        wide = _in_format(torch.randn(N, C + 3, *spatial, generator=gen, dtype=torch.float64).to(dtype), cl)
        return wide[:, 1 : 1 + Cr]
    big_spatial = [2 * s for s in spatial]
    big = _in_format(torch.randn(N, 2 * Cr, *big_spatial, generator=gen, dtype=torch.float64).to(dtype), cl)
    view = big[:, ::2]
    for d in range(len(spatial)):
        view = view.narrow(2 + d, 1, 2 * spatial[d] - 1)[(slice(None),) * (2 + d) + (slice(None, None, 2),)]
    assert view.shape == (N, Cr, *spatial)
    return view


def _make_scale(kind: str, N, C, gen) -> torch.Tensor | None:
    """none | sample ((N,), one sample dropped: 0) | channel ((N, C), a few zeros) | sample_nz ((N,), no zero)."""
    if kind == "none":
        return None
    if kind in ("sample", "sample_nz"):
        s = torch.rand(N, generator=gen, dtype=torch.float64) + 0.5
        if kind == "sample" and N > 1:
            s[N // 2] = 0.0
        return s.float()
    s = torch.rand(N, C, generator=gen, dtype=torch.float64) + 0.5
    s.view(-1)[:: max(2, (N * C) // 3)] = 0.0
    return s.float()


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {
        torch.float32: {"rtol": 2e-5, "atol": 2e-5},
        torch.float64: {"rtol": 1e-12, "atol": 1e-12},
        torch.float16: {"rtol": 1e-2, "atol": 1e-2},
        torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
    }[dtype]


# ------------------------------------------------------------------------------------------------ one case


def _run(
    emu,
    N,
    C,
    spatial,
    cl,
    residual,
    scale,
    dtype,
    act,
    training,
    order,
    output_mask=(True, True, True, True, True),
    backward_scale="same",
    num_sms=2,
    max_samples=0,
    nan_in_dropped=False,
):
    """Forward and backward of one case under the emulator, compared with the CPU op."""
    key = (N, C, tuple(spatial), cl, residual, scale, dtype, act, training, output_mask, backward_scale, nan_in_dropped)
    gen = torch.Generator().manual_seed(_seed(*key))
    acc = _acc(dtype)
    chan = torch.arange(C, dtype=torch.float64).view(1, C, *([1] * len(spatial)))
    x = torch.randn(N, C, *spatial, generator=gen, dtype=torch.float64) * (1 + 0.1 * chan) + 0.5 * chan - 1
    x = _in_format(x.to(dtype), cl)
    dy = _in_format(torch.randn(N, C, *spatial, generator=gen, dtype=torch.float64).to(dtype), cl)
    r = _make_residual(residual, N, C, spatial, cl, dtype, gen)
    s = _make_scale(scale, N, C, gen)
    if nan_in_dropped:  # a dropped sample's branch (input, and dy where no residual gradient needs it) is not read
        assert s is not None and s.dim() == 1 and s[N // 2] == 0 and not training and not output_mask[1]
        x[N // 2] = math.nan
        dy[N // 2] = math.nan
    beta = s
    if backward_scale == "other":  # Shake-Shake: a backward scale of its own (the forward scale's shape)
        assert s is not None
        beta = (torch.rand(s.shape, generator=gen, dtype=torch.float64) + 0.5).float()
    w = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).to(acc)
    b = (torch.randn(C, generator=gen, dtype=torch.float64) * 0.2).to(acc)
    rm = (torch.randn(C, generator=gen, dtype=torch.float64) * 0.3).to(acc)
    rv = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).to(acc)
    S = math.prod(spatial)
    assert _is_cl(x) == (cl or S == 1)
    cl_k = cl or S == 1
    tol = _tol(dtype)
    emu.configure(order, _seed(*key, order))

    # ---- forward
    rm_cpu, rv_cpu = rm.clone(), rv.clone()
    y, smean, sinv, mask = torch.ops.fusedres.block_end_forward(
        x, r, s, w, b, rm_cpu, rv_cpu, training, 0.1, EPS, act, SLOPE
    )
    e_y = torch.full((x.numel(),), SENTINEL, dtype=dtype)
    e_mask = torch.full((mask.numel(),), 0xAB, dtype=torch.uint8) if mask.numel() else None
    # Written in both modes: in training the batch statistics, in eval from the running statistics (as the launcher
    # runs it for contiguous running statistics, which the kernels update in training / read in eval).
    e_mean, e_inv = torch.full((C,), math.nan, dtype=acc), torch.full((C,), math.nan, dtype=acc)
    e_var = torch.full((C,), math.nan, dtype=acc)
    e_rm, e_rv = rm.clone(), rv.clone()
    s_acc = None if s is None else s.to(acc).contiguous()
    emu.forward(
        dtype, N, C, S, cl_k, num_sms, training, act, _flat(x, cl_k), _residual_arg(r), s_acc, w, b, e_mean, e_inv,
        e_var, e_y, e_mask, e_rm, e_rv,
    )  # fmt: skip
    torch.testing.assert_close(e_mean, smean, **tol)
    torch.testing.assert_close(e_inv, sinv, rtol=tol["rtol"] * 4, atol=tol["atol"])
    if training:
        # The running statistics the kernels updated match the CPU op's update, and the host formula (momentum 0.1,
        # unbiased variance) on the emulated batch statistics.
        rm_e = rm * 0.9 + 0.1 * e_mean
        rv_e = rv * 0.9 + 0.1 * e_var * (N * S) / max(N * S - 1, 1)
        torch.testing.assert_close(rm_e, rm_cpu, **tol)
        torch.testing.assert_close(rv_e, rv_cpu, rtol=tol["rtol"] * 4, atol=tol["atol"] * 4)
        torch.testing.assert_close(e_rm, rm_e, **tol)
        torch.testing.assert_close(e_rv, rv_e, rtol=tol["rtol"] * 4, atol=tol["atol"] * 4)
    else:  # read, never written
        assert torch.equal(e_rm, rm) and torch.equal(e_rv, rv)
    if nan_in_dropped:
        assert bool(torch.isfinite(y).all())
    torch.testing.assert_close(e_y, _flat(y, cl_k), **tol)
    if act == "identity":
        assert mask.numel() == 0
    else:
        # The float64 pre-activation, to tell a mask bit flipped by rounding at a kink from a wrong one.
        x64 = x.double()
        shape = (1, C) + (1,) * len(spatial)
        bn = (x64 - smean.double().view(shape)) * (sinv.double() * w.double()).view(shape) + b.double().view(shape)
        if s is not None:
            bn = bn * s.double().view(s.shape + (1,) * (x.dim() - s.dim()))
        if r is not None:
            bn[:, : r.shape[1]] += r.double()
        kinks = (0.0, 6.0) if act == "relu6" else (0.0,)
        assert_mask_equal(e_mask, mask, _flat(bn, cl_k), dtype, kinks)

    # ---- backward
    Cr = 0 if r is None else r.shape[1]
    gi, gr, gs, gw, gb = torch.ops.fusedres.block_end_backward(
        dy, x, beta, w, b, smean, sinv, mask, Cr, training, act, SLOPE, list(output_mask)
    )
    want_x, want_r, want_s, want_w, want_b = output_mask
    e_gi = torch.full((x.numel(),), SENTINEL, dtype=dtype) if want_x else None
    e_gr = torch.full((N * Cr * S,), SENTINEL, dtype=dtype) if want_r and Cr > 0 else None
    e_nc = torch.full((2 * N * C,), math.nan, dtype=acc) if want_s else None
    want_params = want_w or want_b
    e_sums = torch.full((2 * C,), math.nan, dtype=acc) if want_params else None
    beta_acc = None if beta is None else beta.to(acc).contiguous()
    emu.configure(order, _seed(*key, order, "bwd"))
    emu.backward(
        dtype, N, C, S, cl_k, num_sms, max_samples, training, act, _flat(dy, cl_k), _flat(x, cl_k),
        mask if mask.numel() else None, smean, sinv, w, beta_acc, e_gi, e_gr, Cr, e_nc,
        None if e_sums is None else e_sums[:C], None if e_sums is None else e_sums[C:],
    )  # fmt: skip
    M = N * S
    sum_tol = {"rtol": tol["rtol"] * 10, "atol": tol["atol"] * 10 * math.sqrt(M)}
    if nan_in_dropped:
        assert want_x and bool(torch.isfinite(gi).all()) and bool(torch.isfinite(e_gi).all())
    if want_x:
        torch.testing.assert_close(e_gi, _flat(gi, cl_k), rtol=sum_tol["rtol"], atol=sum_tol["atol"] / math.sqrt(M))
    if want_r and Cr > 0:
        assert gr.shape == (N, Cr, *spatial)
        torch.testing.assert_close(e_gr, _flat(gr, cl_k), **tol)
    if want_s:
        # The launcher's formula on the emulated per-(n, c) sums (the same ATen expression as the CPU op's).
        A, B = e_nc.view(2, N, C)
        per_nc = B * (w * sinv).unsqueeze(0) + A * b.unsqueeze(0)
        gs_e = per_nc.sum(1) if beta is not None and beta.dim() == 1 else per_nc
        s_tol = {"rtol": sum_tol["rtol"], "atol": sum_tol["atol"] * math.sqrt(C)}
        torch.testing.assert_close(gs_e, gs.to(acc), **s_tol)
    if want_b:
        torch.testing.assert_close(e_sums[:C], gb.to(acc), **sum_tol)
    if want_w:
        torch.testing.assert_close(e_sums[C:], gw.to(acc), **sum_tol)


# ------------------------------------------------------------------------------------------------ tests

# (N, C, spatial, channels_last): 2-D to 5-D inputs, both layouts; each shape chosen for an edge of the kernels.
SHAPES = [
    (5, 7, (), False),  # (N, C): S = 1, rows of C (channels_last kernels)
    (3, 4, (11,), False),  # 3-D, NCHW planes of 11
    (3, 5, (3, 4), False),  # 4-D NCHW
    (3, 5, (3, 4), True),  # 4-D channels_last, tile of 8 channels for C = 5
    (2, 3, (2, 3, 2), False),  # 5-D NCHW
    (2, 3, (2, 3, 2), True),  # 5-D channels_last_3d
    (2, 37, (5, 5), True),  # two channels_last tiles, the second partial
    (2, 2, (30, 40), False),  # 1200-value planes: 128-thread reduction blocks, grid-stride elementwise walk
]
SHAPE_IDS = [f"{n}x{c}x{'x'.join(map(str, sp)) or '1'}-{'cl' if cl else 'nchw'}" for n, c, sp, cl in SHAPES]
RESIDUALS = ["none", "full", "narrow", "sub"]
SCALES = ["none", "sample", "channel"]


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("residual", RESIDUALS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_block_end(emu, shape, residual, scale):
    """Forward and every gradient vs the CPU op, float32 and float64, training and eval, each activation once."""
    N, C, spatial, cl = shape
    k = _seed(shape, residual, scale)
    for i, act in enumerate(ACTS):
        dtype = (torch.float32, torch.float64)[(k + i) % 2]
        training = (k + i) % 4 != 3
        order = list(ORDERS)[(k + i) % 3]
        _run(emu, N, C, spatial, cl, residual, scale, dtype, act, training, order)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [SHAPES[3], SHAPES[4], SHAPES[0]], ids=[SHAPE_IDS[3], SHAPE_IDS[4], SHAPE_IDS[0]])
def test_thread_orders(emu, shape, training, order):
    """Each thread order on a strided narrower residual with per-sample (a zero) and per-channel scales."""
    N, C, spatial, cl = shape
    for scale in ("sample", "channel"):
        _run(emu, N, C, spatial, cl, "sub", scale, torch.float32, "relu", training, order)


OUTPUT_MASKS = [
    (True, False, False, False, False),
    (False, True, False, False, False),
    (False, False, True, False, False),
    (False, False, False, True, False),
    (False, False, False, False, True),
    (False, True, True, False, False),
    (True, True, False, True, True),
    (False, False, False, False, False),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("output_mask", OUTPUT_MASKS, ids=lambda m: "".join(c for c, o in zip("xrswb", m) if o) or "0")
@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[3]], ids=[SHAPE_IDS[2], SHAPE_IDS[3]])
def test_output_masks(emu, shape, output_mask, training):
    """Only the requested gradients are computed, each as with all of them (dropped samples skip their sums)."""
    N, C, spatial, cl = shape
    for scale in ("sample", "channel"):
        _run(emu, N, C, spatial, cl, "narrow", scale, torch.float64, "leaky_relu", training, "rand", output_mask)


@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[3], SHAPES[0]], ids=[SHAPE_IDS[2], SHAPE_IDS[3], SHAPE_IDS[0]])
def test_backward_scale_and_sample_groups(emu, shape):
    """Shake-Shake's own backward scale; and the per-sample reduction split over several launches (grid y bound)."""
    N, C, spatial, cl = shape
    for scale in ("sample_nz", "channel"):
        _run(emu, N, C, spatial, cl, "full", scale, torch.float64, "relu", True, "rand", backward_scale="other")
    for max_samples in (1, 2):
        _run(emu, N, C, spatial, cl, "sub", "sample", torch.float32, "relu6", True, "asc", max_samples=max_samples)


@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[3]], ids=[SHAPE_IDS[2], SHAPE_IDS[3]])
def test_dropped_sample_branch_not_read(emu, shape):
    """A dropped sample's input and grad_out are NaN (eval: finite statistics): its output is act(residual), its
    dx is 0, the parameter gradients leave it out; nothing NaN reaches any result (its branch is never read)."""
    N, C, spatial, cl = shape
    for channels in ("full", "narrow"):
        _run(emu, N, C, spatial, cl, channels, "sample", torch.float32, "relu", False, "rand",
             output_mask=(True, False, False, True, True), nan_in_dropped=True)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[5]], ids=[SHAPE_IDS[2], SHAPE_IDS[5]])
def test_half(emu, shape, dtype):
    """float16 / bfloat16 storage (float accumulation), random thread order."""
    if not emu.has_half:
        pytest.skip("the emulator library was built without cuda_fp16.h / cuda_bf16.h (no CUDA toolkit headers)")
    N, C, spatial, cl = shape
    for residual, scale, act in (("sub", "sample", "relu"), ("full", "channel", "relu6"), ("none", "none", "identity")):
        _run(emu, N, C, spatial, cl, residual, scale, dtype, act, True, "rand")


def test_launch_config(emu):
    """The per-sample reduction's shapes: one partial per sample, grid y bounded, NCHW blocks sized by the plane."""
    nchw = emu.launch_config(3, 5, 12, False, 2)
    assert nchw == {"samples_per_launch": 3, "grid_x": 5, "block_x": 64, "block_y": 1}
    assert emu.launch_config(2, 2, 9000, False, 2)["block_x"] == 512
    cl = emu.launch_config(2, 37, 25, True, 2)
    assert cl == {"samples_per_launch": 2, "grid_x": 2, "block_x": 32, "block_y": 8}
    assert emu.launch_config(100000, 3, 1, True, 2)["samples_per_launch"] == 65535
    assert emu.launch_config(5, 3, 1, True, 2, max_samples=2)["samples_per_launch"] == 2


def test_every_block_end_kernel_is_emulated(emu):
    """Each __global__ kernel of block_end_kernels.cuh and each launch site of block_end_launch.cuh ran."""
    for shape in (SHAPES[2], SHAPES[3]):
        N, C, spatial, cl = shape
        _run(emu, N, C, spatial, cl, "sub", "sample", torch.float32, "relu", True, "asc")
    assert_all_launched(emu.launch_log(), "block_end_kernels.cuh", min_kernels=5, min_sites=7)
