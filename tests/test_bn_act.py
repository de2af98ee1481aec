"""fusedres.batch_norm_act / torch.ops.fusedres.bn_act_* / fusedres.nn.BatchNormAct*d.

Oracle: fusedres.reference.batch_norm_act (F.batch_norm + add + activation) run in float64 on the same values.
float32/float64 must match it to ~1e-5 / ~1e-9 relative; bfloat16/float16 must be within 2x the error of
PyTorch's own same-dtype path (plus a float32-level slack for cases where that error is ~0).
"""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import fusedres
from fusedres import batch_norm_act
from fusedres.nn import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from fusedres.ops.bn_act import DOUBLE_BACKWARD_ERROR, mask_bytes
from fusedres.reference import batch_norm_act as reference_batch_norm_act

native = pytest.mark.needs_native

HALF = (torch.bfloat16, torch.float16)
ALL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
ACTIVATIONS = ("relu", "identity", "leaky_relu", "relu6", "silu")
# relu6 and silu (issue 13 item 4) run the whole relu matrix too: test_parity_new_activations_4d.
NEW_ACTIVATIONS = ("relu6", "silu")
ALL_ACTIVATIONS_MESSAGE = "activation must be one of 'relu', 'identity', 'leaky_relu', 'relu6', 'silu'"
EPS = 1e-5
# Normalised (by the reference's max |value|) slack for bf16/fp16 comparisons whose PyTorch error is ~0
# (float32 accumulation noise of per-channel sums and running statistics).
HALF_SLACK = 1e-5


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


def cl_format(ndim: int) -> torch.memory_format:
    return torch.channels_last if ndim == 4 else torch.channels_last_3d


def expected_format(ndim: int, layout: str) -> torch.memory_format:
    return cl_format(ndim) if layout == "channels_last" else torch.contiguous_format


def arrange(t: torch.Tensor, dtype: torch.dtype, layout: str) -> torch.Tensor:
    """`t`'s values in `dtype` with the given memory layout."""
    t = t.to(dtype)
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=cl_format(t.dim()))
    if layout == "permuted":  # stored as (C, N, *spatial): non-contiguous, dense, not channels_last
        out = t.transpose(0, 1).contiguous().transpose(0, 1)
        assert not out.is_contiguous() or t.shape[0] <= 1 or t.shape[1] <= 1
        return out
    if layout == "sliced":  # every other element of the last dim: not dense
        big = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=dtype, device=t.device)
        out = big[..., ::2]
        out.copy_(t)
        return out
    raise AssertionError(layout)


class Case:
    """One set of arguments: input, residual, parameters, running statistics, grad_out, extra training batches."""

    def __init__(
        self,
        shape,
        dtype=torch.float32,
        layout="contiguous",
        *,
        residual=True,
        param_dtype=None,
        seed=0,
        extra_steps=2,
        device="cpu",
    ):
        g = torch.Generator().manual_seed(seed)
        C = shape[1]
        pdt = param_dtype or (torch.float32 if dtype in HALF else dtype)

        def full(scale=1.0, shift=0.0):
            values = torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift
            return arrange(values.to(device), dtype, layout)

        def vec(t):
            return t.to(pdt).to(device)

        self.layout = layout
        self.x = full(1.5, 0.3)
        self.r = full() if residual else None
        self.dy = full()
        self.w = vec(torch.randn(C, generator=g, dtype=torch.float64))
        self.b = vec(torch.randn(C, generator=g, dtype=torch.float64))
        self.rm = vec(torch.randn(C, generator=g, dtype=torch.float64) * 0.5)
        self.rv = vec(torch.rand(C, generator=g, dtype=torch.float64) + 0.5)
        self.extra = [full(1.2, -0.2) for _ in range(extra_steps)]

    def to(self, device):
        """The same values on `device`, full-size tensors in the same layout."""

        def move(t):
            if t is None:
                return None
            if t.dim() == 1:
                return t.to(device)
            return arrange(t.to(device), t.dtype, self.layout)

        out = object.__new__(Case)
        out.__dict__ = {
            k: ([move(t) for t in v] if isinstance(v, list) else (move(v) if isinstance(v, torch.Tensor) else v))
            for k, v in self.__dict__.items()
        }
        return out


def run(
    fn, case: Case, training: bool, activation: str, *, cast=None, momentum=0.1, negative_slope=0.01, use_running=True
) -> dict:
    """Forward + backward of `fn` on copies of `case` (cast to `cast` if given), then the extra training steps.

    Returns out, the gradients gx/gr/gw/gb (None for absent arguments) and the running statistics rm/rv.
    """

    def prep(t, grad=False):
        if t is None:
            return None
        t = t.detach().to(cast) if cast is not None else t.detach().clone(memory_format=torch.preserve_format)
        return t.requires_grad_(grad)

    x, r, w, b = prep(case.x, True), prep(case.r, True), prep(case.w, True), prep(case.b, True)
    rm, rv = (prep(case.rm), prep(case.rv)) if use_running else (None, None)
    dy = prep(case.dy)
    kw = {"activation": activation, "negative_slope": negative_slope}
    out = fn(x, rm, rv, w, b, training, momentum, EPS, residual=r, **kw)
    leaves = [t for t in (x, r, w, b) if t is not None]
    grads = iter(torch.autograd.grad(out, leaves, dy))
    res = {"out": out.detach()}
    for name, t in (("gx", x), ("gr", r), ("gw", w), ("gb", b)):
        res[name] = next(grads) if t is not None else None
    if training:
        with torch.no_grad():
            for xe in case.extra:
                fn(prep(xe), rm, rv, w, b, training, momentum, EPS, residual=r, **kw)
    res["rm"], res["rv"] = rm, rv
    return res


