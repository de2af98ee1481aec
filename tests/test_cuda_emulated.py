"""The CUDA kernels of csrc/cuda executed on the CPU by the CUDA emulator (tests/cuda_emu/cuda_emu.h).

A small library (tests/cuda_emu/emu_bn_act.cpp) is built here with g++ from the project's actual kernel headers
and the launch sequences the .cu launchers call (csrc/cuda/bn_act_launch.cuh), with the same sizing function
(bn_act_launch_config). Every simulated GPU thread is a fiber; threads run between synchronisation points in
ascending, descending or random order, so a result that depends on a missing barrier changes with the order.
The results are compared with the CPU op (torch.ops.fusedres.*): the mask bit for bit, values within tolerance.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EMU_DIR = ROOT / "tests" / "cuda_emu"
CUDA_SRC = ROOT / "csrc" / "cuda"
LIB_SOURCE = EMU_DIR / "emu_bn_act.cpp"

ORDERS = {"asc": 0, "desc": 1, "rand": 2}
ACTS = {"identity": 0, "relu": 1, "leaky_relu": 2}
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
SLOPE = 0.1
EPS = 1e-5

# (N, C, S, num_sms): small, odd problems, each chosen for an edge of the kernels (see test_shapes_reach_edges).
SHAPES = [
    (2, 3, 5, 2),  # tiny: partial warp, one span, narrow channels_last tiles
    (2, 1, 1, 1),  # two elements: C = 1, S = 1 (training needs more than one value per channel)
    (5, 70, 1, 2),  # (N, C) input: S = 1, C = 70 (three channels_last tiles, the last partial)
    (4, 37, 49, 1),  # odd C and S; channels_last: P = 2 and a partial second tile
    (3, 3, 2000, 1),  # P > 1 partial reductions in both layouts; grid-stride elementwise loop
    (1, 2, 9000, 1),  # 512-thread NCHW reduction blocks (16 warps into block_reduce)
    (33, 2, 3, 1),  # a whole mask word past the last element's word, in the same span (bits must be 0)
    (2, 5, 127, 64),  # many SMs: P limited by the values per channel; the spare mask word in a span of its own
]
SHAPE_IDS = ["x".join(map(str, s[:3])) + f"-sm{s[3]}" for s in SHAPES]


# ------------------------------------------------------------------------------------------------ the library


def _cuda_include() -> str | None:
    """The toolkit's include directory if it has host-usable cuda_fp16.h / cuda_bf16.h (half kernels)."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "include" / "cuda_fp16.h").exists():
            return str(Path(home) / "include")
    return None


