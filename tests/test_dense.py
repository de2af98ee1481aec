"""fusedres.dense_batch_norm_act / torch.ops.fusedres.dense_bn_act_* / fusedres.nn.DenseBatchNormAct2d.

Oracle: fusedres.reference.dense_batch_norm_act (torch.cat + F.batch_norm + activation) run in float64 on the same
values. float32/float64 must match it to ~1e-5 / ~1e-9 relative; bfloat16/float16 must be within 2x the error of
PyTorch's own same-dtype cat + BN + activation (plus a float32-level slack for cases where that error is ~0).
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import fusedres
from fusedres import dense_batch_norm_act
from fusedres.nn import DenseBatchNormAct2d
from fusedres.ops import bn_stats
from fusedres.ops.dense import DOUBLE_BACKWARD_ERROR, dense_mask_bytes
from fusedres.reference import dense_batch_norm_act as reference_dense_batch_norm_act

native = pytest.mark.needs_native

HALF = (torch.bfloat16, torch.float16)
ACTIVATIONS = ("relu", "identity", "leaky_relu")
EPS = 1e-5
HALF_SLACK = 1e-5  # as in test_bn_act.py: float32 accumulation noise where PyTorch's own error is ~0
CHANNELS = (3, 5, 12, 1)  # different and odd channel counts: every input starts at an odd channel offset


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


def cl_format(ndim: int) -> torch.memory_format:
    return torch.channels_last if ndim == 4 else torch.channels_last_3d


def arrange(t: torch.Tensor, dtype: torch.dtype, layout: str) -> torch.Tensor:
    """`t`'s values in `dtype` with the given memory layout."""
    t = t.to(dtype)
    if layout == "contiguous" or t.dim() not in (4, 5):
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=cl_format(t.dim()))
    if layout == "permuted":  # stored as (C, N, *spatial): dense but neither contiguous nor channels_last
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    raise AssertionError(layout)


def input_layouts(layout: str, k: int) -> list[str]:
    """ "mixed": channels_last, contiguous, permuted, channels_last, ... (the output follows inputs[0])."""
    if layout == "mixed":
        return [("channels_last", "contiguous", "permuted")[j % 3] for j in range(k)]
    return [layout] * k


def output_format(ndim: int, layout: str) -> torch.memory_format:
    first = input_layouts(layout, 1)[0]
    return cl_format(ndim) if first == "channels_last" and ndim in (4, 5) else torch.contiguous_format


class DenseCase:
    """One set of arguments: the inputs, parameters, running statistics, grad_out and extra training batches."""

    def __init__(
        self,
        channels=CHANNELS,
        dtype=torch.float32,
        layout="contiguous",
        *,
        N=3,
        spatial=(4, 5),
        requires=None,
        param_dtype=None,
        seed=0,
        extra_steps=2,
        device="cpu",
    ):
        g = torch.Generator().manual_seed(seed)
        C = sum(channels)
        pdt = param_dtype or (torch.float32 if dtype in HALF else dtype)
        layouts = input_layouts(layout, len(channels))

        def full(c, j, scale=1.0, shift=0.0, lay=None):
            values = torch.randn((N, c, *spatial), generator=g, dtype=torch.float64) * scale + shift
            return arrange(values, dtype, lay or layouts[j]).to(device)

        def vec(t):
            return t.to(pdt).to(device)

        self.layout, self.dtype, self.channels, self.shape = layout, dtype, tuple(channels), (N, C, *spatial)
        self.xs = [full(c, j, 1.5, 0.3 * j - 0.2) for j, c in enumerate(channels)]
        self.requires = tuple(requires) if requires is not None else (True,) * len(channels)
        self.dy = full(C, 0, lay="contiguous")
        self.w = vec(torch.randn(C, generator=g, dtype=torch.float64))
        self.b = vec(torch.randn(C, generator=g, dtype=torch.float64))
        self.rm = vec(torch.randn(C, generator=g, dtype=torch.float64) * 0.5)
        self.rv = vec(torch.rand(C, generator=g, dtype=torch.float64) + 0.5)
        self.extra = [[full(c, j, 1.2, -0.1 * j) for j, c in enumerate(channels)] for _ in range(extra_steps)]

    def to(self, device):
        out = object.__new__(DenseCase)
        out.__dict__ = dict(self.__dict__)
        layouts = input_layouts(self.layout, len(self.channels))

        def move(t, lay):
            return arrange(t.to(device), t.dtype, lay)

        out.xs = [move(x, lay) for x, lay in zip(self.xs, layouts)]
        out.extra = [[move(x, lay) for x, lay in zip(xs, layouts)] for xs in self.extra]
        out.dy = self.dy.to(device)
        for name in ("w", "b", "rm", "rv"):
            setattr(out, name, getattr(self, name).to(device))
        return out


class Snapshot:
    def __init__(self, *tensors):
        self.tensors = tensors
        self.values = [t.clone() for t in tensors]

    def unchanged(self):
        return all(torch.equal(t, v) for t, v in zip(self.tensors, self.values))


def stats_of(xs):
    return [bn_stats(x.detach()) for x in xs]


def run(
    fn,
    case: DenseCase,
    training: bool,
    activation: str,
    *,
    cast=None,
    use_stats=False,
    momentum=0.1,
    negative_slope=0.01,
    use_running=True,
    affine=True,
) -> dict:
    """Forward + backward of `fn` on copies of `case` (cast to `cast` if given), then the extra training steps.

    Returns out, gx (one entry per input: None where the input does not require grad), gw, gb, rm and rv.
    """

    def prep(t, grad=False):
        if t is None:
            return None
        t = t.detach().to(cast) if cast is not None else t.detach().clone(memory_format=torch.preserve_format)
        return t.requires_grad_(grad)

    xs = [prep(x, req) for x, req in zip(case.xs, case.requires)]
    w, b = (prep(case.w, True), prep(case.b, True)) if affine else (None, None)
    rm, rv = (prep(case.rm), prep(case.rv)) if use_running else (None, None)
    dy = prep(case.dy)
    kw = {"activation": activation, "negative_slope": negative_slope}
    stats = stats_of(xs) if use_stats else None
    out = fn(xs, rm, rv, w, b, training, momentum, EPS, input_stats=stats, **kw)
    leaves = [x for x in xs if x.requires_grad] + [t for t in (w, b) if t is not None]
    grads = list(torch.autograd.grad(out, leaves, dy)) if leaves else []
    res = {"out": out.detach(), "gx": [grads.pop(0) if x.requires_grad else None for x in xs]}
    res["gw"], res["gb"] = (grads[0], grads[1]) if affine else (None, None)
    if training:
        with torch.no_grad():
            for xe in case.extra:
                xe = [prep(x) for x in xe]
                fn(xe, rm, rv, w, b, training, momentum, EPS, input_stats=stats_of(xe) if use_stats else None, **kw)
    res["rm"], res["rv"] = rm, rv
    return res