def max_rel_err(got: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    """max |got - ref| / max(max |ref|, floor) (ref float64)."""
    scale = max(ref.abs().max().item(), floor)
    return (got.double() - ref).abs().max().item() / max(scale, 1e-30)


def assert_matches(name: str, got, ref, same_dtype=None, dtype=torch.float32, floor=0.0) -> None:
    """`got` vs the float64 reference: rtol-style for fp32/fp64, the 2x-PyTorch rule for bf16/fp16.

    Errors are measured relative to max(max |ref|, floor): `floor` is the size of the terms a result is the
    difference of (training grad_input cancels terms of size |w * invstd * grad_out| and can be ~0 itself).
    """
    if ref is None:
        assert got is None, name
        return
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


def check_parity(case: Case, dtype, layout, training, activation, negative_slope=0.01) -> dict:
    fused = run(batch_norm_act, case, training, activation, negative_slope=negative_slope)
    ref = run(reference_batch_norm_act, case, training, activation, cast=torch.float64, negative_slope=negative_slope)
    same = (
        run(reference_batch_norm_act, case, training, activation, negative_slope=negative_slope)
        if dtype in HALF
        else {}
    )
    out = fused["out"]
    assert out.dtype == dtype and out.shape == case.x.shape
    if out.numel() > 0:  # (an empty tensor has no meaningful memory format)
        assert out.is_contiguous(memory_format=expected_format(out.dim(), layout)), (layout, out.stride())
    for name in ("gx", "gr"):
        if fused[name] is not None:
            assert fused[name].dtype == dtype, name
    for name, p in (("gw", case.w), ("gb", case.b)):
        assert fused[name].dtype == p.dtype, name
    for name in ("out", "gx", "gr", "gw", "gb", "rm", "rv"):
        floor = grad_input_scale(case, training) if name == "gx" else 0.0
        assert_matches(name, fused[name], ref[name], same.get(name), dtype, floor)
    return fused


def grad_input_scale(case: Case, training: bool) -> float:
    """max |w * invstd * grad_out|: the size of the terms whose difference is grad_input."""
    if case.x.numel() == 0:
        return 0.0
    x = case.x.double()
    dims = [0] + list(range(2, x.dim()))
    var = x.var(dims, unbiased=False) if training else case.rv.double()
    w = case.w.double().abs() if case.w is not None else torch.ones_like(var)
    return ((w / (var + EPS).sqrt()).max() * case.dy.double().abs().max()).item()


# ----------------------------------------------------------------------------------------------------------------
# Parity with the float64 reference
# ----------------------------------------------------------------------------------------------------------------


# Outputs of 16 MB and more are written with non-temporal stores, 64-byte aligned after a scalar head: sizes that
# reach that path, with planes / rows that start aligned (S = 96*96, C = 64) and misaligned (S = 49, C = 701).
@native
@pytest.mark.parametrize(
    "shape,layout",
    [
        ((8, 64, 96, 96), "contiguous"),
        ((64, 1340, 7, 7), "contiguous"),
        ((8, 64, 96, 96), "channels_last"),
        ((6000, 701), "contiguous"),
    ],
    ids=["nchw-aligned", "nchw-misaligned", "channels_last-aligned", "rows-misaligned"],
)
def test_large_outputs_streaming_stores(shape, layout):
    assert math.prod(shape) * 4 >= 16 * 1024 * 1024
    check_parity(
        Case(shape, torch.float32, layout, residual=True, seed=5, extra_steps=0), torch.float32, layout, True, "relu"
    )


@native
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "permuted"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_parity_4d(dtype, layout, residual, training):
    case = Case((3, 5, 4, 6), dtype, layout, residual=residual, seed=1)
    check_parity(case, dtype, layout, training, "relu")


@native
@pytest.mark.parametrize("activation", NEW_ACTIVATIONS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "permuted"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_parity_new_activations_4d(dtype, layout, residual, training, activation):
    """relu6 / silu through relu's matrix (test_parity_4d). The weights are scaled so that z reaches past 6."""
    case = Case((3, 5, 4, 6), dtype, layout, residual=residual, seed=1)
    with torch.no_grad():
        case.w.mul_(4)
    check_parity(case, dtype, layout, training, activation)


@native
@pytest.mark.parametrize("activation", NEW_ACTIVATIONS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("shape", "layout"),
    [
        ((4, 64, 5, 3), "channels_last"),  # C a multiple of the vector width: the channels_last row kernels
        ((3, 16, 8, 8), "contiguous"),  # planes of whole vectors: the direct-mask NCHW path
        ((2, 37, 3, 5), "channels_last"),  # odd C: general rows, partial vector tails in the column reductions
        ((5, 3, 7, 9), "contiguous"),  # odd planes: scalar tails
        ((9, 70), "contiguous"),  # (N, C) rows
    ],
    ids=["cl-rows", "nchw-direct", "cl-oddC", "nchw-odd", "2d"],
)
def test_parity_new_activations_paths(shape, layout, dtype, training, activation):
    """Every CPU kernel path (row kernels, direct and bit-buffer masks, tails) with relu6 / silu."""
    for residual in (True, False):
        case = Case(shape, dtype, layout, residual=residual, seed=3)
        with torch.no_grad():
            case.w.mul_(4)
        check_parity(case, dtype, layout, training, activation)


@native
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("activation", ["identity", "leaky_relu", "relu6", "silu"])
def test_parity_activations(activation, dtype, layout, training):
    case = Case((4, 3, 5, 3), dtype, layout, seed=2)
    check_parity(case, dtype, layout, training, activation, negative_slope=0.2)


SHAPE_LAYOUTS = [
    ((8, 3), "contiguous"),
    ((8, 3), "permuted"),
    ((6, 17), "contiguous"),
    ((5, 17, 9), "contiguous"),
    ((5, 17, 9), "permuted"),
    ((2, 3, 1, 1), "contiguous"),
    ((2, 3, 1, 1), "channels_last"),
    ((1, 3, 1, 2), "contiguous"),
    ((3, 33, 4, 5), "contiguous"),
    ((3, 33, 4, 5), "channels_last"),
    ((3, 33, 4, 5), "sliced"),
    ((2, 5, 3, 4, 3), "contiguous"),
    ((2, 5, 3, 4, 3), "channels_last"),
    ((2, 5, 3, 4, 3), "permuted"),
]


@native
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("shape", "layout"), SHAPE_LAYOUTS, ids=lambda v: str(v).replace(" ", ""))
def test_parity_shapes(shape, layout, dtype, training):
    check_parity(Case(shape, dtype, layout, seed=3), dtype, layout, training, "relu")


@native
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize(
    ("shape", "layout"), [((7, 6), "contiguous"), ((2, 4, 3, 2, 5), "channels_last")], ids=["2d", "5d-cl"]
)
def test_parity_activations_2d_5d(shape, layout, activation):
    for training in (True, False):
        check_parity(Case(shape, torch.float64, layout, seed=4), torch.float64, layout, training, activation)


@native
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_parity_half_params(dtype, layout):
    """Parameters and running statistics in the input's reduced dtype (a module converted with .to(dtype))."""
    for training in (True, False):
        check_parity(Case((4, 6, 3, 5), dtype, layout, param_dtype=dtype, seed=5), dtype, layout, training, "relu")


@native
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_parity_without_params_or_running_stats(training):
    case = Case((4, 5, 3, 3), seed=6)
    case.w = case.b = None
    fused = run(batch_norm_act, case, training, "relu", use_running=not training)
    ref = run(reference_batch_norm_act, case, training, "relu", cast=torch.float64, use_running=not training)
    for name in ("out", "gx", "gr"):
        assert_matches(name, fused[name], ref[name])


@native
@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    ("shape", "layout"),
    [
        ((0, 4, 3, 3), "contiguous"),
        ((0, 4, 3, 3), "channels_last"),
        ((2, 4, 0, 3), "contiguous"),
        ((0, 4), "contiguous"),
    ],
)
def test_empty(shape, layout, training, residual):
    """Empty batch / empty spatial dims: empty output and input gradients, zero parameter gradients, running
    statistics untouched (what F.batch_norm does)."""
    case = Case(shape, torch.float32, layout, residual=residual, seed=7, extra_steps=0)
    rm0, rv0 = case.rm.clone(), case.rv.clone()
    fused = check_parity(case, torch.float32, layout, training, "relu")
    assert fused["gx"].shape == shape
    assert torch.equal(fused["gw"], torch.zeros(4)) and torch.equal(fused["gb"], torch.zeros(4))
    assert torch.equal(fused["rm"], rm0) and torch.equal(fused["rv"], rv0)


