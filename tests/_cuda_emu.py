"""The CUDA emulator's bn_act test library and what the emulated test files share (tests/cuda_emu/cuda_emu.h).

The library (tests/cuda_emu/emu_bn_act.cpp) is built with g++ from the project's actual kernel headers and the launch
sequences the .cu launchers call (csrc/cuda/bn_act_launch.cuh); :class:`EmuLib` calls it. Here too: the inputs, the
tolerances and mask comparison of the bn_act tests, the full forward / backward runs checked against the CPU ops
(:func:`run_forward`, :func:`run_backward`), and the coverage check every emulated test file ends with
(:func:`assert_all_launched`). Used by tests/test_cuda_emulated*.py and the ``emu`` fixture of tests/conftest.py.
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
ACTS = {"identity": 0, "relu": 1, "leaky_relu": 2, "relu6": 3, "silu": 4}  # math::ActKind
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
SLOPE = 0.1
EPS = 1e-5
MOMENTUM = 0.1

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


def build_library(cache_dir: Path, source: Path = LIB_SOURCE) -> Path:
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
        lib.emu_launch_config.argtypes = [i64, i64, i64, i, i, i, i, i, ctypes.POINTER(i64)]
        # ... batch_var, running_mean, running_var, their dtype code (DTYPE_CODES: StatDtype), momentum
        lib.emu_bn_act_forward.argtypes = [i, i64, i64, i64, i, i, i, i, d, d] + [p] * 11 + [i, d]
        lib.emu_bn_act_backward.argtypes = [i, i64, i64, i64, i, i, i, i, d] + [p] * 12
        # The building-block and dense sequences (driven by test_cuda_emulated_split.py).
        pi64, pp = ctypes.POINTER(i64), ctypes.POINTER(p)
        lib.emu_bn_stats.argtypes = [i, i64, i64, i64, i, i, p, p, p]
        lib.emu_bn_act_elemt.argtypes = [i, i64, i64, i64, i, i, i, d] + [p] * 7 + [i64, p]
        lib.emu_bn_act_backward_reduce.argtypes = [i, i64, i64, i64, i, i, i, d, p, i64] + [p] * 6
        lib.emu_bn_act_backward_elemt.argtypes = [i, i64, i64, i64, i, i, i, d, p, i64] + [p] * 7 + [i64, p, p]
        lib.emu_dense_launch_config.argtypes = [i64, i64, i64, pi64, i, i, i, pi64]
        lib.emu_dense_forward.argtypes = [i, i64, i64, i64, pi64, i, i, i, i, d, d, pp] + [p] * 9 + [i, d]
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

    def launch_config(self, N: int, C: int, S: int, cl: bool, num_sms: int, occupancy=(0, 0)) -> dict[str, int]:
        """occupancy: resident blocks per SM of the (elementwise, reduction) kernels; 0: the fixed figures."""
        out = (ctypes.c_int64 * 8)()
        self.lib.emu_launch_config(N, C, S, int(cl), 1, num_sms, *occupancy, out)
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

    def forward(
        self, dtype, N, C, S, cl, num_sms, training, act, x, r, w, b, mean, invstd, y, mask, var, rm=None, rv=None,
        momentum=MOMENTUM,
    ) -> None:
        """rm / rv: running statistics (updated in training; in eval normalised with, mean / invstd written)."""
        rs_code = DTYPE_CODES[rm.dtype] if rm is not None else 0
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
                *map(_ptr, (x, r, w, b, mean, invstd, y, mask, var, rm, rv)),
                rs_code,
                momentum,
            )
        )

    def backward(
        self, dtype, N, C, S, cl, num_sms, training, act, dy, x, mask, mean, invstd, w, gi, gr, gw, gb, b=None, r=None
    ):
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
                *map(_ptr, (dy, x, mask, mean, invstd, w, gi, gr, gw, gb, b, r)),
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

    def dense_forward(
        self, dtype, N, S, channels, cl, num_sms, reduce, act, xs, w, b, mean, invstd, var, y, mask, rm=None, rv=None
    ):
        k = len(channels)
        rs_code = DTYPE_CODES[rm.dtype] if rm is not None else 0
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
                *map(_ptr, (w, b, mean, invstd, var, y, mask, rm, rv)),
                rs_code,
                MOMENTUM,
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


def compiled_library(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, source: Path) -> Path:
    """The emulator library of ``source``, compiled once per source hash (cached under .pytest_cache)."""
    cache = getattr(request.config, "cache", None)
    cache_dir = Path(cache.mkdir("cuda_emu")) if cache is not None else tmp_path_factory.mktemp("cuda_emu")
    return build_library(cache_dir, source)


# ------------------------------------------------------------------------------------------------ helpers


def spatial_dims(S: int) -> tuple[int, int]:
    h = max(d for d in range(1, math.isqrt(S) + 1) if S % d == 0)
    return S // h, h


def flat_buffer(t: torch.Tensor, cl: bool) -> torch.Tensor:
    """t's elements as a 1-D buffer in the layout the kernels index (NCHW or channels_last)."""
    return (t.permute(0, 2, 3, 1) if cl else t).contiguous().reshape(-1)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def seed_of(*key) -> int:
    return zlib.crc32(repr(key).encode())