def max_rel_err(got: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    scale = max(ref.abs().max().item(), floor)
    return (got.double() - ref).abs().max().item() / max(scale, 1e-30)


def assert_matches(name: str, got, ref, same_dtype=None, dtype=torch.float32, floor=0.0) -> None:
    """`got` vs the float64 reference: rtol-style for fp32/fp64, the 2x-PyTorch rule for bf16/fp16."""
    if ref is None:
        assert got is None, name
        return
    assert got is not None, name
    assert got.shape == ref.shape, (name, got.shape, ref.shape)
    if ref.numel() == 0:
        return
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    if dtype in HALF:
        err, torch_err = max_rel_err(got, ref, floor), max_rel_err(same_dtype, ref, floor)
        assert err <= 2 * torch_err + HALF_SLACK, (
            f"{name}: fused error {err:.3g} > 2 x PyTorch {dtype} error {torch_err:.3g} + {HALF_SLACK}"
        )
    else:
        tol = 1e-5 if dtype == torch.float32 else 1e-9
        scale = max(ref.abs().max().item(), floor)
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * scale, msg=lambda m: f"{name}: {m}")


def grad_input_scale(case: DenseCase, training: bool) -> float:
    """max |w * invstd * grad_out|: the size of the terms whose difference is grad_input."""
    x = torch.cat([t.double() for t in case.xs], 1)
    if x.numel() == 0:
        return 0.0
    dims = [0] + list(range(2, x.dim()))
    var = x.var(dims, unbiased=False) if training else case.rv.double().cpu()
    return ((case.w.double().abs().cpu() / (var.cpu() + EPS).sqrt()).max() * case.dy.double().abs().max().cpu()).item()


def flat(res: dict) -> dict:
    """res with gx expanded into gx0, gx1, ..."""
    out = {k: v for k, v in res.items() if k != "gx"}
    out.update({f"gx{j}": g for j, g in enumerate(res["gx"])})
    return out


def check_parity(case: DenseCase, training, activation, negative_slope=0.01, use_stats=False, affine=True) -> dict:
    dtype = case.dtype
    kw = {"negative_slope": negative_slope, "use_stats": use_stats, "affine": affine}
    fused = run(dense_batch_norm_act, case, training, activation, **kw)
    ref = run(reference_dense_batch_norm_act, case, training, activation, cast=torch.float64, **kw)
    # PyTorch's own same-dtype path: torch.cat + F.batch_norm (its own statistics) + activation.
    same = (
        flat(run(reference_dense_batch_norm_act, case, training, activation, **{**kw, "use_stats": False}))
        if dtype in HALF
        else {}
    )
    out = fused["out"]
    assert out.dtype == dtype and out.shape == case.shape
    fmt = output_format(out.dim(), case.layout)
    if out.numel() > 0:
        assert out.is_contiguous(memory_format=fmt), (case.layout, out.stride())
    for j, g in enumerate(fused["gx"]):
        assert (g is None) == (not case.requires[j]), j
        if g is not None:
            assert g.dtype == dtype and g.shape == case.xs[j].shape, j
            if g.numel() > 0:
                assert g.is_contiguous(memory_format=fmt), (j, g.stride())
    if affine:
        assert fused["gw"].dtype == case.w.dtype and fused["gb"].dtype == case.b.dtype
    fused, ref = flat(fused), flat(ref)
    for name in fused:
        floor = grad_input_scale(case, training) if name.startswith("gx") else 0.0
        assert_matches(name, fused[name], ref[name], same.get(name), dtype, floor)
    return fused


# ----------------------------------------------------------------------------------------------------------------
# Parity with the float64 reference
# ----------------------------------------------------------------------------------------------------------------


@native
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_parity(dtype, layout, training):
    check_parity(DenseCase(CHANNELS, dtype, layout, seed=1), training, "relu")


@native
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("requires", [(True, False, True, False), (False, True, False, False), (False,) * 4])
def test_parity_some_inputs_need_grad(requires, training):
    """Gradients only for the inputs that require one (and only weight / bias when no input does)."""
    check_parity(DenseCase(CHANNELS, torch.float32, "contiguous", requires=requires, seed=2), training, "relu")


@native
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_parity_single_input(layout, dtype, training):
    check_parity(DenseCase((7,), dtype, layout, seed=3), training, "relu")


@native
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["identity", "leaky_relu"])
def test_parity_activations(activation, dtype, layout, training):
    check_parity(DenseCase(CHANNELS, dtype, layout, seed=4), training, activation, negative_slope=0.2)


SHAPES = [
    # (channels, N, spatial, layout)
    ((3, 4, 1), 6, (), "contiguous"),  # (N, C) inputs
    ((2, 5), 5, (9,), "contiguous"),  # (N, C, L)
    ((2, 3, 2), 2, (3, 4, 3), "channels_last"),  # 5-D
    ((2, 3, 2), 2, (3, 4, 3), "contiguous"),
    ((3, 1, 4), 2, (1, 1), "channels_last"),  # 1x1 spatial: channels_last and contiguous strides coincide
    ((3, 1, 4), 2, (1, 1), "contiguous"),
    ((7, 16, 9), 4, (9, 11), "contiguous"),  # runs long enough for the vector bodies, at odd offsets
    ((7, 16, 9), 4, (9, 11), "channels_last"),
    ((33, 1), 3, (5, 4), "channels_last"),
    # channels_last runs all inputs per row block: several blocks per thread, two threads' row chunks
    ((17, 12, 40), 4, (40, 40), "channels_last"),
]


# Every C_j a multiple of 4 (DenseNet channel counts): float32 channels_last takes the row-major walk (units of 8
# rows, 8- and 4-lane pieces, csrc/cpu/dense_kernel_impl.h); M = N * H * W leaves a partial last unit, and the larger
# case spans several units per thread and both threads' row chunks.
ROW_MAJOR_SHAPES = [
    ((36, 12, 12, 4), 3, (5, 7)),  # M = 105: 13 whole units and one of 1 row
    ((24, 12, 8, 12, 32), 4, (21, 19)),  # M = 1596: 4 rows in the last unit
]


@native
@pytest.mark.parametrize(
    ("training", "use_stats"), [(True, False), (True, True), (False, False)], ids=["train", "train-input-stats", "eval"]
)
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "identity"])
@pytest.mark.parametrize(("channels", "N", "spatial"), ROW_MAJOR_SHAPES, ids=lambda v: str(v).replace(" ", ""))
def test_parity_row_major(channels, N, spatial, activation, use_stats, training):
    case = DenseCase(channels, torch.float32, "channels_last", N=N, spatial=spatial, seed=17)
    check_parity(case, training, activation, negative_slope=0.2, use_stats=use_stats)