def ulp32(t: torch.Tensor) -> torch.Tensor:
    """Spacing of float32 numbers at |t|."""
    t = t.abs().float()
    return (torch.nextafter(t, torch.full_like(t, float("inf"))) - t).double()


@native
@pytest.mark.parametrize(
    ("shape", "layout"), [((8, 4, 16, 16), "contiguous"), ((8, 4, 16, 16), "channels_last"), ((2048, 4), "contiguous")]
)
def test_large_mean_stability(shape, layout, device):
    """x = 1e4 + randn in float32 (a naive E[x^2] - E[x]^2 variance is off by orders of magnitude).

    The variance must match float64 to 1e-4 relative and the mean to one float32 ulp. The output and grad_input
    must match to 1e-4 relative beyond one float32 ulp of the input times invstd: the float32 x and save_mean
    themselves cannot locate the data more precisely than that (PyTorch's own float32 path has ~0.3 ulp).
    """
    g = torch.Generator().manual_seed(8)
    x = arrange(1e4 + torch.randn(shape, generator=g, dtype=torch.float64), torch.float32, layout).to(device)
    C = shape[1]
    rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
    xg = x.detach().requires_grad_()
    out = batch_norm_act(xg, rm, rv, None, None, True, 1.0, EPS, activation="identity")
    dy = torch.randn(shape, generator=g, dtype=torch.float64).float().to(device)
    (gx,) = torch.autograd.grad(out, xg, dy)

    x64 = x.detach().cpu().double().requires_grad_()
    rm64, rv64 = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    ref = reference_batch_norm_act(x64, rm64, rv64, None, None, True, 1.0, EPS, activation="identity")
    (gx64,) = torch.autograd.grad(ref, x64, dy.cpu().double())

    dims = [0] + list(range(2, len(shape)))
    xf = x.cpu()
    naive_var = (xf * xf).mean(dims) - xf.mean(dims) ** 2
    assert ((naive_var.double() - rv64).abs() / rv64).max() > 1e-2, "the test would not catch E[x²]-E[x]²"

    var_err = ((rv.cpu().double() - rv64).abs() / rv64).max().item()
    assert var_err < 1e-4, f"running_var relative error {var_err:.3g}"
    mean_err_ulps = ((rm.cpu().double() - rm64).abs() / ulp32(rm64)).max().item()
    assert mean_err_ulps <= 1.0, f"running_mean off by {mean_err_ulps:.3g} float32 ulps"
    inherent = (ulp32(x64.detach().abs().max()) / (rv64 * (shape[0] - 1) / shape[0] + EPS).sqrt().min()).item()
    for name, got, want in (("out", out.detach().cpu(), ref.detach()), ("gx", gx.cpu(), gx64)):
        err, scale = (got.double() - want).abs().max().item(), want.abs().max().item()
        if name == "gx":  # its inherent error scales with the size of grad_out's contribution
            inherent_abs = inherent * dy.abs().max().item() * (rv64.rsqrt().max().item())
        else:
            inherent_abs = inherent
        assert err <= 1e-4 * scale + inherent_abs, (
            f"{name}: max error {err:.3g} > 1e-4 x {scale:.3g} + {inherent_abs:.3g} (one float32 ulp of the input)"
        )


# ----------------------------------------------------------------------------------------------------------------
# The saved mask and what autograd keeps
# ----------------------------------------------------------------------------------------------------------------


def is_non_overlapping_and_dense(t: torch.Tensor) -> bool:
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def memory_order(t: torch.Tensor) -> torch.Tensor:
    """A dense tensor's elements in the order they lie in memory."""
    assert is_non_overlapping_and_dense(t)
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def unpack_mask(mask: torch.Tensor, numel: int) -> torch.Tensor:
    """Bit i of the mask = bit i % 8 of byte i // 8 (little-endian bytes of little-endian 32-bit words)."""
    bits = (mask.cpu().to(torch.int32).unsqueeze(1) >> torch.arange(8)) & 1
    return bits.reshape(-1)[:numel].bool()