def _compile(cxx: str, flags: list[str], cache_dir: Path, source: Path) -> tuple[Path | None, str]:
    digest = hashlib.sha256(" ".join([cxx, *flags]).encode())
    for src in sorted([source, *EMU_DIR.glob("*.h"), *CUDA_SRC.glob("*.cuh"), *(ROOT / "csrc/common").glob("*.h")]):
        digest.update(src.name.encode() + src.read_bytes())
    out = cache_dir / f"{source.stem}-{digest.hexdigest()[:16]}.so"
    if out.exists():
        return out, ""
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    proc = subprocess.run([cxx, *flags, str(source), "-o", str(tmp)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return None, proc.stderr[-6000:]
    os.replace(tmp, out)  # atomic: concurrent sessions never load a half-written library
    return out, ""


def _build_library(cache_dir: Path, source: Path = LIB_SOURCE) -> Path:
    """g++ build of a test library (emu_bn_act.cpp by default), cached by a hash of the compiler, flags, sources."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the CUDA emulator (fibers with a hand-written context switch / ucontext) needs Linux")
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        pytest.skip(f"the CUDA emulator tests need a C++ compiler ({cxx} not found)")
    flags = ["-std=c++17", "-O1", "-shared", "-fPIC", "-fstack-clash-protection", "-Wall", "-Wno-unknown-pragmas"]
    flags += ["-I", str(EMU_DIR), "-I", str(ROOT / "csrc")]
    inc = _cuda_include()
    if inc:  # host-usable cuda_fp16.h / cuda_bf16.h: the half kernels too; without them float and double only
        out, err = _compile(cxx, [*flags, "-I", inc], cache_dir, source)
        if out is not None:
            return out
        warnings.warn(f"emulator build with the CUDA headers of {inc} failed, retrying without half types:\n{err}")
    out, err = _compile(cxx, flags, cache_dir, source)
    if out is None:
        pytest.fail(f"building the emulator test library failed:\n{err}")
    return out


class EmuLib:
    """ctypes front end of emu_bn_act.cpp; tensors are passed as raw buffers dense in the given layout."""

    def __init__(self, path: Path) -> None:
        self.lib = lib = ctypes.CDLL(str(path))
        p, i64, i, d = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
        lib.emu_configure.argtypes = [i, ctypes.c_uint]
        lib.emu_drop_sync.argtypes = [ctypes.c_char_p, i]
        lib.emu_last_error.restype = ctypes.c_char_p
        lib.emu_launch_log.argtypes = [ctypes.c_char_p, i64]
        lib.emu_launch_log.restype = i64
        lib.emu_launch_config.argtypes = [i64, i64, i64, i, i, i, ctypes.POINTER(i64)]
        lib.emu_bn_act_forward.argtypes = [i, i64, i64, i64, i, i, i, i, d, d] + [p] * 9
        lib.emu_bn_act_backward.argtypes = [i, i64, i64, i64, i, i, i, i, d] + [p] * 10
        # The building-block and dense sequences (driven by test_cuda_emulated_split.py).
        pi64, pp = ctypes.POINTER(i64), ctypes.POINTER(p)
        lib.emu_bn_stats.argtypes = [i, i64, i64, i64, i, i, p, p, p]
        lib.emu_bn_act_elemt.argtypes = [i, i64, i64, i64, i, i, i, d] + [p] * 7 + [i64, p]
        lib.emu_bn_act_backward_reduce.argtypes = [i, i64, i64, i64, i, i, i, d, p, i64] + [p] * 6
        lib.emu_bn_act_backward_elemt.argtypes = [i, i64, i64, i64, i, i, i, d, p, i64] + [p] * 7 + [i64, p, p]
        lib.emu_dense_launch_config.argtypes = [i64, i64, i64, pi64, i, i, i, pi64]
        lib.emu_dense_forward.argtypes = [i, i64, i64, i64, pi64, i, i, i, i, d, d, pp] + [p] * 7
        lib.emu_dense_backward.argtypes = [i, i64, i64, i64, pi64, i, i, i, i, i, d, p, pp, p, p, p, p, pp, p, p]
        self.has_half = bool(lib.emu_has_half())

    def configure(self, order: str, seed: int = 0) -> None:
        self.lib.emu_configure(ORDERS[order], seed)

    def drop_sync(self, file_suffix: str, line: int) -> None:
        self.lib.emu_drop_sync(file_suffix.encode(), line)

    def launch_log(self) -> dict[str, int]:
        n = self.lib.emu_launch_log(None, 0)
        buf = ctypes.create_string_buffer(n + 1)
        self.lib.emu_launch_log(buf, n + 1)
        lines = [ln.split("\t", 1) for ln in buf.value.decode().splitlines()]
        return {name: int(count) for count, name in lines}

    def launch_config(self, N: int, C: int, S: int, cl: bool, num_sms: int) -> dict[str, int]:
        out = (ctypes.c_int64 * 8)()
        self.lib.emu_launch_config(N, C, S, int(cl), 1, num_sms, out)
        keys = (
            "partials",
            "reduce_block_x",
            "reduce_block_y",
            "elementwise_grid",
            "mask_words",
            "reduce_grid_x",
            "warp_spans",
            "elementwise_block",
        )
        return dict(zip(keys, out))

    def _check(self, rc: int) -> None:
        if rc != 0:
            raise RuntimeError(self.lib.emu_last_error().decode())

    def forward(self, dtype, N, C, S, cl, num_sms, training, act, x, r, w, b, mean, invstd, y, mask, var) -> None:
        self._check(
            self.lib.emu_bn_act_forward(
                DTYPE_CODES[dtype],
                N,
                C,
                S,
                int(cl),
                num_sms,
                int(training),
                ACTS[act],
                EPS,
                SLOPE,
                *map(_ptr, (x, r, w, b, mean, invstd, y, mask, var)),
            )
        )

    def backward(self, dtype, N, C, S, cl, num_sms, training, act, dy, x, mask, mean, invstd, w, gi, gr, gw, gb):
        self._check(
            self.lib.emu_bn_act_backward(
                DTYPE_CODES[dtype],
                N,
                C,
                S,
                int(cl),
                num_sms,
                int(training),
                ACTS[act],
                SLOPE,
                *map(_ptr, (dy, x, mask, mean, invstd, w, gi, gr, gw, gb)),
            )
        )

    def bn_stats(self, dtype, N, C, S, cl, num_sms, x, mean, var) -> None:
        self._check(self.lib.emu_bn_stats(DTYPE_CODES[dtype], N, C, S, int(cl), num_sms, *map(_ptr, (x, mean, var))))

    def elemt(self, dtype, N, C, S, cl, num_sms, act, x, r, w, b, mean, invstd, y, y_ld, mask) -> None:
        self._check(
            self.lib.emu_bn_act_elemt(
                DTYPE_CODES[dtype],
                N,
                C,
                S,
                int(cl),
                num_sms,
                ACTS[act],
                SLOPE,
                *map(_ptr, (x, r, w, b, mean, invstd, y)),
                y_ld,
                _ptr(mask),
            )
        )

    def backward_reduce(self, dtype, N, C, S, cl, num_sms, act, dy, dy_ld, x, mask, mean, invstd, sdz, sdzx) -> None:
        self._check(
            self.lib.emu_bn_act_backward_reduce(
                DTYPE_CODES[dtype],
                N,
                C,
                S,
                int(cl),
                num_sms,
                ACTS[act],
                SLOPE,
                _ptr(dy),
                dy_ld,
                *map(_ptr, (x, mask, mean, invstd, sdz, sdzx)),
            )
        )

    def backward_elemt(
        self, dtype, N, C, S, cl, num_sms, act, dy, dy_ld, x, mask, mean, invstd, w, sdz, sdzx, count, gi, gr
    ) -> None:
        self._check(
            self.lib.emu_bn_act_backward_elemt(
                DTYPE_CODES[dtype],
                N,
                C,
                S,
                int(cl),
                num_sms,
                ACTS[act],
                SLOPE,
                _ptr(dy),
                dy_ld,
                *map(_ptr, (x, mask, mean, invstd, w, sdz, sdzx)),
                count,
                _ptr(gi),
                _ptr(gr),
            )
        )

    def dense_launch_config(self, N, S, channels, cl, has_mask, num_sms) -> dict:
        k = len(channels)
        out = (ctypes.c_int64 * (2 + 2 * k))()
        self.lib.emu_dense_launch_config(k, N, S, (ctypes.c_int64 * k)(*channels), int(cl), int(has_mask), num_sms, out)
        return {
            "mask_words": out[0],
            "output_ld": out[1],
            "mask_word_offset": list(out[2::2]),
            "channel_offset": list(out[3::2]),
        }

    def dense_forward(self, dtype, N, S, channels, cl, num_sms, reduce, act, xs, w, b, mean, invstd, var, y, mask):
        k = len(channels)
        self._check(
            self.lib.emu_dense_forward(
                DTYPE_CODES[dtype],
                k,
                N,
                S,
                (ctypes.c_int64 * k)(*channels),
                int(cl),
                num_sms,
                int(reduce),
                ACTS[act],
                EPS,
                SLOPE,
                (ctypes.c_void_p * k)(*map(_ptr, xs)),
                *map(_ptr, (w, b, mean, invstd, var, y, mask)),
            )
        )

    def dense_backward(
        self,
        dtype,
        N,
        S,
        channels,
        cl,
        num_sms,
        training,
        want_params,
        act,
        dy,
        xs,
        mask,
        mean,
        invstd,
        w,
        gis,
        sdz,
        sdzx,
    ) -> None:
        k = len(channels)
        self._check(
            self.lib.emu_dense_backward(
                DTYPE_CODES[dtype],
                k,
                N,
                S,
                (ctypes.c_int64 * k)(*channels),
                int(cl),
                num_sms,
                int(training),
                int(want_params),
                ACTS[act],
                SLOPE,
                _ptr(dy),
                (ctypes.c_void_p * k)(*map(_ptr, xs)),
                *map(_ptr, (mask, mean, invstd, w)),
                (ctypes.c_void_p * k)(*map(_ptr, gis)),
                _ptr(sdz),
                _ptr(sdzx),
            )
        )


def _ptr(t: torch.Tensor | None) -> int | None:
    if t is None:
        return None
    assert t.is_contiguous() and t.device.type == "cpu"
    return t.data_ptr()


@pytest.fixture(scope="session")
def emu(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> EmuLib:
    """The emulator test library, compiled once per source hash (cached under .pytest_cache)."""
    cache = getattr(request.config, "cache", None)
    cache_dir = Path(cache.mkdir("cuda_emu")) if cache is not None else tmp_path_factory.mktemp("cuda_emu")
    return EmuLib(_build_library(cache_dir))


# ------------------------------------------------------------------------------------------------ helpers


def _spatial(S: int) -> tuple[int, int]:
    h = max(d for d in range(1, math.isqrt(S) + 1) if S % d == 0)
    return S // h, h


def _flat(t: torch.Tensor, cl: bool) -> torch.Tensor:
    """t's elements as a 1-D buffer in the layout the kernels index (NCHW or channels_last)."""
    return (t.permute(0, 2, 3, 1) if cl else t).contiguous().reshape(-1)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _seed(*key) -> int:
    return zlib.crc32(repr(key).encode())


def _inputs(N, C, S, cl, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    H, W = _spatial(S)
    acc = _acc(dtype)
    chan = torch.arange(C, dtype=torch.float64).view(1, C, 1, 1)
    x = (torch.randn(N, C, H, W, generator=gen, dtype=torch.float64) * (1 + 0.1 * chan) + 0.5 * chan - 1).to(dtype)
    r = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64).to(dtype)
    dy = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64).to(dtype)
    if cl:
        x, r, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, r, dy))
    w = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).to(acc)
    b = (torch.randn(C, generator=gen, dtype=torch.float64) * 0.2).to(acc)
    rm = (torch.randn(C, generator=gen, dtype=torch.float64) * 0.3).to(acc)
    rv = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).to(acc)
    return x, r, dy, w, b, rm, rv


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {
        torch.float32: {"rtol": 2e-5, "atol": 2e-5},
        torch.float64: {"rtol": 1e-12, "atol": 1e-12},
        torch.float16: {"rtol": 1e-2, "atol": 1e-2},
        torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
    }[dtype]


