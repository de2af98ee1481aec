"""The highway CUDA kernels (csrc/cuda/highway_kernels.cuh) executed on the CPU by the CUDA emulator.

A small library (tests/cuda_emu/emu_highway.cpp) is built with g++ (the build helper of tests/_cuda_emu.py) from
the project's kernel headers and the launch sequences the .cu launcher calls (csrc/cuda/highway_launch.cuh), with
the same sizing function (highway_launch_config). Operands are passed in the rows view of csrc/highway.h: a pointer
to element (0, 0) and a row stride, so packed halves of one projection are read and written in place. Results are
compared with a float64 evaluation of docs/design.md §2 (independent of csrc/common/highway_math.h) and, when the native
module has them, with the CPU ops torch.ops.fusedres.highway_*. The launcher picks one of two walks per call (the
aligned one with 16-byte accesses, or the strided one): the layouts below reach both, test_walk_choice checks which
runs, test_every_highway_kernel_is_emulated that every kernel and launch site ran.
"""

from __future__ import annotations

import ctypes
import math
import zlib
from pathlib import Path

import pytest
import torch
from _cuda_emu import EMU_DIR, ORDERS, assert_all_launched, compiled_library

LIB_SOURCE = EMU_DIR / "emu_highway.cpp"
ACTS = {"identity": 0, "relu": 1, "tanh": 2, "sigmoid": 3}
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
SENTINEL = -777.0

# (rows, cols, num_sms): small, odd problems, each chosen for an edge of the walk (see test_shapes_reach_edges).
SHAPES = [
    (1, 1, 1),  # one element
    (1, 9001, 1),  # one dense row (the unpacked op): grid-stride along columns, partial last tile
    (37, 3, 1),  # short rows: blockDim.x = 1, one partial block of rows
    (3000, 3, 1),  # grid-stride over rows
    (300, 5, 1),  # blockDim.x = 2, several row tiles
    (13, 130, 2),  # blockDim.x = 64, partial column tile
    (7, 1031, 1),  # blockDim.x = 256, two column tiles, the second nearly empty
    (6, 64, 1),  # rows of whole 16-byte packs: packed projections (row stride 2 or 3 x 64) take the aligned walk
]
SHAPE_IDS = [f"{r}x{c}-sm{s}" for r, c, s in SHAPES]
# dense, padded and packed as in the ops; padded16 pads rows to a multiple of 8 elements (16-byte aligned rows:
# the aligned walk, row tails included); offset starts every view one element into its buffer, rows otherwise
# aligned (misaligned pointers force the strided walk). Which walk runs: test_walk_choice.
LAYOUTS = ["dense", "padded", "packed", "padded16", "offset"]


# ------------------------------------------------------------------------------------------------ the library


class HighwayEmuLib:
    """ctypes front end of emu_highway.cpp."""

    def __init__(self, path: Path) -> None:
        self.lib = lib = ctypes.CDLL(str(path))
        p, i64, i = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.emu_configure.argtypes = [i, ctypes.c_uint]
        lib.emu_last_error.restype = ctypes.c_char_p
        lib.emu_launch_log.argtypes = [ctypes.c_char_p, i64]
        lib.emu_launch_log.restype = i64
        lib.emu_highway_launch_config.argtypes = [i64, i64, i, i, ctypes.POINTER(i64)]
        lib.emu_highway_forward.argtypes = [i, i64, i64, i, i] + [p, i64] * 5
        lib.emu_highway_backward.argtypes = [i, i64, i64, i, i] + [p, i64] * 9
        self.has_half = bool(lib.emu_has_half())

    def configure(self, order: str, seed: int = 0) -> None:
        self.lib.emu_configure(ORDERS[order], seed)

    def launch_log(self) -> dict[str, int]:
        n = self.lib.emu_launch_log(None, 0)
        buf = ctypes.create_string_buffer(n + 1)
        self.lib.emu_launch_log(buf, n + 1)
        lines = [ln.split("\t", 1) for ln in buf.value.decode().splitlines()]
        return {name: int(count) for count, name in lines}

    def launch_config(self, rows: int, cols: int, num_sms: int, per_thread: int = 4) -> dict[str, int]:
        """The strided walk's launch shape (per_thread 4), or the aligned walk's (per_thread 16 / element size)."""
        out = (ctypes.c_int64 * 4)()
        self.lib.emu_highway_launch_config(rows, cols, num_sms, per_thread, out)
        return dict(zip(("grid_x", "grid_y", "block_x", "block_y"), out))

    def _check(self, rc: int) -> None:
        if rc != 0:
            raise RuntimeError(self.lib.emu_last_error().decode())

    def forward(self, dtype, rows, cols, num_sms, act, h, g, x, c, y) -> None:
        self._check(
            self.lib.emu_highway_forward(DTYPE_CODES[dtype], rows, cols, num_sms, ACTS[act], *_operands(h, g, x, c, y))
        )

    def backward(self, dtype, rows, cols, num_sms, act, dy, h, g, x, c, dh, dg, dx, dc) -> None:
        self._check(
            self.lib.emu_highway_backward(
                DTYPE_CODES[dtype], rows, cols, num_sms, ACTS[act], *_operands(dy, h, g, x, c, dh, dg, dx, dc)
            )
        )