@native
def test_parity_row_major_streamed():
    """An output of 17 MB (above kStreamBytes): y and the dx are written through staging buffers with non-temporal
    stores."""
    case = DenseCase((36,) + (12,) * 8, torch.float32, "channels_last", N=32, spatial=(32, 32), seed=19, extra_steps=0)
    check_parity(case, True, "relu")


@native
@pytest.mark.parametrize("requires", [(True, False, True, False), (False, False, False, True), (False,) * 4])
def test_parity_row_major_some_grads(requires):
    """Only the wanted inputs' dx rows are written; weight/bias sums still cover every input."""
    case = DenseCase((36, 12, 12, 4), torch.float32, "channels_last", N=3, spatial=(5, 7), requires=requires, seed=18)
    check_parity(case, True, "relu")


@native
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("channels", "N", "spatial", "layout"), SHAPES, ids=lambda v: str(v).replace(" ", ""))
def test_parity_shapes(channels, N, spatial, layout, dtype, training):
    check_parity(DenseCase(channels, dtype, layout, N=N, spatial=spatial, seed=5), training, "relu")


@native
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_parity_without_params_or_running_stats(training):
    case = DenseCase(CHANNELS, seed=6)
    fused = run(dense_batch_norm_act, case, training, "relu", use_running=not training, affine=False)
    ref = run(reference_dense_batch_norm_act, case, training, "relu", cast=torch.float64, use_running=not training,
              affine=False)  # fmt: skip
    for name, got in flat(fused).items():
        assert_matches(name, got, flat(ref)[name], floor=grad_input_scale(case, training))


@native
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_parity_large_outputs(layout):
    """An input of >= 16 MB (written with non-temporal stores) at an odd channel offset and an odd plane size."""
    case = DenseCase((3, 64), torch.float32, layout, N=8, spatial=(95, 97), seed=7, extra_steps=0)
    assert case.xs[1].numel() * 4 >= 16 * 1024 * 1024
    check_parity(case, True, "relu")


# ----------------------------------------------------------------------------------------------------------------
# Statistics once per feature map: input_stats
# ----------------------------------------------------------------------------------------------------------------


@native
@pytest.mark.parametrize(
    ("dtype", "layout", "activation"),
    [
        (torch.float32, "contiguous", "relu"),
        (torch.float32, "channels_last", "leaky_relu"),
        (torch.float32, "mixed", "identity"),
        (torch.float64, "contiguous", "relu"),
        (torch.bfloat16, "channels_last", "relu"),
    ],
)
def test_input_stats_match_recomputing(dtype, layout, activation):
    """Precomputed per-input statistics give what the op computes itself: outputs, every gradient and the
    running statistics over several steps (float64 to ~1e-12; float32 / bf16 to float32 rounding of the stats)."""
    case = DenseCase(CHANNELS, dtype, layout, seed=10)
    # (the reference only in float64: in lower precision F.batch_norm's own arithmetic differs from the formula's)
    fns = (dense_batch_norm_act, reference_dense_batch_norm_act) if dtype == torch.float64 else (dense_batch_norm_act,)
    for fn in fns:
        own = flat(run(fn, case, True, activation, negative_slope=0.1))
        given = flat(run(fn, case, True, activation, negative_slope=0.1, use_stats=True))
        for name, want in own.items():
            got = given[name]
            if want is None:
                assert got is None, name
                continue
            scale = want.abs().max().double().item()
            if name.startswith("gx"):
                scale = max(scale, grad_input_scale(case, True))
            if dtype in HALF and (name == "out" or name.startswith("gx")):
                tol = 2 * torch.finfo(dtype).eps  # one rounding step of the result apart
            else:
                tol = 1e-12 if dtype == torch.float64 else 1e-6
            err = (got.double() - want.double()).abs().max().item()
            assert err <= tol * scale, f"{fn.__module__} {name}: {err:.3g} > {tol:.1g} x {scale:.3g}"
    # The fused op with given statistics against the float64 reference with the same (float64) statistics.
    check_parity(case, True, activation, negative_slope=0.1, use_stats=True)


@native
def test_input_stats_are_used():
    """The op normalises with, and updates the running statistics from, exactly the statistics it is given."""
    case = DenseCase(CHANNELS, torch.float64, "contiguous", seed=11)
    g = torch.Generator().manual_seed(12)
    stats = [(m + torch.randn(m.shape, generator=g, dtype=m.dtype), v * 2 + 0.5) for m, v in stats_of(case.xs)]
    results = []
    for fn in (dense_batch_norm_act, reference_dense_batch_norm_act):
        rm, rv = case.rm.clone(), case.rv.clone()
        out = fn(case.xs, rm, rv, case.w, case.b, True, 0.3, EPS, input_stats=stats)
        results.append((out, rm, rv))
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-12)
    mean, var = torch.cat([m for m, _ in stats]), torch.cat([v for _, v in stats])
    M = case.shape[0] * case.shape[2] * case.shape[3]
    torch.testing.assert_close(results[0][1], 0.7 * case.rm + 0.3 * mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[0][2], 0.7 * case.rv + 0.3 * var * M / (M - 1), rtol=1e-12, atol=1e-12)
    xhat = (torch.cat(case.xs, 1) - mean.view(1, -1, 1, 1)) / (var.view(1, -1, 1, 1) + EPS).sqrt()
    want = torch.relu(xhat * case.w.view(1, -1, 1, 1) + case.b.view(1, -1, 1, 1))
    torch.testing.assert_close(results[0][0], want, rtol=1e-12, atol=1e-12)