def _bits(mask: torch.Tensor) -> torch.Tensor:
    """Bit i of the packed mask (little-endian 32-bit words = little-endian bytes, LSB first)."""
    return ((mask.view(-1, 1).to(torch.int32) >> torch.arange(8)) & 1).reshape(-1).bool()


def _assert_mask_equal(emu_mask: torch.Tensor, cpu_mask: torch.Tensor, z: torch.Tensor, dtype: torch.dtype) -> None:
    """Bit for bit; in reduced precision a bit may only differ where the float64 pre-activation is ~0 (rounding)."""
    assert emu_mask.shape == cpu_mask.shape
    if torch.equal(emu_mask, cpu_mask):
        return
    diff = (_bits(emu_mask) != _bits(cpu_mask)).nonzero().view(-1)
    assert dtype != torch.float64, f"mask bits differ at elements {diff[:10].tolist()}"
    assert bool((diff < z.numel()).all()), f"mask bits past the last element differ: {diff[diff >= z.numel()][:10]}"
    near_zero = z[diff].abs() <= 1e-5 * (1 + z.abs().max())
    assert bool(near_zero.all()), f"mask bits differ at elements {diff[~near_zero][:10].tolist()} (z not near 0)"


def _run_forward(emu: EmuLib, shape, cl, training, act, residual, dtype, order, drop_sync=None):
    N, C, S, sms = shape
    x, r, _, w, b, rm, rv = _inputs(N, C, S, cl, dtype, _seed(shape, cl, dtype))
    r = r if residual else None
    out, smean, sinv, mask = torch.ops.fusedres.bn_act_forward(
        x, r, w, b, rm.clone(), rv.clone(), training, 0.1, EPS, act, SLOPE
    )
    acc = _acc(dtype)
    numel = x.numel()
    e_y = torch.full((numel,), -777.0, dtype=dtype)
    e_mask = torch.full((mask.numel(),), 0xAB, dtype=torch.uint8) if act != "identity" else None
    if training:
        e_mean, e_invstd = torch.full((C,), math.nan, dtype=acc), torch.full((C,), math.nan, dtype=acc)
    else:  # the launcher passes the running statistics as (mean, invstd), as the CPU op returns them
        e_mean, e_invstd = smean.clone(), sinv.clone()
    e_var = torch.full((C,), math.nan, dtype=acc)
    emu.configure(order, _seed(shape, cl, training, act, residual, dtype, order))
    if drop_sync:
        emu.drop_sync(*drop_sync)
    emu.forward(
        dtype,
        N,
        C,
        S,
        cl,
        sms,
        training,
        act,
        _flat(x, cl),
        None if r is None else _flat(r, cl),
        w,
        b,
        e_mean,
        e_invstd,
        e_y,
        e_mask,
        e_var if training else None,
    )

    tol = _tol(dtype)
    torch.testing.assert_close(e_mean, smean, **tol)
    torch.testing.assert_close(e_invstd, sinv, rtol=tol["rtol"] * 4, atol=tol["atol"])
    torch.testing.assert_close(e_y, _flat(out, cl), **tol)
    if training:
        dims = (0, 2, 3)
        torch.testing.assert_close(e_var.double(), x.double().var(dims, unbiased=False), **tol)
    if act == "identity":
        assert mask.numel() == 0
    else:
        x64 = _flat(x, cl).double()
        chan = _flat(torch.arange(C).view(1, C, 1, 1).expand(x.shape), cl)
        z = (x64 - smean.double()[chan]) * sinv.double()[chan] * w.double()[chan] + b.double()[chan]
        if r is not None:
            z = z + _flat(r, cl).double()
        _assert_mask_equal(e_mask, mask, z, dtype)
    return x, r, w, smean, sinv, mask