def _operands(*views: torch.Tensor | None) -> list[int | None]:
    """(pointer, row stride) of each 2-D view whose rows are contiguous; (nullptr, 0) for None."""
    out: list[int | None] = []
    for v in views:
        if v is None:
            out += [None, 0]
        else:
            assert v.dim() == 2 and v.device.type == "cpu" and (v.stride(1) == 1 or v.size(1) <= 1)
            out += [v.data_ptr(), v.stride(0)]
    return out


@pytest.fixture(scope="session")
def emu(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> HighwayEmuLib:
    """The emulator test library, compiled once per source hash (cached under .pytest_cache)."""
    return HighwayEmuLib(compiled_library(request, tmp_path_factory, LIB_SOURCE))


# ------------------------------------------------------------------------------------------------ operands


def _seed(*key) -> int:
    return zlib.crc32(repr(key).encode())


class Buffers:
    """Operand views of one call in a layout, each a (rows, cols) view with contiguous rows inside a buffer.

    dense: every operand its own (rows, cols) tensor. padded: every operand its own buffer with a distinct row
    stride > cols (the gaps hold SENTINEL and must stay untouched). padded16: the same with row strides a multiple
    of 8 elements (16-byte rows for every dtype). offset: every view starts at column 1 of its buffer, whose row
    stride is a multiple of 8 elements (only the pointers are misaligned). packed: the parts (transform, gate[,
    carry_gate]) are column blocks of one (rows, parts * cols) projection, and so are their gradients; carry,
    grad_out, the output and grad_carry are dense, as in the packed op.
    """

    def __init__(self, rows: int, cols: int, layout: str, free_carry: bool, dtype: torch.dtype) -> None:
        self.rows, self.cols, self.layout, self.dtype = rows, cols, layout, dtype
        self.parts = 3 if free_carry else 2
        self.buffers: list[tuple[torch.Tensor, int, int]] = []  # (buffer, first column used, columns used)
        self._pad = 1

    def _own(self) -> torch.Tensor:
        start, width = 0, self.cols
        if self.layout == "padded":
            width += self._pad
            self._pad += 2
        elif self.layout == "padded16":
            width = -(-self.cols // 8) * 8 + 8 * self._pad
            self._pad += 1
        elif self.layout == "offset":
            start, width = 1, -(-(self.cols + 1) // 8) * 8
        buf = torch.full((self.rows, width), SENTINEL, dtype=self.dtype)
        self.buffers.append((buf, start, self.cols))
        return buf[:, start : start + self.cols]

    def part_views(self) -> list[torch.Tensor]:
        """Views for (transform, gate[, carry_gate]) or their gradients."""
        if self.layout != "packed":
            return [self._own() for _ in range(self.parts)]
        buf = torch.full((self.rows, self.parts * self.cols), SENTINEL, dtype=self.dtype)
        self.buffers.append((buf, 0, self.parts * self.cols))
        return [buf[:, k * self.cols : (k + 1) * self.cols] for k in range(self.parts)]

    def view(self) -> torch.Tensor:
        """A view for a carry-shaped operand (dense in the packed layout)."""
        if self.layout == "packed":
            buf = torch.full((self.rows, self.cols), SENTINEL, dtype=self.dtype)
            self.buffers.append((buf, 0, self.cols))
            return buf
        return self._own()

    def assert_gaps_untouched(self) -> None:
        """Columns of every buffer outside its views still hold SENTINEL (nothing written outside the views)."""
        for buf, start, used in self.buffers:
            for gap in (buf[:, :start], buf[:, start + used :]):
                assert bool((gap == SENTINEL).all()), "a kernel wrote outside its operand's rows"


def _values(rows: int, cols: int, gen: torch.Generator, scale: float, special: bool) -> torch.Tensor:
    """float64 values; with special, every 7th element is one of +-30, +-inf (extreme gate logits)."""
    v = torch.randn(rows, cols, generator=gen, dtype=torch.float64) * scale
    if special:
        flat = v.view(-1)
        specials = torch.tensor([30.0, -30.0, math.inf, -math.inf], dtype=torch.float64)
        idx = torch.arange(3, max(flat.numel(), 3), 7)
        flat[idx] = specials[torch.arange(idx.numel()) % 4]
    return v


# ------------------------------------------------------------------------------------------------ reference


def _act(h: torch.Tensor, act: str) -> torch.Tensor:
    return {"identity": h, "relu": torch.relu(h), "tanh": torch.tanh(h), "sigmoid": torch.sigmoid(h)}[act]


def _act_grad(h: torch.Tensor, H: torch.Tensor, act: str) -> torch.Tensor:
    return {"identity": torch.ones_like(h), "relu": (h > 0).to(h.dtype), "tanh": 1 - H * H, "sigmoid": H * (1 - H)}[act]


def ref_forward(h, g, x, c, act):
    """docs/design.md §2 in float64 (torch.sigmoid is exact at +-inf)."""
    h, g, x = h.double(), g.double(), x.double()
    H, T = _act(h, act), torch.sigmoid(g)
    return H * T + x * (torch.sigmoid(c.double()) if c is not None else 1 - T)


def ref_backward(dy, h, g, x, c, act):
    dy, h, g, x = dy.double(), h.double(), g.double(), x.double()
    H, T = _act(h, act), torch.sigmoid(g)
    dh = dy * T * _act_grad(h, H, act)
    if c is None:
        return dh, dy * (H - x) * T * (1 - T), dy * (1 - T), None
    S = torch.sigmoid(c.double())
    return dh, dy * H * T * (1 - T), dy * S, dy * x * S * (1 - S)


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {
        torch.float32: {"rtol": 1e-5, "atol": 1e-5},
        torch.float64: {"rtol": 1e-12, "atol": 1e-12},
        torch.float16: {"rtol": 1e-2, "atol": 1e-2},
        torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
    }[dtype]


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert bool(torch.isfinite(actual).all()), f"{what}: non-finite values (NaN/inf) in the emulated result"
    torch.testing.assert_close(actual.double(), expected, **_tol(dtype), msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------------------------------------ runs


def _inputs(rows, cols, free_carry, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    h = _values(rows, cols, gen, 2.0, False).to(dtype)
    g = _values(rows, cols, gen, 3.0, True).to(dtype)
    x = _values(rows, cols, gen, 1.0, False).to(dtype)
    c = _values(rows, cols, gen, 3.0, True).to(dtype) if free_carry else None
    dy = _values(rows, cols, gen, 1.0, False).to(dtype)
    return h, g, x, c, dy


def _run(emu, shape, layout, free_carry, act, dtype, order, grads=(True, True, True, True)):
    """Forward and backward of one case under the emulator, checked against the float64 reference."""
    rows, cols, sms = shape
    h, g, x, c, dy = _inputs(rows, cols, free_carry, dtype, _seed(shape, free_carry, dtype))
    emu.configure(order, _seed(shape, layout, free_carry, act, dtype, order))

    bufs = Buffers(rows, cols, layout, free_carry, dtype)
    parts = bufs.part_views()
    for view, value in zip(parts, (h, g, c)):
        view.copy_(value)
    xv, yv, dyv = bufs.view(), bufs.view(), bufs.view()
    xv.copy_(x)
    dyv.copy_(dy)
    cv = parts[2] if free_carry else None
    emu.forward(dtype, rows, cols, sms, act, parts[0], parts[1], xv, cv, yv)
    _assert_close(yv, ref_forward(h, g, x, c, act), dtype, "y")

    want_dc = grads[3] and free_carry
    gparts = bufs.part_views()
    dh = gparts[0] if grads[0] else None
    dg = gparts[1] if grads[1] else None
    dc = gparts[2] if want_dc else None
    dx = bufs.view() if grads[2] else None
    emu.backward(dtype, rows, cols, sms, act, dyv, parts[0], parts[1], xv, cv, dh, dg, dx, dc)
    expected = ref_backward(dy, h, g, x, c, act)
    for name, got, ref in zip(("dh", "dg", "dx", "dc"), (dh, dg, dx, dc), expected):
        if got is not None:
            _assert_close(got, ref, dtype, name)
    for k, wanted in enumerate((grads[0], grads[1], want_dc)[: bufs.parts]):
        if not wanted:  # not requested: never written
            assert bool((gparts[k] == SENTINEL).all()), f"gradient part {k} was written though not requested"
    bufs.assert_gaps_untouched()


# ------------------------------------------------------------------------------------------------ tests

pytestmark = pytest.mark.needs_native


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("free_carry", [False, True], ids=["coupled", "free"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_highway(emu, shape, layout, free_carry, dtype, order):
    """Forward and all gradients vs float64 DESIGN §2, every activation, gates with +-30 and +-inf (no NaN)."""
    for act in ACTS:
        _run(emu, shape, layout, free_carry, act, dtype, order)


GRAD_MASKS = [
    (True, False, False, False),
    (False, True, False, False),
    (False, False, True, False),
    (False, False, False, True),
    (False, True, True, True),
]


@pytest.mark.parametrize("grads", GRAD_MASKS, ids=lambda m: "".join("hgxc"[i] for i in range(4) if m[i]))
@pytest.mark.parametrize("free_carry", [False, True], ids=["coupled", "free"])
@pytest.mark.parametrize("layout", ["padded", "packed", "padded16"])
def test_highway_partial_grads(emu, layout, free_carry, grads):
    """Gradients not requested are not written (and x is not read unless needed); the others stay right."""
    _run(emu, (13, 130, 2), layout, free_carry, "tanh", torch.float32, "rand", grads)


def test_no_grads_launches_nothing(emu):
    """A backward with no gradient requested launches no kernel."""
    before = emu.launch_log()
    _run(emu, (3, 5, 1), "dense", False, "relu", torch.float32, "asc", (False, False, False, False))
    after = emu.launch_log()
    assert {k: v for k, v in after.items() if "backward" in k} == {k: v for k, v in before.items() if "backward" in k}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("free_carry", [False, True], ids=["coupled", "free"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[5], SHAPES[7]], ids=[SHAPE_IDS[2], SHAPE_IDS[5], SHAPE_IDS[7]])
def test_highway_half(emu, shape, layout, free_carry, dtype):
    """float16 / bfloat16 storage (float accumulation), random thread order."""
    if not emu.has_half:
        pytest.skip("the emulator library was built without cuda_fp16.h / cuda_bf16.h (no CUDA toolkit headers)")
    for act in ACTS:
        _run(emu, shape, layout, free_carry, act, dtype, "rand")


def _has_cpu_ops() -> bool:
    return hasattr(torch.ops.fusedres, "highway_forward") and hasattr(torch.ops.fusedres, "highway_packed_forward")


@pytest.mark.skipif(not _has_cpu_ops(), reason="the native module has no highway CPU ops yet")
@pytest.mark.parametrize("free_carry", [False, True], ids=["coupled", "free"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_matches_cpu_ops(emu, dtype, act, free_carry):
    """The emulated kernels agree with the CPU ops, unpacked (one dense row) and packed (parts read in place)."""
    rows, cols = 37, 130
    h, g, x, c, dy = _inputs(rows, cols, free_carry, dtype, _seed("cpu", free_carry, dtype))
    tol = _tol(dtype)
    emu.configure("rand", _seed("cpu", act, free_carry, dtype))

    # Unpacked: every operand one row of numel elements.
    def row(t):
        return None if t is None else t.reshape(1, -1)

    y = torch.full((1, rows * cols), SENTINEL, dtype=dtype)
    emu.forward(dtype, 1, rows * cols, 2, act, row(h), row(g), row(x), row(c), y)
    torch.testing.assert_close(y.view(rows, cols), torch.ops.fusedres.highway_forward(h, g, x, c, act), **tol)
    grads = [torch.full((1, rows * cols), SENTINEL, dtype=dtype) for _ in range(4)]
    emu.backward(
        dtype,
        1,
        rows * cols,
        2,
        act,
        row(dy),
        row(h),
        row(g),
        row(x),
        row(c),
        grads[0],
        grads[1],
        grads[2],
        grads[3] if free_carry else None,
    )
    cpu = torch.ops.fusedres.highway_backward(dy, h, g, x, c, act, [True, True, True, free_carry])
    for k in range(4 if free_carry else 3):
        torch.testing.assert_close(grads[k].view(rows, cols), cpu[k], **tol)

    # Packed along the last dim: projected = [h, g(, c)] per row.
    parts = 3 if free_carry else 2
    projected = torch.cat([h, g, c][:parts], dim=1)
    views = [projected[:, k * cols : (k + 1) * cols] for k in range(parts)]
    y = torch.full((rows, cols), SENTINEL, dtype=dtype)
    emu.forward(dtype, rows, cols, 2, act, views[0], views[1], x, views[2] if free_carry else None, y)
    torch.testing.assert_close(y, torch.ops.fusedres.highway_packed_forward(projected, x, -1, free_carry, act), **tol)
    gp = torch.full((rows, parts * cols), SENTINEL, dtype=dtype)
    gviews = [gp[:, k * cols : (k + 1) * cols] for k in range(parts)]
    gx = torch.full((rows, cols), SENTINEL, dtype=dtype)
    emu.backward(
        dtype,
        rows,
        cols,
        2,
        act,
        dy,
        views[0],
        views[1],
        x,
        views[2] if free_carry else None,
        gviews[0],
        gviews[1],
        gx,
        gviews[2] if free_carry else None,
    )
    cpu_gp, cpu_gx = torch.ops.fusedres.highway_packed_backward(dy, projected, x, -1, free_carry, act, [True, True])
    torch.testing.assert_close(gp, cpu_gp, **tol)
    torch.testing.assert_close(gx, cpu_gx, **tol)

    # Packed along the channels of an NCHW conv output (N, parts * C, H, W): rows = N, cols = C * H * W.
    N, C, H, W = 3, 4, 5, 7
    gen = torch.Generator().manual_seed(_seed("conv", free_carry, dtype))
    conv = (torch.randn(N, parts * C, H, W, generator=gen, dtype=torch.float64) * 2).to(dtype)
    carry = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64).to(dtype)
    cols = C * H * W
    flat = conv.view(N, parts * cols)
    views = [flat[:, k * cols : (k + 1) * cols] for k in range(parts)]
    y = torch.full((N, cols), SENTINEL, dtype=dtype)
    emu.forward(dtype, N, cols, 2, act, views[0], views[1], carry.view(N, cols), views[2] if free_carry else None, y)
    expected = torch.ops.fusedres.highway_packed_forward(conv, carry, 1, free_carry, act)
    torch.testing.assert_close(y.view(N, C, H, W), expected, **tol)


def test_shapes_reach_edges(emu):
    """The shapes above really exercise what they claim, with the launcher's own sizing function."""
    cfg = {s: emu.launch_config(*s) for s in SHAPES}
    for c in cfg.values():
        assert c["block_x"] * c["block_y"] == 256 and c["grid_y"] <= 65535
        # The grid covers everything once the strides are counted: at least one block per dimension.
        assert c["grid_x"] >= 1 and c["grid_y"] >= 1
    assert any(c["block_x"] == 1 for c in cfg.values()), "no one-column-wide block"
    assert any(1 < c["block_x"] < 256 for c in cfg.values()), "no intermediate block width"
    tile = {s: c["block_x"] * 4 for s, c in cfg.items()}
    assert any(math.ceil(s[1] / tile[s]) > c["grid_x"] for s, c in cfg.items()), "no grid-stride along columns"
    assert any(math.ceil(s[0] / c["block_y"]) > c["grid_y"] for s, c in cfg.items()), "no grid-stride along rows"
    assert any(s[1] % tile[s] for s in SHAPES if tile[s] > 1), "no partial column tile"
    assert any(s[0] % c["block_y"] for s, c in cfg.items()), "no partial row block"
    big = emu.launch_config(1 << 20, 3, 132)  # many short rows: grid.y stays within the hardware limit
    assert big["grid_y"] <= 65535 and big["block_x"] == 1


def test_every_highway_kernel_is_emulated(emu):
    """Each __global__ kernel of highway_kernels.cuh and each launch site of highway_launch.cuh ran: the packed
    (37, 3) projection takes the strided walk, the packed (6, 64) one the aligned walk."""
    for dtype in (torch.float32, torch.float64):
        for free_carry in (False, True):
            _run(emu, SHAPES[2], "packed", free_carry, "relu", dtype, "asc")
            _run(emu, SHAPES[7], "packed", free_carry, "relu", dtype, "asc")
    assert_all_launched(emu.launch_log(), "highway_kernels.cuh", min_kernels=4, min_sites=4)


def _walks(emu, *args, **kw) -> set[str]:
    """Runs _run(emu, *args) and returns the walks its kernel launches took: 'aligned' and / or 'strided'."""
    before = emu.launch_log()
    _run(emu, *args, **kw)
    new = {k for k, v in emu.launch_log().items() if v > before.get(k, 0)}
    assert new, "no kernel launched"
    return {"strided" if "strided" in k else "aligned" for k in new}


WALK_CASES = [
    # (shape, layout, dtype, free carry, walk): the launcher's runtime alignment check (highway_aligned)
    ((6, 64, 1), "dense", torch.float32, False, "aligned"),
    ((6, 64, 1), "packed", torch.float32, False, "aligned"),  # packed projection, row stride 2 x 64
    ((6, 64, 1), "packed", torch.float16, True, "aligned"),  # row stride 3 x 64, parts 128 B apart
    ((6, 64, 1), "packed", torch.bfloat16, False, "aligned"),
    ((13, 130, 2), "packed", torch.float64, True, "aligned"),  # 130 doubles: whole 16-byte packs
    ((13, 130, 2), "packed", torch.float32, False, "strided"),  # parts 520 B apart: misaligned
    ((13, 130, 2), "padded16", torch.float32, True, "aligned"),  # rows of 32 packs + a tail of 2
    ((1, 9001, 1), "dense", torch.float32, False, "aligned"),  # one row: any stride, a tail of 1
    ((1, 9001, 1), "dense", torch.float16, False, "aligned"),
    ((37, 3, 1), "dense", torch.float32, False, "strided"),  # row stride 3
    ((3000, 3, 1), "padded16", torch.float64, False, "aligned"),  # one pack and a tail of 1 per row
    ((6, 64, 1), "offset", torch.float32, False, "strided"),  # pointers 4 bytes past a 16-byte boundary
    ((6, 64, 1), "offset", torch.float16, True, "strided"),
    ((1, 9001, 1), "offset", torch.float64, False, "strided"),
    ((6, 64, 1), "padded", torch.float32, False, "strided"),  # odd row strides
]


@pytest.mark.parametrize("case", WALK_CASES, ids=lambda c: f"{c[0][0]}x{c[0][1]}-{c[1]}-{str(c[2])[6:]}-{c[4]}")
def test_walk_choice(emu, case):
    """The aligned walk runs exactly where every pointer and row stride allows 16-byte accesses (packed
    projections included), the strided one otherwise (offset views); both give the reference results."""
    shape, layout, dtype, free_carry, walk = case
    if dtype in (torch.float16, torch.bfloat16) and not emu.has_half:
        pytest.skip("the emulator library was built without cuda_fp16.h / cuda_bf16.h")
    assert _walks(emu, shape, layout, free_carry, "tanh", dtype, "rand") == {walk}


def test_aligned_shapes_reach_edges(emu):
    """The padded16 runs of test_highway (float32: 4, float64: 2 elements per 16-byte pack) and test_highway_half
    (8 per pack) take the aligned walk through its edges: a grid stride along a row's packs and over rows, row
    tails (cols % pack), rows that are only a tail (cols < pack)."""
    half_shapes = [SHAPES[2], SHAPES[5], SHAPES[7]]
    for vec, shapes in ((2, SHAPES), (4, SHAPES), (8, half_shapes)):
        cfg = {s: emu.launch_config(*s, per_thread=vec) for s in shapes}
        for c in cfg.values():
            assert c["block_x"] * c["block_y"] == 256 and c["grid_y"] <= 65535
        assert any(s[1] % vec for s in shapes), f"{vec} per pack: no row tail"
        assert any(s[1] // vec >= vec for s in shapes), f"{vec} per pack: no row of whole packs"
        if vec > 2:
            assert any(s[1] < vec for s in shapes), f"{vec} per pack: no tail-only rows"
        else:
            assert any(s[1] // vec > c["grid_x"] * c["block_x"] for s, c in cfg.items()), "no stride along packs"
        if vec < 8:
            assert any(math.ceil(s[0] / c["block_y"]) > c["grid_y"] for s, c in cfg.items()), "no row stride"


def _ulp(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of dtype at each value of ref (float64), the smallest subnormal step at 0."""
    mant, tiny = {torch.float16: (10, 2.0**-24), torch.bfloat16: (7, 2.0**-133)}[dtype]
    mag = ref.abs().clamp_min(tiny)
    return torch.maximum(torch.exp2(torch.floor(torch.log2(mag)) - mant), torch.full_like(mag, tiny))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fast_math_16bit_within_one_ulp(emu, dtype):
    """The 16-bit kernels' fast tanh and sigmoid (__expf, __fdividef; highway_kernels.cuh) give the correctly
    rounded value or its neighbour over [-12, 12], the polynomial / exp switch at |h| = 1/8 and tiny arguments
    included: y = tanh(h) with T = sigmoid(30) = 1 and x = 0; y = sigmoid(g) with identity(h = 1) and x = 0."""
    if not emu.has_half:
        pytest.skip("the emulator library was built without the CUDA toolkit's cuda_fp16.h / cuda_bf16.h")
    grid = torch.linspace(-12, 12, 4801, dtype=torch.float64)
    special = torch.tensor([1e-6, 1e-4, 1e-3, 0.01, 0.124, 0.125, 0.126, 0.5, 8.9, 9.0, 9.1], dtype=torch.float64)
    v = torch.cat([grid, special, -special]).to(dtype)  # exactly representable inputs
    n = v.numel()
    zeros = torch.zeros(1, n, dtype=dtype)
    cases = {
        "tanh": (v.view(1, n), torch.full((1, n), 30.0, dtype=dtype), torch.tanh(v.double())),
        "sigmoid": (torch.ones(1, n, dtype=dtype), v.view(1, n), torch.sigmoid(v.double())),
    }
    for act, (h, g, ref) in cases.items():
        y = torch.empty(1, n, dtype=dtype)
        emu.forward(dtype, 1, n, 1, act if act == "tanh" else "identity", h, g, zeros, None, y)
        err = (y.view(-1).double() - ref.to(dtype).double()).abs()
        ulp = _ulp(ref, dtype)
        worst = int(torch.argmax(err / ulp))
        assert bool((err <= ulp).all()), (
            f"{act}: {float(err[worst] / ulp[worst]):.2f} ulp at {float(v[worst])}: got {float(y.view(-1)[worst])}, "
            f"float64 {float(ref[worst])}"
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_device_math_special_values(emu, dtype):
    """The branch-free sigmoid and the tanh of the kernels at +-inf and NaN: tanh(+-inf) = +-1, sigmoid(+inf) = 1,
    sigmoid(-inf) = 0 exactly, NaN propagates (torch.tanh / torch.sigmoid do the same)."""
    if dtype in (torch.float16, torch.bfloat16) and not emu.has_half:
        pytest.skip("the emulator library was built without the CUDA toolkit's cuda_fp16.h / cuda_bf16.h")
    v = torch.tensor([[math.inf, -math.inf, math.nan, 0.0, -0.0]], dtype=dtype)
    zeros, ones = torch.zeros_like(v), torch.ones_like(v)
    y = torch.empty_like(v)
    emu.forward(dtype, 1, v.numel(), 1, "tanh", v, torch.full_like(v, 1000.0), zeros, None, y)  # T = 1 exactly
    torch.testing.assert_close(y, torch.tanh(v), rtol=0, atol=0, equal_nan=True)
    emu.forward(dtype, 1, v.numel(), 1, "identity", ones, v, zeros, None, y)
    torch.testing.assert_close(y, torch.sigmoid(v), rtol=0, atol=0, equal_nan=True)