MASK_CASES = [
    ((33, 3), "contiguous"),
    ((5, 17, 9), "contiguous"),
    ((2, 3, 5, 7), "contiguous"),
    ((2, 3, 5, 7), "channels_last"),
    ((2, 3, 5, 7), "permuted"),
    ((2, 3, 1, 1), "channels_last"),
    ((2, 5, 3, 4, 3), "channels_last"),
    ((4, 8, 4, 4), "channels_last"),
]


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
@pytest.mark.parametrize(("shape", "layout"), MASK_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_mask_layout(shape, layout, activation, dtype, device):
    """The mask is (z > 0) as bits in the output's memory order: pins the layout every backend must produce."""
    case = Case(shape, dtype, layout, seed=9, device=device)
    for training in (True, False):
        out, mean, invstd, mask = torch.ops.fusedres.bn_act_forward(
            case.x, case.r, case.w, case.b, case.rm.clone(), case.rv.clone(), training, 0.1, EPS, activation, 0.1
        )
        numel = case.x.numel()
        assert mask.dtype == torch.uint8 and mask.shape == (mask_bytes(numel),)
        assert mean.shape == invstd.shape == (shape[1],)
        assert mean.dtype == invstd.dtype == torch.float32
        # out > 0 exactly when z > 0 for relu and leaky_relu (no underflow to 0 in float32 / bfloat16).
        positive = memory_order(out).cpu() > 0
        bits = unpack_mask(mask, numel)
        assert torch.equal(bits, positive), f"{(bits != positive).sum().item()} of {numel} bits differ"
        # and against the float64 reference pre-activation, in the same memory order
        z = reference_batch_norm_act(
            case.x.cpu().double(),
            case.rm.cpu().double(),
            case.rv.cpu().double(),
            case.w.cpu().double(),
            case.b.cpu().double(),
            training,
            0.1,
            EPS,
            residual=case.r.cpu().double(),
            activation="identity",
        )
        z_mem = memory_order(torch.empty_like(out.cpu(), dtype=torch.float64).copy_(z))
        near_zero = z_mem.abs() < 1e-3
        assert torch.equal(bits[~near_zero], (z_mem > 0)[~near_zero])


@native
def test_identity_has_no_mask(device):
    case = Case((2, 3, 4, 4), seed=10, device=device)
    _, _, _, mask = torch.ops.fusedres.bn_act_forward(
        case.x, case.r, case.w, case.b, None, None, True, 0.1, EPS, "identity", 0.0
    )
    assert mask.dtype == torch.uint8 and mask.shape == (0,)


# Pre-activations at relu6's corners (0 and 6 exactly), NaN, infinities and values where silu's exp overflows; each
# minus 0.5 is exact in bfloat16 too (the residual case adds 0.5 back).
SPECIAL_Z = [-1.0, 0.0, 3.0, 6.0, 6.5, 5.5, math.nan, math.inf, -math.inf, -100.0, 100.0, -3.0, 0.5, 1.0]


@native
@pytest.mark.parametrize("activation", NEW_ACTIVATIONS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_new_activations_special_values_match_torch(activation, layout, residual, dtype):
    """Forward and gradient at z == 0, z == 6, NaN, +-inf and overflowing exp are exactly what
    torch.nn.functional.relu6 / silu give: relu6 follows hardtanh_backward (gradient 0 at z == 0 and z == 6; at NaN
    0, our rule, where torch gives 0 or 1 depending on its loop), silu's NaN at -inf and in the gradient at +-inf. Eval with eps = 0, unit running variance, weight 1 and
    bias 0 makes z = input (+ residual) exactly; runs of 70 values cover whole vectors and tails."""
    shape = (2, 3, 5, 14)
    z = torch.tensor(SPECIAL_Z, dtype=torch.float64).repeat(math.prod(shape) // len(SPECIAL_Z)).view(shape)
    r = torch.full(shape, 0.5, dtype=torch.float64) if residual else None
    x = z - 0.5 if residual else z
    x = arrange(x, dtype, layout).requires_grad_()
    r = arrange(r, dtype, layout).requires_grad_() if residual else None
    C = shape[1]
    ones, zeros = torch.ones(C), torch.zeros(C)
    out = batch_norm_act(x, zeros, ones, ones, zeros, False, 0.1, 0.0, residual=r, activation=activation)
    dy = torch.ones_like(out)
    grads = torch.autograd.grad(out, [x] + ([r] if residual else []), dy)
    zt = z.to(dtype).requires_grad_()
    ref = F.relu6(zt) if activation == "relu6" else F.silu(zt)
    (ref_grad,) = torch.autograd.grad(ref, zt, torch.ones_like(ref))
    # relu6 is exact; silu differs from PyTorch's only in the last bit of exp
    tol = {"rtol": 0.0, "atol": 0.0} if activation == "relu6" or dtype == torch.float64 else {
        "rtol": 2e-6 if dtype == torch.float32 else 8e-3, "atol": 0.0}  # fmt: skip
    torch.testing.assert_close(out.detach(), ref.detach(), equal_nan=True, **tol)
    if activation == "relu6":  # at NaN our bit is 0 (as relu's); torch gives 0 or 1 depending on its loop
        ref_grad = torch.where(z.isnan(), 0.0, ref_grad)
    for g in grads:  # eval: grad_input = dz * weight * invstd = dz; grad_residual = dz
        torch.testing.assert_close(g, ref_grad, equal_nan=True, **tol)
    if activation == "relu6":
        _, _, _, mask = torch.ops.fusedres.bn_act_forward(
            x.detach(), None if r is None else r.detach(), ones, zeros, zeros, ones, False, 0.1, 0.0, "relu6", 0.0
        )
        bits = unpack_mask(mask, x.numel())
        zm = memory_order(arrange(z, dtype, layout)).double()
        torch.testing.assert_close(bits, (zm > 0) & (zm < 6))  # 0 < z < 6: 0 at the kinks and at NaN


@native
def test_new_activations_unsupported_ops_name_themselves():
    """Ops that cannot take relu6 / silu refuse them with an error naming the op (Python and C++ checks)."""
    from fusedres.nn import DenseBatchNormAct2d, SyncBatchNormAct2d

    x = torch.randn(4, 3, 2, 2)
    _, mean, invstd, mask = torch.ops.fusedres.bn_act_forward(
        x, None, None, None, None, None, True, 0.1, EPS, "silu", 0.0
    )
    mask_ops = "activation must be one of 'relu', 'identity', 'leaky_relu', 'relu6' for "
    with pytest.raises(ValueError, match=f"{mask_ops}bn_act_backward_reduce, got 'silu'"):
        torch.ops.fusedres.bn_act_backward_reduce(x, x, mean, invstd, mask, "silu", 0.0)
    with pytest.raises(ValueError, match=f"{mask_ops}bn_act_backward_elemt, got 'silu'"):
        torch.ops.fusedres.bn_act_backward_elemt(
            x, x, None, mean, invstd, mask, mean, mean, 16, "silu", 0.0, [True, True]
        )
    with pytest.raises(ValueError, match=f"{mask_ops}SyncBatchNormAct2d, got 'silu'"):
        SyncBatchNormAct2d(3, activation="silu")
    basic = "activation must be one of 'relu', 'identity', 'leaky_relu' for "
    for act in NEW_ACTIVATIONS:
        with pytest.raises(ValueError, match=f"{basic}dense_bn_act_forward, got '{act}'"):
            torch.ops.fusedres.dense_bn_act_forward([x], None, None, None, None, None, None, True, 0.1, EPS, act, 0.0)
        with pytest.raises(ValueError, match=f"{basic}DenseBatchNormAct2d"):
            DenseBatchNormAct2d(3, activation=act)
    assert SyncBatchNormAct2d(3, activation="relu6").activation == "relu6"  # a mask activation: supported


@native
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_saved_tensors(activation, layout):
    """Autograd keeps the input and O(C) + O(numel / 8) bytes: never z or the output, and the residual only for
    silu (a reference to the caller's tensor, from which its backward recomputes z; no mask then)."""
    case = Case((4, 8, 6, 6), torch.float32, layout, seed=11)
    x, r = case.x.requires_grad_(), case.r.requires_grad_()
    w, b = case.w.requires_grad_(), case.b.requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = batch_norm_act(x, case.rm, case.rv, w, b, True, residual=r, activation=activation)
    big = [t for t in saved if t.numel() * t.element_size() >= x.numel()]
    inputs_kept = [x, r] if activation == "silu" else [x]
    assert len(big) == len(inputs_kept), [(tuple(t.shape), t.dtype) for t in big]
    for t, kept in zip(big, inputs_kept):
        assert t.data_ptr() == kept.data_ptr() and t.shape == kept.shape
    small_bytes = sum(t.numel() * t.element_size() for t in saved if not any(t is u for u in big))
    # [C] vectors (weight, mean, invstd; silu: bias too) and, for the mask activations, the 1-bit mask
    if activation == "silu":
        assert small_bytes <= 4 * 8 * 8, small_bytes
    else:
        assert small_bytes <= (mask_bytes(x.numel()) if activation != "identity" else 0) + 3 * 8 * 8, small_bytes
    torch.autograd.grad(out, (x, r, w, b), case.dy)  # and backward works from what was saved


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args))
        return func(*args, **(kwargs or {}))

    def backward_masks(self):
        return [list(a[-1]) for f, a in self.calls if f is torch.ops.fusedres.bn_act_backward.default]


@native
@pytest.mark.parametrize(
    ("wants", "activation", "expected"),
    [
        ("x", "relu", [[True, False, False, False]]),
        ("r", "relu", [[False, True, False, False]]),
        ("wb", "relu", [[False, False, True, True]]),
        ("xrwb", "relu", [[True, True, True, True]]),
        ("xrwb", "identity", [[True, False, True, True]]),  # d(residual) is grad_out itself
        ("r", "identity", []),  # nothing for the kernel to do
    ],
)
def test_backward_computes_only_what_is_needed(wants, activation, expected):
    case = Case((3, 4, 3, 3), seed=12)
    x, r, w, b = (t.requires_grad_(name in wants) for t, name in zip((case.x, case.r, case.w, case.b), "xrwb"))
    out = batch_norm_act(x, case.rm, case.rv, w, b, True, residual=r, activation=activation)
    leaves = [t for t in (x, r, w, b) if t.requires_grad]
    log = OpLog()
    with log:
        grads = torch.autograd.grad(out, leaves, case.dy)
    assert log.backward_masks() == expected
    if activation == "identity" and "r" in wants:
        assert torch.equal(grads[[t is r for t in leaves].index(True)], case.dy)


# ----------------------------------------------------------------------------------------------------------------
# gradcheck, double backward, opcheck, fake kernels, torch.compile
# ----------------------------------------------------------------------------------------------------------------


@native
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    ("shape", "layout"), [((3, 4, 2, 3), "contiguous"), ((3, 2, 2, 2), "channels_last"), ((5, 3), "contiguous")]
)
def test_gradcheck(shape, layout, training, activation):
    case = Case(shape, torch.float64, layout, seed=13)
    rm, rv = (None, None) if training else (case.rm, case.rv)
    z = reference_batch_norm_act(
        case.x, rm, rv, case.w, case.b, training, 0.1, EPS, residual=case.r, activation="identity"
    )
    # A kink of relu / leaky_relu / relu6 within the finite-difference step would make the numerical Jacobian wrong.
    assert z.abs().min() > 1e-3, "pick another seed: some z is too close to 0"
    assert (z - 6).abs().min() > 1e-3, "pick another seed: some z is too close to 6"

    def fn(x, r, w, b):
        return batch_norm_act(
            x, rm, rv, w, b, training, 0.1, EPS, residual=r, activation=activation, negative_slope=0.3
        )

    inputs = tuple(t.requires_grad_() for t in (case.x, case.r, case.w, case.b))
    assert torch.autograd.gradcheck(fn, inputs)