def _run_backward(
    emu: EmuLib, shape, cl, training, act, dtype, order, output_mask=(True, True, True, True), drop_sync=None
):
    N, C, S, sms = shape
    x, r, dy, w, b, rm, rv = _inputs(N, C, S, cl, dtype, _seed(shape, cl, dtype))
    _, smean, sinv, mask = torch.ops.fusedres.bn_act_forward(x, r, w, b, rm, rv, training, 0.1, EPS, act, SLOPE)
    gi, gr, gw, gb = torch.ops.fusedres.bn_act_backward(
        dy, x, w, smean, sinv, mask, training, act, SLOPE, list(output_mask)
    )
    acc = _acc(dtype)
    numel = x.numel()
    want_i, want_r, want_w, want_b = output_mask
    e_gi = torch.full((numel,), -777.0, dtype=dtype) if want_i else None
    e_gr = torch.full((numel,), -777.0, dtype=dtype) if want_r else None
    e_gw = torch.full((C,), math.nan, dtype=acc) if want_w else None
    e_gb = torch.full((C,), math.nan, dtype=acc) if want_b else None
    emu.configure(order, _seed(shape, cl, training, act, dtype, order, output_mask))
    if drop_sync:
        emu.drop_sync(*drop_sync)
    emu.backward(
        dtype,
        N,
        C,
        S,
        cl,
        sms,
        training,
        act,
        _flat(dy, cl),
        _flat(x, cl),
        mask if act != "identity" else None,
        smean,
        sinv,
        w,
        e_gi,
        e_gr,
        e_gw,
        e_gb,
    )

    tol = _tol(dtype)
    M = N * S
    # Sums over M values: absolute error grows with the size of the sum.
    sum_tol = {"rtol": tol["rtol"] * 10, "atol": tol["atol"] * 10 * math.sqrt(M)}
    if want_r:
        torch.testing.assert_close(e_gr, _flat(gr, cl), **tol)
    if want_i:
        torch.testing.assert_close(e_gi, _flat(gi, cl), rtol=sum_tol["rtol"], atol=sum_tol["atol"] / math.sqrt(M))
    if want_w:
        torch.testing.assert_close(e_gw, gw.to(acc), **sum_tol)
    if want_b:
        torch.testing.assert_close(e_gb, gb.to(acc), **sum_tol)