@native
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_given_stats_recompute_is_bitwise(dtype, layout):
    """What the memory-efficient layer relies on: the op called again with the same batch statistics and no running
    statistics returns bit for bit the same output, save_mean, save_invstd and mask (and has no side effects)."""
    case = DenseCase(CHANNELS, dtype, layout, N=4, spatial=(6, 7), seed=13)
    bm, bv = (torch.cat(t) for t in zip(*stats_of(case.xs)))
    rm, rv = case.rm.clone(), case.rv.clone()
    first = torch.ops.fusedres.dense_bn_act_forward(
        case.xs, case.w, case.b, rm, rv, bm, bv, True, 0.1, EPS, "leaky_relu", 0.1
    )
    snap = Snapshot(rm, rv, bm, bv, *case.xs)
    again = torch.ops.fusedres.dense_bn_act_forward(
        case.xs, case.w, case.b, None, None, bm, bv, True, 0.0, EPS, "leaky_relu", 0.1
    )
    for name, x, y in zip(("output", "save_mean", "save_invstd", "mask"), first, again):
        assert x.stride() == y.stride() and torch.equal(x, y), name
    assert snap.unchanged()
    # save_mean is the given mean itself; the op's own reduction finds the same statistics as bn_stats.
    own = torch.ops.fusedres.dense_bn_act_forward(
        case.xs, case.w, case.b, None, None, None, None, True, 0.1, EPS, "leaky_relu", 0.1
    )
    assert torch.equal(first[1], bm)
    torch.testing.assert_close(own[1], bm, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(own[2], first[2], rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# The mask, what autograd keeps, what backward computes
# ----------------------------------------------------------------------------------------------------------------


def memory_order(t: torch.Tensor) -> torch.Tensor:
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def unpack_mask(mask: torch.Tensor, numel: int) -> torch.Tensor:
    """Bit i of the mask = bit i % 8 of byte i // 8."""
    bits = (mask.cpu().to(torch.int32).unsqueeze(1) >> torch.arange(8)) & 1
    return bits.reshape(-1)[:numel].bool()


def check_mask_segments(case: DenseCase, out: torch.Tensor, mask: torch.Tensor, fmt) -> None:
    sizes = dense_mask_bytes(case.xs)
    assert mask.dtype == torch.uint8 and mask.shape == (sum(sizes),)
    c0 = b0 = 0
    for j, x in enumerate(case.xs):
        part = out[:, c0 : c0 + x.shape[1]].cpu().contiguous(memory_format=fmt)  # input j's channels, dense
        bits = unpack_mask(mask[b0 : b0 + sizes[j]], x.numel())
        positive = memory_order(part) > 0
        assert torch.equal(bits, positive), f"inputs[{j}]: {(bits != positive).sum().item()} bits differ"
        c0, b0 = c0 + x.shape[1], b0 + sizes[j]


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
@pytest.mark.parametrize(
    ("channels", "spatial", "layout"),
    [
        (CHANNELS, (4, 5), "contiguous"),
        (CHANNELS, (4, 5), "channels_last"),
        (CHANNELS, (4, 5), "mixed"),
        ((3, 1, 4), (1, 1), "channels_last"),
        ((2, 3, 2), (3, 4, 3), "channels_last"),
        ((33, 2), (), "contiguous"),
    ],
    ids=lambda v: str(v).replace(" ", ""),
)
def test_mask_layout(channels, spatial, layout, activation, dtype, device):
    """One segment per input: mask_bytes(inputs[j].numel()) bytes holding (z > 0) for input j's channels, in the
    memory order of input j made dense in the output's memory format."""
    case = DenseCase(channels, dtype, layout, spatial=spatial, seed=14, device=device)
    for training in (True, False):
        out, mean, invstd, mask = torch.ops.fusedres.dense_bn_act_forward(
            case.xs, case.w, case.b, case.rm.clone(), case.rv.clone(), None, None, training, 0.1, EPS, activation, 0.1
        )
        assert mean.shape == invstd.shape == (sum(channels),) and mean.dtype == invstd.dtype == torch.float32
        check_mask_segments(case, out, mask, output_format(out.dim(), layout))


@native
def test_identity_has_no_mask(device):
    case = DenseCase(CHANNELS, seed=15, device=device)
    *_, mask = torch.ops.fusedres.dense_bn_act_forward(
        case.xs, case.w, case.b, None, None, None, None, True, 0.1, EPS, "identity", 0.0
    )
    assert mask.dtype == torch.uint8 and mask.shape == (0,)


@native
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("use_stats", [False, True], ids=["own-stats", "input-stats"])
def test_saved_tensors(use_stats, layout, activation):
    """Autograd keeps the inputs themselves and O(C) + O(numel / 8) bytes: never the concatenation or the output."""
    case = DenseCase((4, 8, 6), torch.float32, layout, N=4, spatial=(6, 6), seed=16)
    xs = [x.requires_grad_() for x in case.xs]
    w, b = case.w.requires_grad_(), case.b.requires_grad_()
    stats = stats_of(xs) if use_stats else None
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = dense_batch_norm_act(xs, case.rm, case.rv, w, b, True, activation=activation, input_stats=stats)
    smallest = min(x.numel() * x.element_size() for x in xs)
    big = [t for t in saved if t.numel() * t.element_size() >= smallest]
    assert sorted(t.data_ptr() for t in big) == sorted(x.data_ptr() for x in xs), [tuple(t.shape) for t in big]
    small_bytes = sum(t.numel() * t.element_size() for t in saved if t.numel() * t.element_size() < smallest)
    C = out.shape[1]
    assert small_bytes <= sum(dense_mask_bytes(xs)) + 3 * C * 4, small_bytes
    torch.autograd.grad(out, (*xs, w, b), case.dy)  # and backward works from what was saved


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args))
        return func(*args, **(kwargs or {}))

    def backward_masks(self):
        return [
            (list(a[-2]), list(a[-1])) for f, a in self.calls if f is torch.ops.fusedres.dense_bn_act_backward.default
        ]


@native
@pytest.mark.parametrize(
    ("wants", "expected"),
    [
        ("0", [([True, False, False], [False, False])]),
        ("12", [([False, True, True], [False, False])]),
        ("w", [([False, False, False], [True, False])]),
        ("2b", [([False, False, True], [False, True])]),
        ("012wb", [([True, True, True], [True, True])]),
        ("", []),  # nothing requires grad: no autograd node at all
    ],
)
def test_backward_computes_only_what_is_needed(wants, expected):
    case = DenseCase((2, 3, 4), seed=17)
    xs = [x.requires_grad_(str(j) in wants) for j, x in enumerate(case.xs)]
    w, b = case.w.requires_grad_("w" in wants), case.b.requires_grad_("b" in wants)
    out = dense_batch_norm_act(xs, case.rm, case.rv, w, b, True)
    leaves = [t for t in (*xs, w, b) if t.requires_grad]
    assert out.requires_grad == bool(leaves)
    log = OpLog()
    with log:
        if leaves:
            torch.autograd.grad(out, leaves, case.dy)
    assert log.backward_masks() == expected


# ----------------------------------------------------------------------------------------------------------------
# gradcheck, double backward, opcheck, fake kernels, torch.compile
# ----------------------------------------------------------------------------------------------------------------


@native
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "mixed"])
def test_gradcheck(layout, training, activation):
    case = DenseCase((2, 1, 3), torch.float64, layout, N=3, spatial=(2, 2), seed=18)
    rm, rv = (None, None) if training else (case.rm, case.rv)
    z = reference_dense_batch_norm_act(case.xs, rm, rv, case.w, case.b, training, 0.1, EPS, activation="identity")
    # A kink of relu / leaky_relu within the finite-difference step would make the numerical Jacobian wrong.
    assert z.abs().min() > 1e-3, "pick another seed: some z is too close to 0"

    def fn(w, b, *xs):
        return dense_batch_norm_act(list(xs), rm, rv, w, b, training, 0.1, EPS, activation=activation,
                                    negative_slope=0.3)  # fmt: skip

    inputs = tuple(t.requires_grad_() for t in (case.w, case.b, *case.xs))
    assert torch.autograd.gradcheck(fn, inputs)