@native
def test_double_backward_refused():
    case = Case((3, 4, 2, 2), torch.float64, seed=14)
    x, w = case.x.requires_grad_(), case.w.requires_grad_()
    out = batch_norm_act(x, None, None, w, case.b, True, residual=case.r)
    gx, gw = torch.autograd.grad(out, (x, w), case.dy, create_graph=True)
    gx_ref, gw_ref = torch.autograd.grad(
        batch_norm_act(x, None, None, w, case.b, True, residual=case.r), (x, w), case.dy
    )
    assert torch.equal(gx, gx_ref) and torch.equal(gw, gw_ref)
    with pytest.raises(RuntimeError, match=DOUBLE_BACKWARD_ERROR):
        torch.autograd.grad(gx.sum(), x)
    with pytest.raises(RuntimeError, match=DOUBLE_BACKWARD_ERROR):
        (gw**2).sum().backward()


@native
@pytest.mark.parametrize(
    ("training", "running", "layout"),
    [
        (True, True, "contiguous"),
        (True, False, "contiguous"),
        (False, True, "contiguous"),
        (True, True, "channels_last"),
    ],
)
def test_opcheck_forward(training, running, layout):
    case = Case((3, 4, 3, 2), torch.float32, layout, seed=15)
    rm, rv = (case.rm, case.rv) if running else (None, None)
    args = (case.x, case.r, case.w, case.b, rm, rv, training, 0.1, EPS, "relu", 0.01)
    torch.library.opcheck(torch.ops.fusedres.bn_act_forward.default, args)


@native
@pytest.mark.parametrize(("activation", "layout"), [("relu", "contiguous"), ("silu", "channels_last")])
def test_opcheck_differentiable_op(activation, layout):
    """fusedres::bn_act (the eager path: a C++ autograd node) with inputs that require grad, so opcheck also checks
    its autograd registration against the fake kernel."""
    case = Case((3, 4, 3, 2), torch.float32, layout, seed=17)
    x, r, w, b = (t.detach().requires_grad_() for t in (case.x, case.r, case.w, case.b))
    args = (x, r, w, b, case.rm, case.rv, True, 0.1, EPS, activation, 0.01)
    torch.library.opcheck(torch.ops.fusedres.bn_act.default, args)


@native
@pytest.mark.parametrize(
    ("activation", "output_mask", "layout"),
    [
        ("relu", [True, True, True, True], "contiguous"),
        ("leaky_relu", [True, False, False, True], "channels_last"),
        ("identity", [False, False, True, False], "contiguous"),
        ("relu6", [True, True, True, True], "channels_last"),
        ("silu", [True, True, True, True], "contiguous"),
        ("silu", [True, False, True, False], "channels_last"),
    ],
)
def test_opcheck_backward(activation, output_mask, layout):
    case = Case((3, 4, 3, 2), torch.float32, layout, seed=16)
    _, mean, invstd, mask = torch.ops.fusedres.bn_act_forward(
        case.x, case.r, case.w, case.b, None, None, True, 0.1, EPS, activation, 0.2
    )
    # bias and residual: the forward's, read by silu's backward (which recomputes the pre-activation).
    args = (case.dy, case.x, case.w, mean, invstd, mask, True, activation, 0.2, output_mask, case.b, case.r)
    torch.library.opcheck(torch.ops.fusedres.bn_act_backward.default, args)


FAKE_CASES = [
    ((4, 3), "contiguous", torch.float32),
    ((4, 3), "permuted", torch.float64),
    ((4, 3, 5), "permuted", torch.bfloat16),
    ((2, 3, 4, 5), "contiguous", torch.float16),
    ((2, 3, 4, 5), "channels_last", torch.float32),
    ((2, 3, 4, 5), "permuted", torch.float32),
    ((2, 3, 4, 5), "sliced", torch.float64),
    ((2, 3, 1, 1), "channels_last", torch.float32),
    ((1, 3, 1, 4), "channels_last", torch.float32),
    ((2, 3, 1, 4, 1), "channels_last", torch.float32),
    ((2, 3, 2, 4, 3), "channels_last", torch.bfloat16),
    ((0, 3, 4, 5), "channels_last", torch.float32),
]


def meta_of(t):
    return (t.shape, t.stride(), t.dtype, t.device)


@native
@pytest.mark.parametrize(("shape", "layout", "dtype"), FAKE_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_fake_kernels_match_real(shape, layout, dtype):
    """Shapes, strides and dtypes of the fake kernels equal the real ones (what Inductor trusts)."""
    weight_dtypes = [dtype, torch.float32] if dtype != torch.float32 else [dtype]
    for activation, wdt in itertools.product(("relu", "identity", "relu6", "silu"), weight_dtypes):
        case = Case(shape, dtype, layout, param_dtype=wdt, seed=17)
        fwd_args = (case.x, case.r, case.w, case.b, case.rm, case.rv, True, 0.1, EPS, activation, 0.01)
        real = torch.ops.fusedres.bn_act_forward(*fwd_args)
        masks = [[True, True, True, True], [True, False, False, True], [False, True, True, False]]
        real_bwd = [
            torch.ops.fusedres.bn_act_backward(case.dy, case.x, case.w, *real[1:], True, activation, 0.01, m)
            for m in masks
        ]
        with FakeTensorMode() as mode:
            fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in fwd_args)
            fake = torch.ops.fusedres.bn_act_forward(*fake_args)
            fdy, fx, fw = (mode.from_tensor(t) for t in (case.dy, case.x, case.w))
            fake_bwd = [
                torch.ops.fusedres.bn_act_backward(fdy, fx, fw, *fake[1:], True, activation, 0.01, m) for m in masks
            ]
        assert [meta_of(t) for t in fake] == [meta_of(t) for t in real], (activation, wdt)
        for m, f, r in zip(masks, fake_bwd, real_bwd):
            assert [meta_of(t) for t in f] == [meta_of(t) for t in r], (activation, wdt, m)