# ------------------------------------------------------------------------------------------------ tests

pytestmark = pytest.mark.needs_native


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_forward(emu, shape, cl, training, act, dtype, order):
    """Forward kernels vs the CPU op: output, mask bits, statistics, batch variance; with and without residual."""
    for residual in (False, True):
        _run_forward(emu, shape, cl, training, act, residual, dtype, order)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_backward(emu, shape, cl, training, act, dtype, order):
    """Backward kernels vs the CPU op: all four gradients, from the CPU forward's statistics and mask."""
    _run_backward(emu, shape, cl, training, act, dtype, order)


OUTPUT_MASKS = [
    (True, False, False, False),
    (False, True, False, False),
    (False, False, True, True),
    (True, True, False, False),
    (False, True, True, False),
]


@pytest.mark.parametrize("output_mask", OUTPUT_MASKS, ids=lambda m: "".join("irwb"[i] for i in range(4) if m[i]))
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_backward_output_masks(emu, cl, training, act, output_mask):
    """Partial output masks take other launch sequences (no reduction, finalize only for k, no elementwise)."""
    _run_backward(emu, (3, 5, 7, 1), cl, training, act, torch.float32, "rand", output_mask)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3], SHAPES[4]], ids=[SHAPE_IDS[0], SHAPE_IDS[3], SHAPE_IDS[4]])