def make_inputs(N, C, S, cl, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    H, W = spatial_dims(S)
    acc = acc_dtype(dtype)
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


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {
        torch.float32: {"rtol": 2e-5, "atol": 2e-5},
        torch.float64: {"rtol": 1e-12, "atol": 1e-12},
        torch.float16: {"rtol": 1e-2, "atol": 1e-2},
        torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
    }[dtype]


def mask_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bit i of the packed mask (little-endian 32-bit words = little-endian bytes, LSB first)."""
    return ((mask.view(-1, 1).to(torch.int32) >> torch.arange(8)) & 1).reshape(-1).bool()


def assert_mask_equal(
    emu_mask: torch.Tensor, cpu_mask: torch.Tensor, z: torch.Tensor, dtype: torch.dtype, kinks=(0.0,)
) -> None:
    """Bit for bit; in reduced precision a bit may only differ where the float64 pre-activation is ~at a kink of the
    activation (0; relu6: 0 and 6), where rounding decides the side."""
    assert emu_mask.shape == cpu_mask.shape
    if torch.equal(emu_mask, cpu_mask):
        return
    diff = (mask_bits(emu_mask) != mask_bits(cpu_mask)).nonzero().view(-1)
    assert dtype != torch.float64, f"mask bits differ at elements {diff[:10].tolist()}"
    assert bool((diff < z.numel()).all()), f"mask bits past the last element differ: {diff[diff >= z.numel()][:10]}"
    dist = torch.stack([(z[diff] - k).abs() for k in kinks]).amin(0)
    near_zero = dist <= 1e-5 * (1 + z.abs().max())
    assert bool(near_zero.all()), f"mask bits differ at elements {diff[~near_zero][:10].tolist()} (z not near a kink)"


def run_forward(emu: EmuLib, shape, cl, training, act, residual, dtype, order, drop_sync=None, rs_dtype=None):
    """The bn_act_forward sequence with running statistics of rs_dtype (default: the accumulation dtype), as the
    launcher runs it for contiguous running statistics: training updates them in the statistics finalize, eval
    normalises with them and writes save_mean / save_invstd."""
    N, C, S, sms = shape
    x, r, _, w, b, rm, rv = make_inputs(N, C, S, cl, dtype, seed_of(shape, cl, dtype))
    acc = acc_dtype(dtype)
    rm, rv = rm.to(rs_dtype or acc), rv.to(rs_dtype or acc)
    r = r if residual else None
    cpu_rm, cpu_rv = rm.clone(), rv.clone()
    out, smean, sinv, mask = torch.ops.fusedres.bn_act_forward(
        x, r, w, b, cpu_rm, cpu_rv, training, MOMENTUM, EPS, act, SLOPE
    )
    numel = x.numel()
    e_y = torch.full((numel,), -777.0, dtype=dtype)
    e_mask = torch.full((mask.numel(),), 0xAB, dtype=torch.uint8) if mask.numel() else None
    e_mean, e_invstd = torch.full((C,), math.nan, dtype=acc), torch.full((C,), math.nan, dtype=acc)
    e_var = torch.full((C,), math.nan, dtype=acc)
    e_rm, e_rv = rm.clone(), rv.clone()
    emu.configure(order, seed_of(shape, cl, training, act, residual, dtype, order))
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
        flat_buffer(x, cl),
        None if r is None else flat_buffer(r, cl),
        w,
        b,
        e_mean,
        e_invstd,
        e_y,
        e_mask,
        e_var if training else None,
        e_rm,
        e_rv,
    )

    tol = tolerance(dtype)
    torch.testing.assert_close(e_mean, smean, **tol)
    torch.testing.assert_close(e_invstd, sinv, rtol=tol["rtol"] * 4, atol=tol["atol"])
    torch.testing.assert_close(e_y, flat_buffer(out, cl), **tol)
    if training:
        dims = (0, 2, 3)
        torch.testing.assert_close(e_var.double(), x.double().var(dims, unbiased=False), **tol)
        # The running statistics: the CPU op's within tolerance (its batch statistics differ in the last bits), and
        # bit for bit the host helper's formula and rounding order (bn_act_update_running_stats: separate ATen ops
        # on the acc dtype, then one rounding to the running statistics' dtype) on the kernels' own batch statistics.
        rs_tol = tol if rm.dtype == acc else tolerance(rm.dtype)  # rounded to their dtype: an ulp of it apart
        torch.testing.assert_close(e_rm, cpu_rm, **rs_tol)
        torch.testing.assert_close(e_rv, cpu_rv, **rs_tol)
        M = N * S
        want_rm = (e_mean * MOMENTUM + rm.to(acc) * (1.0 - MOMENTUM)).to(rm.dtype)
        want_rv = (e_var * (M / (M - 1)) * MOMENTUM + rv.to(acc) * (1.0 - MOMENTUM)).to(rv.dtype)
        assert torch.equal(e_rm, want_rm) and torch.equal(e_rv, want_rv), (e_rm - want_rm, e_rv - want_rv)
    else:  # read, never written
        assert torch.equal(e_rm, rm) and torch.equal(e_rv, rv)
    if act in ("identity", "silu"):  # no mask: identity needs none, silu recomputes z in backward
        assert mask.numel() == 0
    else:
        x64 = flat_buffer(x, cl).double()
        chan = flat_buffer(torch.arange(C).view(1, C, 1, 1).expand(x.shape), cl)
        z = (x64 - smean.double()[chan]) * sinv.double()[chan] * w.double()[chan] + b.double()[chan]
        if r is not None:
            z = z + flat_buffer(r, cl).double()
        assert_mask_equal(e_mask, mask, z, dtype, (0.0, 6.0) if act == "relu6" else (0.0,))
    return x, r, w, smean, sinv, mask


def run_backward(
    emu: EmuLib,
    shape,
    cl,
    training,
    act,
    dtype,
    order,
    output_mask=(True, True, True, True),
    drop_sync=None,
    residual=True,
):
    N, C, S, sms = shape
    x, r, dy, w, b, rm, rv = make_inputs(N, C, S, cl, dtype, seed_of(shape, cl, dtype))
    r = r if residual else None
    _, smean, sinv, mask = torch.ops.fusedres.bn_act_forward(x, r, w, b, rm, rv, training, 0.1, EPS, act, SLOPE)
    # bias and residual are read by silu only (its backward recomputes the pre-activation); passed for every act.
    gi, gr, gw, gb = torch.ops.fusedres.bn_act_backward(
        dy, x, w, smean, sinv, mask, training, act, SLOPE, list(output_mask), b, r
    )
    acc = acc_dtype(dtype)
    numel = x.numel()
    want_i, want_r, want_w, want_b = output_mask
    e_gi = torch.full((numel,), -777.0, dtype=dtype) if want_i else None
    e_gr = torch.full((numel,), -777.0, dtype=dtype) if want_r else None
    e_gw = torch.full((C,), math.nan, dtype=acc) if want_w else None
    e_gb = torch.full((C,), math.nan, dtype=acc) if want_b else None
    emu.configure(order, seed_of(shape, cl, training, act, dtype, order, output_mask))
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
        flat_buffer(dy, cl),
        flat_buffer(x, cl),
        mask if mask.numel() else None,
        smean,
        sinv,
        w,
        e_gi,
        e_gr,
        e_gw,
        e_gb,
        b,
        None if r is None else flat_buffer(r, cl),
    )

    tol = tolerance(dtype)
    M = N * S
    # Sums over M values: absolute error grows with the size of the sum.
    sum_tol = {"rtol": tol["rtol"] * 10, "atol": tol["atol"] * 10 * math.sqrt(M)}
    if want_r:
        torch.testing.assert_close(e_gr, flat_buffer(gr, cl), **tol)
    if want_i:
        torch.testing.assert_close(e_gi, flat_buffer(gi, cl), rtol=sum_tol["rtol"], atol=sum_tol["atol"] / math.sqrt(M))
    if want_w:
        torch.testing.assert_close(e_gw, gw.to(acc), **sum_tol)
    if want_b:
        torch.testing.assert_close(e_gb, gb.to(acc), **sum_tol)


# ------------------------------------------------------------------------------------------------ coverage


# Each kernel header of csrc/cuda and the header of its launch sequences, with the test file that runs them under the
# emulator and checks that every kernel and launch site ran (a header with a __global__ kernel that is not listed
# here fails test_every_kernel_header_has_an_emulated_test).
EMULATED_HEADERS = {
    # The coverage test of bn_act runs test_cuda_emulated.py's forward / backward and the split file's sequences.
    "bn_act_kernels.cuh": ("bn_act_launch.cuh", "test_cuda_emulated_split.py"),
    "highway_kernels.cuh": ("highway_launch.cuh", "test_cuda_emulated_highway.py"),
    "block_end_kernels.cuh": ("block_end_launch.cuh", "test_cuda_emulated_block_end.py"),
}


def kernel_sources(names: list[str] | None = None) -> list[str]:
    """csrc/cuda/*.cuh (or the named headers) without // comments."""
    paths = sorted(CUDA_SRC.glob("*.cuh")) if names is None else [CUDA_SRC / n for n in names]
    return [re.sub(r"//[^\n]*", "", path.read_text()) for path in paths]


def global_kernels(names: list[str] | None = None) -> set[str]:
    names_found = set()
    for text in kernel_sources(names):
        for m in re.finditer(r"__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(", text):
            names_found.add(m.group(1))
    return names_found


def launch_sites(names: list[str] | None = None) -> set[str]:
    """The kernel expressions of every KERNEL_LAUNCH((kernel<...>), ...) site, whitespace removed."""
    return {
        re.sub(r"\s+", "", m.group(1))
        for text in kernel_sources(names)
        for m in re.finditer(r"KERNEL_LAUNCH\((\([^()]*\))", text)
    }


def assert_all_launched(log: dict[str, int], kernel_header: str, min_kernels: int, min_sites: int) -> None:
    """Every __global__ kernel of kernel_header and every launch site of its launch header is in the launch log."""
    kernels = global_kernels([kernel_header])
    assert len(kernels) >= min_kernels, f"parsing {kernel_header} found only {sorted(kernels)}"
    launched = {m.group(1) for expr in log for m in [re.search(r"(\w+_kernel)\b", expr)] if m}
    missing = kernels - launched
    assert not missing, f"__global__ kernels never run under the emulator: {sorted(missing)}"
    # Every launch site too (each template instantiation pattern the launchers use).
    sites = launch_sites([EMULATED_HEADERS[kernel_header][0]])
    assert len(sites) >= min_sites, f"parsing the KERNEL_LAUNCH sites found only {sorted(sites)}"
    unlaunched = sites - {re.sub(r"\s+", "", expr) for expr in log}
    assert not unlaunched, f"launch sites never run under the emulator: {sorted(unlaunched)}"