def _compile_inputs(layout):
    case = Case((4, 6, 5, 5), torch.float32, layout, seed=18)
    return case


@native
def test_compile_functional_fullgraph():
    """torch.compile(fullgraph=True) of the functional: outputs, gradients and running stats over 2 steps."""
    torch._dynamo.reset()

    def f(x, r, w, b, rm, rv):
        return batch_norm_act(x, rm, rv, w, b, True, 0.1, EPS, residual=r, activation="relu")

    compiled = torch.compile(f, fullgraph=True)
    case = _compile_inputs("contiguous")
    results = []
    for fn in (f, compiled):
        w, b = case.w.clone().requires_grad_(), case.b.clone().requires_grad_()
        rm, rv = case.rm.clone(), case.rv.clone()
        outs, grads = [], []
        for step in range(2):
            x = (case.x + step).requires_grad_()
            r = case.r.clone().requires_grad_()
            out = fn(x, r, w, b, rm, rv)
            outs.append(out.detach())
            grads.append(torch.autograd.grad(out, (x, r, w, b), case.dy))
        results.append((outs, grads, rm, rv))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)


@native
def test_compile_module_fullgraph():
    """torch.compile(fullgraph=True) of BatchNormAct2d on channels_last input with a residual, training."""
    torch._dynamo.reset()
    case = _compile_inputs("channels_last")
    eager = BatchNormAct2d(6)
    with torch.no_grad():
        eager.weight.copy_(case.w)
        eager.bias.copy_(case.b)
    module = BatchNormAct2d(6)
    module.load_state_dict(eager.state_dict())
    compiled = torch.compile(module, fullgraph=True)
    results = []
    for m, params in ((eager, (eager.weight, eager.bias)), (compiled, (module.weight, module.bias))):
        steps = []
        for step in range(3):
            x = (case.x * (1 + step)).requires_grad_()
            r = case.r.clone().requires_grad_()
            out = m(x, r)
            assert out.is_contiguous(memory_format=torch.channels_last)
            steps.append((out.detach(), torch.autograd.grad(out, (x, r) + params, case.dy)))
        results.append(steps)
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(module, name), getattr(eager, name), rtol=1e-5, atol=1e-6)
    assert module.num_batches_tracked.item() == 3


@native
@pytest.mark.filterwarnings("error:.*may not alias any inputs:UserWarning")
def test_compile_inference():
    """No-grad eval path (the op is called directly, no autograd.Function) under fullgraph compile."""
    torch._dynamo.reset()
    case = _compile_inputs("contiguous")

    def f(x, r, w, b, rm, rv):
        return batch_norm_act(x, rm, rv, w, b, False, 0.1, EPS, residual=r, activation="leaky_relu")

    with torch.no_grad():
        torch.testing.assert_close(
            torch.compile(f, fullgraph=True)(case.x, case.r, case.w, case.b, case.rm, case.rv),
            f(case.x, case.r, case.w, case.b, case.rm, case.rv),
            rtol=1e-5,
            atol=1e-5,
        )


# ----------------------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------------------


def module_pair(fused_cls, torch_cls, C, seed=20, **kw):
    torch.manual_seed(seed)
    ref = torch_cls(C, **kw)
    if ref.affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-0.5, 0.5)
    fused = fused_cls(C, **kw)
    fused.load_state_dict(ref.state_dict())
    return fused, ref


def module_step(fused, ref, x, r, dy, activation="relu"):
    """One call of both modules; compares output and every gradient (input, residual, parameters)."""
    xf, rf = x.clone().requires_grad_(), r.clone().requires_grad_()
    xr, rr = x.clone().requires_grad_(), r.clone().requires_grad_()
    out_f = fused(xf, rf)
    z = ref(xr) + rr
    out_r = {"relu": torch.relu, "identity": lambda t: t, "leaky_relu": F.leaky_relu, "relu6": F.relu6, "silu": F.silu}[
        activation
    ](z)
    torch.testing.assert_close(out_f, out_r, rtol=1e-5, atol=1e-5)
    leaves_f = [xf, rf] + [p for p in fused.parameters()]
    leaves_r = [xr, rr] + [p for p in ref.parameters()]
    torch.testing.assert_close(
        torch.autograd.grad(out_f, leaves_f, dy), torch.autograd.grad(out_r, leaves_r, dy), rtol=1e-5, atol=1e-5
    )


def assert_same_state(fused, ref):
    sf, sr = fused.state_dict(), ref.state_dict()
    assert list(sf) == list(sr)
    for k in sf:
        torch.testing.assert_close(sf[k], sr[k], rtol=1e-6, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


MODULES = [
    (BatchNormAct1d, nn.BatchNorm1d, (6, 5)),
    (BatchNormAct1d, nn.BatchNorm1d, (6, 5, 7)),
    (BatchNormAct2d, nn.BatchNorm2d, (4, 5, 3, 3)),
    (BatchNormAct3d, nn.BatchNorm3d, (2, 5, 2, 3, 3)),
]


@native
@pytest.mark.parametrize(
    "kw",
    [{}, {"momentum": None}, {"momentum": 0.3, "affine": False}, {"track_running_stats": False}, {"eps": 1e-3}],
    ids=["default", "momentum-None", "no-affine", "no-running-stats", "eps"],
)
@pytest.mark.parametrize(("fused_cls", "torch_cls", "shape"), MODULES, ids=["1d-NC", "1d-NCL", "2d", "3d"])
def test_module_matches_torch(fused_cls, torch_cls, shape, kw):
    """Several training steps then eval: outputs, all gradients, buffers and num_batches_tracked as nn.BatchNorm."""
    fused, ref = module_pair(fused_cls, torch_cls, shape[1], **kw)
    g = torch.Generator().manual_seed(21)
    for step in range(4):
        x, r, dy = (torch.randn(shape, generator=g) * (1 + step) + step for _ in range(3))
        module_step(fused, ref, x, r, dy)
        assert_same_state(fused, ref)
    fused.eval()
    ref.eval()
    x, r, dy = (torch.randn(shape, generator=g) for _ in range(3))
    module_step(fused, ref, x, r, dy)
    assert_same_state(fused, ref)
    if ref.track_running_stats:
        assert fused.num_batches_tracked.item() == 4


@native
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_module_activation_and_layout(activation):
    ref = nn.BatchNorm2d(8)
    fused = BatchNormAct2d(8, activation=activation)
    fused.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(22)
    x, r, dy = (torch.randn(2, 8, 4, 4, generator=g).contiguous(memory_format=torch.channels_last) for _ in range(3))
    module_step(fused, ref, x, r, dy, activation)
    assert_same_state(fused, ref)
    assert fused(x, r).is_contiguous(memory_format=torch.channels_last)


def test_module_state_dict_round_trip():
    src = nn.BatchNorm2d(5)
    with torch.no_grad():
        for t in (src.weight, src.bias, src.running_mean):
            t.normal_()
        src.running_var.uniform_(0.5, 2.0)
        src.num_batches_tracked.fill_(7)
    fused = BatchNormAct2d(5, fused=False)
    assert list(fused.state_dict()) == list(src.state_dict())
    assert [n for n, _ in fused.named_buffers()] == [n for n, _ in src.named_buffers()]
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in src.named_parameters()]
    fused.load_state_dict(src.state_dict(), strict=True)
    assert_same_state(fused, src)
    back = nn.BatchNorm2d(5)
    back.load_state_dict(fused.state_dict(), strict=True)
    assert_same_state(back, src)
    assert isinstance(fused, nn.BatchNorm2d)
    for cls, parent in ((BatchNormAct1d, nn.BatchNorm1d), (BatchNormAct3d, nn.BatchNorm3d)):
        assert list(cls(3).state_dict()) == list(parent(3).state_dict())
        assert issubclass(cls, parent)