def test_half(emu, shape, cl, training, dtype):
    """float16 / bfloat16 storage (float accumulation), forward and backward, random thread order."""
    if not emu.has_half:
        pytest.skip("the emulator library was built without cuda_fp16.h / cuda_bf16.h (no CUDA toolkit headers)")
    _run_forward(emu, shape, cl, training, "relu", True, dtype, "rand")
    _run_backward(emu, shape, cl, training, "leaky_relu", dtype, "rand")


def test_shapes_reach_edges(emu):
    """The shapes above really exercise what they claim, with the launchers' own sizing function."""
    cfg = {(s, cl): emu.launch_config(*s[:3], cl, s[3]) for s in SHAPES for cl in (False, True)}
    assert any(c["partials"] > 1 for (s, cl), c in cfg.items() if not cl), "no NCHW case with P > 1"
    assert any(c["partials"] > 1 for (s, cl), c in cfg.items() if cl), "no channels_last case with P > 1"
    assert any(c["reduce_grid_x"] > 1 and s[1] % c["reduce_block_x"] for (s, cl), c in cfg.items() if cl), (
        "no channels_last case with a partial channel tile"
    )
    assert any(c["reduce_block_x"] < 32 for (s, cl), c in cfg.items() if cl), "no narrow channels_last tile"
    assert any(c["reduce_block_x"] == 512 for (s, cl), c in cfg.items() if not cl), "no 512-thread NCHW block"
    # Grid-stride elementwise loop: more warp spans than warps in the grid.
    assert any(c["warp_spans"] > c["elementwise_grid"] * c["elementwise_block"] // 32 for c in cfg.values()), (
        "no grid-stride elementwise case"
    )
    # The spare mask word starts a span of its own (the elements end exactly at a span boundary) or lies in a
    # span past the last element's: every mask word is still written.
    assert any(
        c["mask_words"] > math.ceil(s[0] * s[1] * s[2] / 32) and c["warp_spans"] > math.ceil(s[0] * s[1] * s[2] / 128)
        for (s, cl), c in cfg.items()
    ), "no case where the spare mask word is in a span of its own"
    assert any((s[0] * s[1] * s[2]) % 32 for s in SHAPES), "no partial warp"