@native
def test_double_backward_refused():
    case = DenseCase((2, 3), torch.float64, seed=19)
    xs = [x.requires_grad_() for x in case.xs]
    w = case.w.requires_grad_()
    out = dense_batch_norm_act(xs, None, None, w, case.b, True)
    gx0, gw = torch.autograd.grad(out, (xs[0], w), case.dy, create_graph=True)
    want = torch.autograd.grad(dense_batch_norm_act(xs, None, None, w, case.b, True), (xs[0], w), case.dy)
    assert torch.equal(gx0, want[0]) and torch.equal(gw, want[1])
    with pytest.raises(RuntimeError, match=DOUBLE_BACKWARD_ERROR):
        torch.autograd.grad(gx0.sum(), xs[1])
    with pytest.raises(RuntimeError, match=DOUBLE_BACKWARD_ERROR):
        (gw**2).sum().backward()


def forward_args(case, training=True, running=True, stats=False, activation="relu"):
    rm, rv = (case.rm, case.rv) if running else (None, None)
    bm = bv = None
    if stats:
        bm, bv = (torch.cat(t) for t in zip(*stats_of(case.xs)))
    return (case.xs, case.w, case.b, rm, rv, bm, bv, training, 0.1, EPS, activation, 0.01)


@native
@pytest.mark.parametrize(
    ("training", "running", "stats", "layout"),
    [
        (True, True, False, "contiguous"),
        (True, False, False, "contiguous"),
        (True, True, True, "contiguous"),
        (False, True, False, "contiguous"),
        (True, True, True, "mixed"),
    ],
)
def test_opcheck_forward(training, running, stats, layout):
    case = DenseCase((2, 3, 1), torch.float32, layout, seed=20)
    torch.library.opcheck(torch.ops.fusedres.dense_bn_act_forward.default, forward_args(case, training, running, stats))


@native
@pytest.mark.parametrize(("training", "stats", "layout"), [(True, False, "channels_last"), (True, True, "mixed")])
def test_opcheck_differentiable_op(training, stats, layout):
    """fusedres::dense_bn_act (the eager path: a C++ autograd node) with inputs that require grad, so opcheck also
    checks its autograd registration against the fake kernel."""
    case = DenseCase((2, 3, 1), torch.float32, layout, seed=22)
    args = list(forward_args(case, training, True, stats))
    args[0] = [x.detach().requires_grad_() for x in case.xs]
    args[1], args[2] = case.w.detach().requires_grad_(), case.b.detach().requires_grad_()
    torch.library.opcheck(torch.ops.fusedres.dense_bn_act.default, tuple(args))


@native
@pytest.mark.parametrize(
    ("activation", "input_mask", "param_mask", "layout"),
    [
        ("relu", [True, True, True], [True, True], "contiguous"),
        ("leaky_relu", [False, True, False], [False, True], "channels_last"),
        ("identity", [False, False, False], [True, False], "mixed"),
    ],
)
def test_opcheck_backward(activation, input_mask, param_mask, layout):
    case = DenseCase((2, 3, 1), torch.float32, layout, seed=21)
    _, mean, invstd, mask = torch.ops.fusedres.dense_bn_act_forward(*forward_args(case, activation=activation))
    args = (case.dy, case.xs, case.w, mean, invstd, mask, True, activation, 0.01, input_mask, param_mask)
    torch.library.opcheck(torch.ops.fusedres.dense_bn_act_backward.default, args)


FAKE_CASES = [
    ((3, 4), (), "contiguous", torch.float32),
    ((2, 5), (7,), "contiguous", torch.bfloat16),
    (CHANNELS, (4, 5), "contiguous", torch.float16),
    (CHANNELS, (4, 5), "channels_last", torch.float32),
    (CHANNELS, (4, 5), "mixed", torch.float64),
    ((3, 1, 4), (1, 1), "channels_last", torch.float32),
    ((3, 1, 4), (1, 1), "contiguous", torch.float32),
    ((1, 3), (1, 4), "channels_last", torch.float32),
    ((2, 3), (2, 4, 3), "channels_last", torch.bfloat16),
]


def meta_of(t):
    return (t.shape, t.stride(), t.dtype, t.device)


@native
@pytest.mark.parametrize(("channels", "spatial", "layout", "dtype"), FAKE_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_fake_kernels_match_real(channels, spatial, layout, dtype):
    """Shapes, strides and dtypes of the fake kernels equal the real ones (what Inductor trusts)."""
    weight_dtypes = [dtype, torch.float32] if dtype != torch.float32 else [dtype]
    for activation, wdt, N in itertools.product(("relu", "identity"), weight_dtypes, (3, 0)):
        case = DenseCase(channels, dtype, layout, N=N, spatial=spatial, param_dtype=wdt, seed=22)
        fwd = forward_args(case, activation=activation)
        real = torch.ops.fusedres.dense_bn_act_forward(*fwd)
        masks = [([True] * len(channels), [True, True]), ([False] * len(channels), [False, True])]
        masks.append(([j % 2 == 0 for j in range(len(channels))], [True, False]))

        def bwd(dy, xs, w, out, m, activation=activation):
            return torch.ops.fusedres.dense_bn_act_backward(dy, xs, w, *out[1:], True, activation, 0.01, *m)

        real_bwd = [bwd(case.dy, case.xs, case.w, real, m) for m in masks]
        with FakeTensorMode() as mode:
            fake_fwd = tuple(
                [mode.from_tensor(x) for x in a] if isinstance(a, list) else mode.from_tensor(a)
                if isinstance(a, torch.Tensor) else a for a in fwd
            )  # fmt: skip
            fake = torch.ops.fusedres.dense_bn_act_forward(*fake_fwd)
            fdy, fw = mode.from_tensor(case.dy), mode.from_tensor(case.w)
            fake_bwd = [bwd(fdy, fake_fwd[0], fw, fake, m) for m in masks]
        assert [meta_of(t) for t in fake] == [meta_of(t) for t in real], (activation, wdt, N)
        for m, f, r in zip(masks, fake_bwd, real_bwd):
            assert [meta_of(t) for t in f[0]] == [meta_of(t) for t in r[0]], (activation, wdt, N, m)
            assert [meta_of(t) for t in f[1:]] == [meta_of(t) for t in r[1:]], (activation, wdt, N, m)


@native
def test_compile_fullgraph():
    """torch.compile(fullgraph=True), training: a call computing its own statistics and one given per-input
    statistics (bn_stats in the graph); outputs, gradients and running statistics over two steps."""
    torch._dynamo.reset()

    def f(xs, w, b, rm, rv, rm2, rv2):
        y1 = dense_batch_norm_act(xs, rm, rv, w, b, True, 0.1, EPS)
        y2 = dense_batch_norm_act(xs, rm2, rv2, w, b, True, 0.1, EPS, activation="leaky_relu",
                                  input_stats=[bn_stats(x) for x in xs])  # fmt: skip
        return y1, y2

    compiled = torch.compile(f, fullgraph=True)
    case = DenseCase((3, 5, 2), torch.float32, "channels_last", seed=23)
    results = []
    for fn in (f, compiled):
        w, b = case.w.clone().requires_grad_(), case.b.clone().requires_grad_()
        running = [t.clone() for t in (case.rm, case.rv, case.rm, case.rv)]
        steps = []
        for step in range(2):
            xs = [(x * (1 + step)).requires_grad_(j != 1) for j, x in enumerate(case.xs)]
            y1, y2 = fn(xs, w, b, *running)
            grads = torch.autograd.grad((y1, y2), (xs[0], xs[2], w, b), (case.dy, case.dy * 0.5))
            steps.append((y1.detach(), y2.detach(), grads))
            assert y1.is_contiguous(memory_format=torch.channels_last)
        results.append((steps, running))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)