def test_module_extra_repr_and_args():
    assert "activation=relu" in repr(BatchNormAct2d(4))
    r = repr(BatchNormAct2d(4, activation="leaky_relu", negative_slope=0.2, fused=False))
    assert "activation=leaky_relu" in r and "negative_slope=0.2" in r and "fused=False" in r
    assert repr(BatchNormAct2d(4)).startswith("BatchNormAct2d(4, eps=1e-05, momentum=0.1, affine=True")
    with pytest.raises(ValueError, match=f"{ALL_ACTIVATIONS_MESSAGE}, got 'gelu'"):
        BatchNormAct2d(4, activation="gelu")
    assert "activation=silu" in repr(BatchNormAct2d(4, activation="silu"))


@native
def test_module_fused_false_is_the_reference():
    fused = BatchNormAct2d(6, activation="leaky_relu")
    plain = BatchNormAct2d(6, activation="leaky_relu", fused=False)
    plain.load_state_dict(fused.state_dict())
    g = torch.Generator().manual_seed(23)
    for _ in range(3):
        x, r = torch.randn(3, 6, 4, 4, generator=g), torch.randn(3, 6, 4, 4, generator=g)
        torch.testing.assert_close(fused(x, r), plain(x, r), rtol=1e-5, atol=1e-5)
    assert_same_state(fused, plain)


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs: the message names the argument, and no state changes
# ----------------------------------------------------------------------------------------------------------------


class Snapshot:
    def __init__(self, *tensors):
        self.tensors = tensors
        self.values = [t.clone() for t in tensors]

    def unchanged(self):
        return all(torch.equal(t, v) for t, v in zip(self.tensors, self.values))


def expect_error(device, expect, match, *, x=None, **changes):
    """The functional with one argument spoiled: the error names it, and the running statistics are unchanged."""
    case = Case((3, 4, 2, 2), seed=30, device=device)
    args = {
        "input": case.x if x is None else x,
        "running_mean": case.rm,
        "running_var": case.rv,
        "weight": case.w,
        "bias": case.b,
        "training": True,
        "residual": case.r,
    }
    args.update(changes)
    snap = Snapshot(case.rm, case.rv)
    with pytest.raises(expect, match=match):
        batch_norm_act(**args)
    assert snap.unchanged()


def expect_module_error(module, expect, match, x, residual=None):
    """A module call that must fail leaves running_mean, running_var and num_batches_tracked unchanged."""
    module.train()
    snap = Snapshot(module.running_mean, module.running_var, module.num_batches_tracked)
    with pytest.raises(expect, match=match):
        module(x, residual)
    assert snap.unchanged()


@native
def test_error_wrong_dim_count(device):
    expect_error(
        device,
        RuntimeError,
        r"input must have 2 to 5 dimensions .* got 1 dimensions",
        x=torch.randn(4, device=device),
        residual=None,
    )
    expect_error(
        device,
        RuntimeError,
        r"input must have 2 to 5 dimensions .* got 6 dimensions",
        x=torch.randn(2, 4, 2, 2, 2, 2, device=device),
        residual=None,
    )
    # the module checks its own dimensionality like nn.BatchNorm2d, before anything changes
    expect_module_error(
        BatchNormAct2d(4).to(device),
        ValueError,
        r"expected 4D input \(got 3D input\)",
        torch.randn(2, 4, 5, device=device),
    )


@native
@pytest.mark.parametrize("arg", ["weight", "bias", "running_mean", "running_var"])
def test_error_channel_count_mismatch(arg, device):
    expect_error(
        device,
        RuntimeError,
        rf"{arg} must be a 1-D tensor with 4 elements \(the number of channels",
        **{arg: torch.ones(5, device=device)},
    )
    if arg == "weight":  # a module with 4 features fed 5 channels
        expect_module_error(
            BatchNormAct2d(4).to(device),
            RuntimeError,
            r"weight must be a 1-D tensor with 5 elements",
            torch.randn(3, 5, 2, 2, device=device),
        )


@native
def test_error_residual_shape_mismatch(device):
    # (A residual with fewer channels is a block end's padded shortcut: tests/test_block_end.py.)
    bad = torch.randn(3, 4, 2, 3, device=device)
    match = r"residual must have the same shape as input, got \[3, 4, 2, 3\] and \[3, 4, 2, 2\]"
    expect_error(device, RuntimeError, match, residual=bad)
    expect_module_error(BatchNormAct2d(4).to(device), RuntimeError, match, torch.randn(3, 4, 2, 2, device=device), bad)


@native
def test_error_residual_dtype_mismatch(device):
    bad = torch.randn(3, 4, 2, 2, dtype=torch.float64, device=device)
    match = r"residual must have the same dtype as input \(Float\), got Double"
    expect_error(device, RuntimeError, match, residual=bad)
    expect_module_error(BatchNormAct2d(4).to(device), RuntimeError, match, torch.randn(3, 4, 2, 2, device=device), bad)


@native
@pytest.mark.needs_cuda
def test_error_residual_device_mismatch():
    bad = torch.randn(3, 4, 2, 2)
    match = r"residual must be on the same device as input \(cuda:0\), got cpu"
    expect_error("cuda", RuntimeError, match, residual=bad)
    expect_module_error(BatchNormAct2d(4).cuda(), RuntimeError, match, torch.randn(3, 4, 2, 2, device="cuda"), bad)


@native
def test_error_integer_input(device):
    x = torch.randint(0, 5, (3, 4, 2, 2), device=device)
    match = r"input must have a floating dtype \(float32, float64, bfloat16 or float16\), got Long"
    expect_error(device, RuntimeError, match, x=x, residual=None)
    expect_module_error(BatchNormAct2d(4).to(device), RuntimeError, match, x)