# ------------------------------------------------------------------------------------------------ the harness can fail


def _sync_sites() -> list[tuple[str, int]]:
    """Every __syncthreads() call site in csrc/cuda/*.cuh, as (file name, line)."""
    sites = []
    for path in sorted(CUDA_SRC.glob("*.cuh")):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\b__syncthreads\s*\(\s*\)", line.split("//")[0]):
                sites.append((path.name, lineno))
    return sites


@pytest.mark.parametrize("site", _sync_sites(), ids=lambda s: f"{s[0]}:{s[1]}")
def test_missing_barrier_is_caught(emu, site):
    """With any one barrier removed, at least one thread order gives a wrong result (or an emulator error)."""
    caught = []
    for order in ORDERS:
        for cl, shape in ((False, (3, 3, 2000, 1)), (True, (3, 3, 2000, 1)), (True, (5, 70, 1, 2))):
            try:
                _run_forward(emu, shape, cl, True, "relu", True, torch.float32, order, drop_sync=site)
                _run_backward(emu, shape, cl, True, "relu", torch.float32, order, drop_sync=site)
            except (AssertionError, RuntimeError) as e:
                caught.append(f"{order} {'cl' if cl else 'nchw'}: {str(e).splitlines()[0][:100]}")
    emu.configure("asc")
    assert caught, f"removing the barrier at {site[0]}:{site[1]} went unnoticed in every thread order"


# ------------------------------------------------------------------------------------------------ coverage


# Each kernel header of csrc/cuda and the header of its launch sequences, with the test file that runs them under the
# emulator and checks that every kernel and launch site ran (a header with a __global__ kernel that is not listed
# here fails test_every_kernel_header_has_an_emulated_test).
EMULATED_HEADERS = {
    "bn_act_kernels.cuh": ("bn_act_launch.cuh", "test_cuda_emulated.py"),
    "highway_kernels.cuh": ("highway_launch.cuh", "test_cuda_emulated_highway.py"),
}


def _kernel_sources(names: list[str] | None = None) -> list[str]:
    """csrc/cuda/*.cuh (or the named headers) without // comments."""
    paths = sorted(CUDA_SRC.glob("*.cuh")) if names is None else [CUDA_SRC / n for n in names]
    return [re.sub(r"//[^\n]*", "", path.read_text()) for path in paths]


def _global_kernels(names: list[str] | None = None) -> set[str]:
    names_found = set()
    for text in _kernel_sources(names):
        for m in re.finditer(r"__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(", text):
            names_found.add(m.group(1))
    return names_found