@native
@pytest.mark.filterwarnings("error:.*may not alias any inputs:UserWarning")
def test_compile_module_eval():
    """No-grad eval path through the module (the op is called directly) under fullgraph compile."""
    torch._dynamo.reset()
    case = DenseCase(CHANNELS, torch.float32, "contiguous", seed=24)
    m = DenseBatchNormAct2d(sum(CHANNELS), activation="leaky_relu").eval()
    with torch.no_grad():
        m.running_mean.copy_(case.rm)
        m.running_var.copy_(case.rv)
        torch.testing.assert_close(torch.compile(m, fullgraph=True)(case.xs), m(case.xs), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Empty tensors and one value per channel
# ----------------------------------------------------------------------------------------------------------------


@native
@pytest.mark.parametrize("use_stats", [False, True], ids=["own-stats", "input-stats"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("N", "spatial", "layout"), [(0, (3, 3), "contiguous"), (0, (3, 3), "channels_last"),
                                                      (2, (0, 3), "contiguous"), (0, (), "contiguous")])  # fmt: skip
def test_empty(N, spatial, layout, training, use_stats):
    """Empty batch / spatial size: empty output and input gradients, zero parameter gradients, running statistics
    untouched (what F.batch_norm on the concatenation does)."""
    if use_stats and not training:
        pytest.skip("input_stats are training-only")
    case = DenseCase((3, 2), torch.float32, layout, N=N, spatial=spatial, seed=25, extra_steps=0)
    rm0, rv0 = case.rm.clone(), case.rv.clone()
    fused = check_parity(case, training, "relu", use_stats=use_stats)
    assert fused["out"].shape == (N, 5, *spatial)
    assert fused["gx0"].shape == case.xs[0].shape and fused["gx1"].shape == case.xs[1].shape
    assert torch.equal(fused["gw"], torch.zeros(5)) and torch.equal(fused["gb"], torch.zeros(5))
    assert torch.equal(fused["rm"], rm0) and torch.equal(fused["rv"], rv0)


@native
@pytest.mark.parametrize("fn", [dense_batch_norm_act, reference_dense_batch_norm_act], ids=["fused", "reference"])
@pytest.mark.parametrize("use_stats", [False, True], ids=["own-stats", "input-stats"])
def test_one_value_per_channel_training(use_stats, fn, device):
    xs = [torch.randn(1, c, 1, 1, device=device) for c in (3, 2)]
    rm, rv = torch.zeros(5, device=device), torch.ones(5, device=device)
    snap = Snapshot(rm, rv)
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training, got input size "
                                         r"\[1, 5, 1, 1\]"):  # fmt: skip
        fn(xs, rm, rv, training=True, input_stats=stats_of(xs) if use_stats else None)
    assert snap.unchanged()
    assert fn(xs, rm, rv, training=False).shape == (1, 5, 1, 1)  # fine in eval mode


# ----------------------------------------------------------------------------------------------------------------
# Bad arguments: the message names the argument, and no state changes
# ----------------------------------------------------------------------------------------------------------------


def expect_error(device, expect, match, fns=(dense_batch_norm_act, reference_dense_batch_norm_act), **changes):
    """Both functionals with one argument spoiled: the error names it, the running statistics are unchanged."""
    case = DenseCase(CHANNELS, seed=30, device=device)
    for fn in fns:
        args = {
            "inputs": list(case.xs),
            "running_mean": case.rm,
            "running_var": case.rv,
            "weight": case.w,
            "bias": case.b,
            "training": True,
        }
        args.update({k: v(case) if callable(v) else v for k, v in changes.items()})
        snap = Snapshot(case.rm, case.rv)
        with pytest.raises(expect, match=match):
            fn(**args)
        assert snap.unchanged(), fn


def test_error_input_list():
    expect_error("cpu", ValueError, r"inputs must be a non-empty list of Tensors, got an empty list", inputs=[])
    expect_error("cpu", TypeError, r"inputs must be a list or tuple of Tensors, got Tensor",
                 inputs=lambda c: c.xs[0])  # fmt: skip
    expect_error("cpu", TypeError, r"inputs\[1\] must be a Tensor, got float", inputs=lambda c: [c.xs[0], 1.0])
    expect_error("cpu", TypeError, r"inputs must be a list or tuple of Tensors, got NoneType", inputs=None)


def test_error_input_shapes():
    bad_n = r"inputs\[2\] must have the batch size and spatial size of inputs\[0\] \(shape \[3, \*, 4, 5\]; only the "
    expect_error("cpu", ValueError, bad_n + r".*got shape \[4, 12, 4, 5\]",
                 inputs=lambda c: [c.xs[0], c.xs[1], torch.randn(4, 12, 4, 5), c.xs[3]])  # fmt: skip
    expect_error("cpu", ValueError, bad_n + r".*got shape \[3, 12, 4, 6\]",
                 inputs=lambda c: [c.xs[0], c.xs[1], torch.randn(3, 12, 4, 6), c.xs[3]])  # fmt: skip
    expect_error("cpu", ValueError, r"inputs\[1\] must have the batch size .* got shape \[3, 5, 20\]",
                 inputs=lambda c: [c.xs[0], c.xs[1].flatten(2)])  # fmt: skip
    expect_error("cpu", ValueError, r"inputs\[0\] must have 2 to 5 dimensions .* got 1 dimensions",
                 inputs=[torch.randn(4)])  # fmt: skip


def test_error_input_dtypes():
    expect_error("cpu", ValueError, r"inputs\[3\] must have the dtype of inputs\[0\] \(torch.float32\), got "
                 r"torch.float64", inputs=lambda c: [*c.xs[:3], c.xs[3].double()])  # fmt: skip
    expect_error("cpu", TypeError, r"inputs must have a floating dtype \(float32, float64, bfloat16 or float16\), "
                 r"got torch.int64", inputs=[torch.ones(3, 2, 2, 2, dtype=torch.long)] * 2)  # fmt: skip


@native
@pytest.mark.needs_cuda
def test_error_input_device():
    expect_error("cuda", ValueError, r"inputs\[1\] must be on the device of inputs\[0\] \(cuda:0\), got cpu",
                 inputs=lambda c: [c.xs[0], c.xs[1].cpu()])  # fmt: skip


@native
@pytest.mark.parametrize("arg", ["weight", "bias", "running_mean", "running_var"])
def test_error_channel_count_mismatch(arg, device):
    expect_error(device, (RuntimeError, ValueError), rf"{arg} must be a 1-D tensor with 21 elements",
                 **{arg: torch.ones(20, device=device)})  # fmt: skip


def test_error_input_stats():
    def stats(c):
        return stats_of(c.xs)

    expect_error("cpu", ValueError, r"input_stats must have one \(mean, var\) pair per input \(4\), got 3",
                 input_stats=lambda c: stats(c)[:3])  # fmt: skip
    expect_error("cpu", ValueError, r"input_stats\[2\]\[1\] \(var of inputs\[2\]\) must be a 1-D tensor with 12 "
                 r"elements \(the channels of inputs\[2\]\), got shape \[5\]",
                 input_stats=lambda c: [*stats(c)[:2], (stats(c)[2][0], stats(c)[1][1]), stats(c)[3]])  # fmt: skip
    expect_error("cpu", ValueError, r"input_stats\[0\]\[0\] \(mean of inputs\[0\]\) must have dtype torch.float32 "
                 r"\(the statistics dtype of torch.float32 inputs.*got torch.float64",
                 input_stats=lambda c: [(m.double(), v) for m, v in stats(c)])  # fmt: skip
    expect_error("cpu", TypeError, r"input_stats\[1\] must be a \(mean, var\) pair of Tensors, got Tensor",
                 input_stats=lambda c: [stats(c)[0], stats(c)[1][0], *stats(c)[2:]])  # fmt: skip
    expect_error("cpu", TypeError, r"input_stats\[0\]\[1\] \(var of inputs\[0\]\) must be a Tensor, got float",
                 input_stats=lambda c: [(stats(c)[0][0], 1.0), *stats(c)[1:]])  # fmt: skip
    expect_error("cpu", ValueError, r"input_stats \(precomputed batch statistics\) can only be given when "
                 r"training=True", training=False, input_stats=stats)  # fmt: skip


def test_error_python_arguments():
    expect_error("cpu", ValueError, r"activation must be one of 'relu', 'identity', 'leaky_relu' for "
                 r"dense_batch_norm_act, got 'gelu'", activation="gelu")  # fmt: skip
    # relu6 / silu are bn_act's only: the dense kernels do not implement them (issue 13 item 4).
    for act in ("relu6", "silu"):
        expect_error("cpu", ValueError, r"activation must be one of 'relu', 'identity', 'leaky_relu' for "
                     rf"dense_batch_norm_act, got '{act}'", activation=act)  # fmt: skip
    expect_error("cpu", TypeError, r"momentum must be a float, got None", momentum=None)


@native
def test_error_kernel_checks_leave_state_alone():
    """Checks only the op makes (eval without running statistics; a bad eps) change nothing either."""
    expect_error("cpu", RuntimeError, "running_mean and running_var must be given when training=False",
                 fns=(dense_batch_norm_act,), training=False, running_mean=None, running_var=None)  # fmt: skip
    expect_error("cpu", RuntimeError, "eps must be positive", fns=(dense_batch_norm_act,), eps=-1.0)


# ----------------------------------------------------------------------------------------------------------------
# The module
# ----------------------------------------------------------------------------------------------------------------


def module_pair(C, seed=40, **kw):
    torch.manual_seed(seed)
    ref = nn.BatchNorm2d(C, **kw)
    if ref.affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-0.5, 0.5)
    fused = DenseBatchNormAct2d(C, **kw)
    fused.load_state_dict(ref.state_dict())
    return fused, ref