def test_error_unknown_activation():
    x = torch.randn(3, 4, 2, 2)
    rm, rv = torch.zeros(4), torch.ones(4)
    snap = Snapshot(rm, rv)
    with pytest.raises(ValueError, match=f"{ALL_ACTIVATIONS_MESSAGE}, got 'gelu'"):
        batch_norm_act(x, rm, rv, training=True, activation="gelu")
    with pytest.raises(ValueError, match=f"{ALL_ACTIVATIONS_MESSAGE}, got 'gelu'"):  # the op itself checks too
        torch.ops.fusedres.bn_act_forward(x, None, None, None, rm, rv, True, 0.1, EPS, "gelu", 0.0)
    with pytest.raises(TypeError, match="activation must be a str"):
        batch_norm_act(x, rm, rv, training=True, activation=torch.relu)
    with pytest.raises(ValueError, match="activation must be one of"):
        reference_batch_norm_act(x, rm, rv, training=True, activation="gelu")
    assert snap.unchanged()
    m = BatchNormAct2d(4)
    m.activation = "swish"  # a spoiled attribute is still caught before any state changes
    msnap = Snapshot(m.running_mean, m.running_var, m.num_batches_tracked)
    with pytest.raises(ValueError, match="got 'swish'"):
        m(x)
    assert msnap.unchanged()


def test_error_python_argument_types():
    rm, rv = torch.zeros(4), torch.ones(4)
    with pytest.raises(TypeError, match="input must be a Tensor, got list"):
        batch_norm_act([[1.0, 2.0]], rm, rv)
    with pytest.raises(TypeError, match="momentum must be a float, got None"):
        batch_norm_act(torch.randn(3, 4), rm, rv, training=True, momentum=None)
    with pytest.raises(TypeError, match="residual must be a Tensor or None"):
        batch_norm_act(torch.randn(3, 4), rm, rv, residual=1.0)


@native
def test_error_one_value_per_channel_training(device):
    x = torch.randn(1, 4, device=device)
    match = r"Expected more than 1 value per channel when training, got input size \[1, 4\]"
    expect_error(device, ValueError, match, x=x, residual=None)
    expect_module_error(BatchNormAct1d(4).to(device), ValueError, match, x)
    expect_module_error(
        BatchNormAct2d(4).to(device),
        ValueError,
        "Expected more than 1 value per channel",
        torch.randn(1, 4, 1, 1, device=device),
    )
    # the same input is fine in eval mode
    assert batch_norm_act(x, torch.zeros(4, device=device), torch.ones(4, device=device)).shape == (1, 4)


@native
def test_error_eval_needs_running_stats():
    with pytest.raises(RuntimeError, match="running_mean and running_var must be given when training=False"):
        batch_norm_act(torch.randn(3, 4), None, None, training=False)


# ----------------------------------------------------------------------------------------------------------------
# Loader / fallback
# ----------------------------------------------------------------------------------------------------------------


def test_info(devices):
    info = fusedres.info()
    assert devices[0] == "cpu"
    assert ("cuda" in devices) == (info["native_loaded"] and info["cuda_compiled"] and info["cuda_available"])
    assert set(info) >= {
        "native_loaded",
        "native_error",
        "cuda_compiled",
        "cuda_archs",
        "built_for_torch",
        "torch_version",
        "cuda_available",
    }
    assert info["torch_version"] == torch.__version__
    assert (info["native_error"] is None) == info["native_loaded"]


def test_fallback_to_reference(monkeypatch):
    """Without a kernel for the device, the functional runs the reference (and says so once)."""
    import fusedres.ops.bn_act as mod

    monkeypatch.setattr(mod, "_NATIVE_DEVICE_TYPES", frozenset())
    monkeypatch.setattr(mod, "_warned_devices", set())
    monkeypatch.setattr(mod._native, "native_loaded", True)
    case = Case((3, 4, 2, 2), seed=40)
    with pytest.warns(RuntimeWarning, match="using the pure PyTorch reference"):
        out = batch_norm_act(case.x, case.rm.clone(), case.rv.clone(), case.w, case.b, True, residual=case.r)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch_norm_act(case.x, case.rm.clone(), case.rv.clone(), case.w, case.b, True, residual=case.r)
    ref = reference_batch_norm_act(case.x, case.rm.clone(), case.rv.clone(), case.w, case.b, True, residual=case.r)
    assert torch.equal(out, ref)


def test_loader_explains_import_errors():
    from fusedres import _native

    missing = ModuleNotFoundError("No module named 'fusedres._C'", name="fusedres._C")
    assert "not built" in _native._explain(missing)
    abi = ImportError("fusedres/_C.so: undefined symbol: _ZN3c1017RegisterOperatorsD1Ev")
    text = _native._explain(abi)
    assert "undefined symbol" in text and "rebuild" in text and torch.__version__ in text


# ----------------------------------------------------------------------------------------------------------------
# CUDA vs CPU
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


def check_cuda_vs_cpu(case: Case, dtype, layout, training, activation):
    cuda_case = case.to("cuda")
    cpu = run(batch_norm_act, case, training, activation, negative_slope=0.1)
    gpu = run(batch_norm_act, cuda_case, training, activation, negative_slope=0.1)
    assert gpu["out"].is_cuda
    assert gpu["out"].stride() == cpu["out"].stride()
    for name in ("out", "gx", "gr", "gw", "gb", "rm", "rv"):
        assert_devices_close(name, gpu[name], cpu[name], dtype)

    # The packed mask: identical bits on both devices.
    def args(c):
        return (c.x, c.r, c.w, c.b, c.rm.clone(), c.rv.clone(), training, 0.1, EPS, activation, 0.1)

    *_, mask_cpu = torch.ops.fusedres.bn_act_forward(*args(case))
    *_, mask_gpu = torch.ops.fusedres.bn_act_forward(*args(cuda_case))
    assert mask_gpu.shape == mask_cpu.shape and mask_gpu.dtype == torch.uint8
    n = case.x.numel()
    bits_cpu, bits_gpu = unpack_mask(mask_cpu, n), unpack_mask(mask_gpu, n)
    assert torch.equal(bits_gpu, bits_cpu), f"{(bits_gpu != bits_cpu).sum().item()} of {n} mask bits differ"


@native
@pytest.mark.needs_cuda
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "permuted"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_cuda_vs_cpu_4d(dtype, layout, residual, training):
    case = Case((4, 6, 9, 7), dtype, layout, residual=residual, seed=50)
    check_cuda_vs_cpu(case, dtype, layout, training, "relu")


@native
@pytest.mark.needs_cuda
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("shape", "layout"),
    SHAPE_LAYOUTS
    + [
        ((64, 40, 33, 17), "contiguous"),
        ((64, 40, 33, 17), "channels_last"),
        ((4096, 257), "contiguous"),
        ((0, 4, 3, 3), "contiguous"),
    ],
    ids=lambda v: str(v).replace(" ", ""),
)
def test_cuda_vs_cpu_shapes(shape, layout, dtype, activation):
    for training in (True, False):
        check_cuda_vs_cpu(Case(shape, dtype, layout, seed=51), dtype, layout, training, activation)


@native
@pytest.mark.needs_cuda
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_cuda_vs_reference(dtype, layout, training):
    """CUDA against the float64 reference directly (the same bar as the CPU parity tests)."""
    case = Case((4, 17, 6, 5), dtype, layout, seed=52, device="cuda")
    check_parity(case, dtype, layout, training, "relu")