def _launch_sites(names: list[str] | None = None) -> set[str]:
    """The kernel expressions of every KERNEL_LAUNCH((kernel<...>), ...) site, whitespace removed."""
    return {
        re.sub(r"\s+", "", m.group(1))
        for text in _kernel_sources(names)
        for m in re.finditer(r"KERNEL_LAUNCH\((\([^()]*\))", text)
    }


def assert_all_launched(log: dict[str, int], kernel_header: str, min_kernels: int, min_sites: int) -> None:
    """Every __global__ kernel of kernel_header and every launch site of its launch header is in the launch log."""
    kernels = _global_kernels([kernel_header])
    assert len(kernels) >= min_kernels, f"parsing {kernel_header} found only {sorted(kernels)}"
    launched = {m.group(1) for expr in log for m in [re.search(r"(\w+_kernel)\b", expr)] if m}
    missing = kernels - launched
    assert not missing, f"__global__ kernels never run under the emulator: {sorted(missing)}"
    # Every launch site too (each template instantiation pattern the launchers use).
    sites = _launch_sites([EMULATED_HEADERS[kernel_header][0]])
    assert len(sites) >= min_sites, f"parsing the KERNEL_LAUNCH sites found only {sorted(sites)}"
    unlaunched = sites - {re.sub(r"\s+", "", expr) for expr in log}
    assert not unlaunched, f"launch sites never run under the emulator: {sorted(unlaunched)}"


def test_every_kernel_header_has_an_emulated_test():
    """Each csrc/cuda header with a __global__ kernel or a launch site is covered by an emulated test file."""
    with_kernels = {p.name for p in CUDA_SRC.glob("*.cuh") if _global_kernels([p.name])}
    unlisted = with_kernels - set(EMULATED_HEADERS)
    assert not unlisted, f"kernel headers without an emulated test (add them to EMULATED_HEADERS): {sorted(unlisted)}"
    with_sites = {p.name for p in CUDA_SRC.glob("*.cuh") if _launch_sites([p.name])}
    listed_launch = {launch for launch, _ in EMULATED_HEADERS.values()}
    assert with_sites <= listed_launch, f"launch headers not covered: {sorted(with_sites - listed_launch)}"
    for header, (launch, test_file) in EMULATED_HEADERS.items():
        assert (CUDA_SRC / header).exists() and (CUDA_SRC / launch).exists(), (header, launch)
        test_path = ROOT / "tests" / test_file
        assert test_path.exists(), f"{header}: the emulated test {test_file} is missing"
        assert "assert_all_launched(" in test_path.read_text() and header in test_path.read_text(), (
            f"{test_file} does not check that every kernel of {header} ran (assert_all_launched)"
        )
    # All kernels of csrc/cuda are split among the listed headers.
    assert _global_kernels() == set().union(*(_global_kernels([h]) for h in EMULATED_HEADERS))


def test_every_kernel_is_emulated(emu):
    """Each __global__ kernel of bn_act_kernels.cuh, and each KERNEL_LAUNCH site of bn_act_launch.cuh, ran.

    Runs the smallest forward/backward of every (layout, training, dtype) of the tests above and of the building-block
    and dense sequences (test_cuda_emulated_split.py), then reads the
    emulator's launch log (which also holds the launches of every test that ran before in this session). The other
    kernel headers are checked the same way by their own test files (EMULATED_HEADERS).
    """
    for cl in (False, True):
        for training in (True, False):
            for dtype in (torch.float32, torch.float64):
                _run_forward(emu, SHAPES[0], cl, training, "relu", True, dtype, "asc")
                _run_backward(emu, SHAPES[0], cl, training, "relu", dtype, "asc")
    # The building-block and dense sequences (bn_act_split.cu, dense.cu) use the same kernels and launch header.
    from test_cuda_emulated_split import run_every_split_sequence

    run_every_split_sequence(emu)
    assert_all_launched(emu.launch_log(), "bn_act_kernels.cuh", min_kernels=8, min_sites=12)