def assert_same_state(fused, ref):
    sf, sr = fused.state_dict(), ref.state_dict()
    assert list(sf) == list(sr)
    for k in sf:
        torch.testing.assert_close(sf[k], sr[k], rtol=1e-6, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def module_step(fused, ref, xs, dy, use_stats=False):
    """One call of both modules; compares the output and every gradient (inputs, parameters)."""
    xf = [x.clone().requires_grad_() for x in xs]
    xr = [x.clone().requires_grad_() for x in xs]
    out_f = fused(xf, input_stats=stats_of(xf) if use_stats else None)
    out_r = torch.relu(ref(torch.cat(xr, 1)))
    torch.testing.assert_close(out_f, out_r, rtol=1e-5, atol=1e-5)
    grads_f = torch.autograd.grad(out_f, xf + list(fused.parameters()), dy)
    grads_r = torch.autograd.grad(out_r, xr + list(ref.parameters()), dy)
    torch.testing.assert_close(grads_f, grads_r, rtol=1e-5, atol=1e-5)


@native
@pytest.mark.parametrize("use_stats", [False, True], ids=["own-stats", "input-stats"])
@pytest.mark.parametrize(
    "kw",
    [{}, {"momentum": None}, {"momentum": 0.3, "affine": False}, {"track_running_stats": False}, {"eps": 1e-3}],
    ids=["default", "momentum-None", "no-affine", "no-running-stats", "eps"],
)
def test_module_matches_torch(kw, use_stats):
    """Several training steps then eval: outputs, all gradients, buffers and num_batches_tracked as
    nn.BatchNorm2d over the concatenation."""
    fused, ref = module_pair(sum(CHANNELS), **kw)
    g = torch.Generator().manual_seed(41)
    for step in range(3):
        xs = [torch.randn(3, c, 4, 4, generator=g) * (1 + step) + step for c in CHANNELS]
        module_step(fused, ref, xs, torch.randn(3, sum(CHANNELS), 4, 4, generator=g), use_stats)
        assert_same_state(fused, ref)
    fused.eval()
    ref.eval()
    xs = [torch.randn(3, c, 4, 4, generator=g) for c in CHANNELS]
    module_step(fused, ref, xs, torch.randn(3, sum(CHANNELS), 4, 4, generator=g))
    assert_same_state(fused, ref)
    if ref.track_running_stats:
        assert fused.num_batches_tracked.item() == 3


@native
def test_module_tensor_input_and_layout():
    fused, ref = module_pair(8, seed=42)
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    module_step(fused, ref, [x], torch.randn(2, 8, 4, 4))
    out = fused(x)  # a plain Tensor is a one-input list
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, torch.relu(ref(x)), rtol=1e-5, atol=1e-5)


@native
def test_module_fused_false_is_the_reference():
    fused = DenseBatchNormAct2d(sum(CHANNELS), activation="leaky_relu")
    plain = DenseBatchNormAct2d(sum(CHANNELS), activation="leaky_relu", fused=False)
    plain.load_state_dict(fused.state_dict())
    g = torch.Generator().manual_seed(43)
    for _ in range(3):
        xs = [torch.randn(3, c, 4, 4, generator=g) for c in CHANNELS]
        torch.testing.assert_close(fused(xs), plain(xs), rtol=1e-5, atol=1e-5)
    assert_same_state(fused, plain)


def test_module_state_dict_and_repr():
    src = nn.BatchNorm2d(6)
    with torch.no_grad():
        for t in (src.weight, src.bias, src.running_mean):
            t.normal_()
        src.num_batches_tracked.fill_(7)
    m = DenseBatchNormAct2d(6, fused=False)
    assert isinstance(m, nn.BatchNorm2d)
    assert list(m.state_dict()) == list(src.state_dict())
    m.load_state_dict(src.state_dict(), strict=True)
    assert_same_state(m, src)
    r = repr(DenseBatchNormAct2d(4, activation="leaky_relu", negative_slope=0.2, fused=False))
    assert r.startswith("DenseBatchNormAct2d(4, eps=1e-05") and "negative_slope=0.2" in r and "fused=False" in r


@native
def test_module_errors_leave_state_alone():
    m = DenseBatchNormAct2d(sum(CHANNELS))
    snap = Snapshot(m.running_mean, m.running_var, m.num_batches_tracked)
    xs = [torch.randn(3, c, 4, 4) for c in CHANNELS]
    with pytest.raises(ValueError, match=r"inputs must have num_features=21 channels in all, got 20 \(3 \+ 5 \+ 12\)"):
        m(xs[:3])
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        m([x.flatten(2) for x in xs])
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        m([torch.randn(1, c, 1, 1) for c in CHANNELS])
    with pytest.raises(ValueError, match=r"input_stats must have one \(mean, var\) pair per input"):
        m(xs, input_stats=stats_of(xs)[:2])
    assert snap.unchanged()


# ----------------------------------------------------------------------------------------------------------------
# Fallback
# ----------------------------------------------------------------------------------------------------------------


def test_fallback_to_reference(monkeypatch):
    """Without a kernel for the device, the functional runs the reference (and says so once)."""
    import fusedres.ops.dense as mod

    monkeypatch.setattr(mod, "_NATIVE_DEVICE_TYPES", frozenset())
    monkeypatch.setattr(mod, "_warned_devices", set())
    monkeypatch.setattr(mod._native, "native_loaded", True)
    case = DenseCase(CHANNELS, seed=50)
    with pytest.warns(RuntimeWarning, match="dense_batch_norm_act: .* using the pure PyTorch reference"):
        out = dense_batch_norm_act(case.xs, case.rm.clone(), case.rv.clone(), case.w, case.b, True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dense_batch_norm_act(case.xs, case.rm.clone(), case.rv.clone(), case.w, case.b, True)
    ref = reference_dense_batch_norm_act(case.xs, case.rm.clone(), case.rv.clone(), case.w, case.b, True)
    assert torch.equal(out, ref)


def test_exports():
    assert fusedres.dense_batch_norm_act is fusedres.ops.dense_batch_norm_act
    assert fusedres.reference.dense_batch_norm_act is reference_dense_batch_norm_act
    assert fusedres.nn.DenseBatchNormAct2d is DenseBatchNormAct2d


# ----------------------------------------------------------------------------------------------------------------
# CUDA
# ----------------------------------------------------------------------------------------------------------------


def assert_devices_close(name, got_cuda, want_cpu, dtype):
    if want_cpu is None:
        assert got_cuda is None, name
        return
    got = got_cuda.cpu()
    assert got.shape == want_cpu.shape and got.dtype == want_cpu.dtype, name
    if want_cpu.numel() == 0:
        return
    scale = want_cpu.abs().max().double().item()
    if dtype in HALF and got.dtype == dtype:
        rtol, atol = torch.finfo(dtype).eps, 1e-4 * scale
    elif dtype == torch.float64:
        rtol, atol = 1e-10, 1e-10 * scale
    else:
        rtol, atol = 1e-5, 1e-5 * scale
    torch.testing.assert_close(got, want_cpu, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@native
@pytest.mark.needs_cuda
@pytest.mark.parametrize("use_stats", [False, True], ids=["own-stats", "input-stats"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_cuda_vs_cpu(dtype, layout, training, use_stats):
    if use_stats and not training:
        pytest.skip("input_stats are training-only")
    case = DenseCase((3, 5, 12, 1, 40), dtype, layout, N=4, spatial=(9, 7), seed=60)
    cuda_case = case.to("cuda")
    cpu = flat(run(dense_batch_norm_act, case, training, "relu", use_stats=use_stats))
    gpu = flat(run(dense_batch_norm_act, cuda_case, training, "relu", use_stats=use_stats))
    assert gpu["out"].is_cuda and gpu["out"].stride() == cpu["out"].stride()
    for name in cpu:
        assert_devices_close(name, gpu[name], cpu[name], dtype)
    _, _, _, mask_cpu = torch.ops.fusedres.dense_bn_act_forward(*forward_args(case, training))
    _, _, _, mask_gpu = torch.ops.fusedres.dense_bn_act_forward(*forward_args(cuda_case, training))
    assert mask_gpu.shape == mask_cpu.shape
    sizes, b0 = dense_mask_bytes(case.xs), 0
    for j, x in enumerate(case.xs):
        bits_cpu = unpack_mask(mask_cpu[b0 : b0 + sizes[j]], x.numel())
        bits_gpu = unpack_mask(mask_gpu[b0 : b0 + sizes[j]], x.numel())
        assert torch.equal(bits_gpu, bits_cpu), f"inputs[{j}]: {(bits_gpu != bits_cpu).sum().item()} bits differ"
        b0 += sizes[j]


@native
@pytest.mark.needs_cuda
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_vs_reference(dtype, layout, training):
    """CUDA against the float64 reference directly (the same bar as the CPU parity tests), odd channel counts."""
    check_parity(DenseCase(CHANNELS, dtype, layout, seed=61, device="cuda"), training, "relu")
    check_parity(DenseCase((7, 16, 9), dtype, layout, N=4, spatial=(9, 11), seed=62, device="cuda"), training,
                 "leaky_relu", negative_slope=0.2)  # fmt: skip


@native
@pytest.mark.needs_cuda
def test_cuda_compile_fullgraph():
    torch._dynamo.reset()
    case = DenseCase((3, 5, 2), torch.float32, "channels_last", seed=63, device="cuda")

    def f(xs, w, b, rm, rv):
        return dense_batch_norm_act(xs, rm, rv, w, b, True, 0.1, EPS, input_stats=[bn_stats(x) for x in xs])

    results = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        xs = [x.clone().requires_grad_() for x in case.xs]
        w, b = case.w.clone().requires_grad_(), case.b.clone().requires_grad_()
        rm, rv = case.rm.clone(), case.rv.clone()
        out = fn(xs, w, b, rm, rv)
        results.append((out, torch.autograd.grad(out, (*xs, w, b), case.dy.cuda()), rm, rv))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)
