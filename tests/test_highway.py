"""fusedres.highway / fusedres.highway_packed / torch.ops.fusedres.highway_*.

Oracle: fusedres.reference.highway (torch.sigmoid, the activation, products) run in float64 on the same values.
float32/float64 must match it to ~1e-5 / ~1e-9 relative; bfloat16/float16 must be within 2x the error of
PyTorch's own same-dtype path (plus a small slack where that error is ~0).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch._inductor.config
from torch._prims_common import suggest_memory_format
from torch.utils._python_dispatch import TorchDispatchMode

import fusedres
from fusedres.ops.highway import DOUBLE_BACKWARD_ERROR
from fusedres.reference import highway as reference_highway
from fusedres.reference import highway_packed as reference_highway_packed

pytestmark = pytest.mark.needs_native

HALF = (torch.bfloat16, torch.float16)
ALL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
ACTIVATIONS = ("relu", "tanh", "sigmoid", "identity")
HALF_SLACK = 1e-5


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


def arrange(t: torch.Tensor, layout: str) -> torch.Tensor:
    """`t`'s values with the given memory layout."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "permuted":  # dense, stored with the first two dims swapped: neither contiguous nor channels_last
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "sliced":  # every other element of the last dim: not dense
        big = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        out = big[..., ::2]
        out.copy_(t)
        return out
    raise AssertionError(layout)


def expected_format(t: torch.Tensor) -> torch.memory_format:
    return suggest_memory_format(t) if t.dim() in (4, 5) else torch.contiguous_format


def max_rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.abs().max().item() if ref.numel() else 0.0
    return (got.double() - ref).abs().max().item() / max(scale, 1e-30)


def assert_matches(name, got, ref, same_dtype, dtype) -> None:
    """`got` vs the float64 reference `ref`: rtol-style for fp32/fp64, the 2x-PyTorch rule for bf16/fp16."""
    if ref is None:
        assert got is None, name
        return
    assert got is not None, name
    assert got.shape == ref.shape, (name, got.shape, ref.shape)
    assert got.dtype == dtype, (name, got.dtype)
    if ref.numel() == 0:
        return
    assert not torch.isnan(got).any(), f"{name}: NaN"
    if dtype in HALF:
        err, torch_err = max_rel_err(got, ref), max_rel_err(same_dtype, ref)
        assert err <= 2 * torch_err + HALF_SLACK, f"{name}: fused error {err:.3g} > 2 x PyTorch {torch_err:.3g}"
    else:
        tol = 1e-5 if dtype == torch.float32 else 1e-9
        scale = ref.abs().max().item()
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * scale, msg=lambda m: f"{name}: {m}")


def forward_backward(fn, inputs, grad_out):
    """fn(*inputs) and the gradients of <fn(*inputs), grad_out> w.r.t. every input (None for None inputs)."""
    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return out.detach(), [t.grad if t is not None else None for t in leaves]


def check_against_reference(fused_fn, ref_fn, inputs, grad_out, dtype):
    out, grads = forward_backward(fused_fn, inputs, grad_out)
    as64 = [t.double() if t is not None else None for t in inputs]
    ref_out, ref_grads = forward_backward(ref_fn, as64, grad_out.double())
    same_out, same_grads = forward_backward(ref_fn, inputs, grad_out) if dtype in HALF else (None, [None] * 4)
    assert_matches("output", out, ref_out, same_out, dtype)
    for i, (g, r, s) in enumerate(zip(grads, ref_grads, same_grads)):
        assert_matches(f"grad {i}", g, r, s, dtype)
    return out, grads


def make_inputs(shape, dtype, free, seed=0, layout="contiguous"):
    gen = torch.Generator().manual_seed(seed)

    def rnd(scale):
        return arrange((torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype), layout)

    transform, gate, carry = rnd(1.5), rnd(3.0), rnd(1.0)
    carry_gate = rnd(3.0) if free else None
    grad_out = rnd(1.0)
    return [transform, gate, carry, carry_gate], grad_out


def fused_unpacked(activation):
    return lambda h, g, x, c: fusedres.highway(h, g, x, activation=activation, carry_gate=c)


def ref_unpacked(activation):
    return lambda h, g, x, c: reference_highway(h, g, x, activation=activation, carry_gate=c)


# ----------------------------------------------------------------------------------------------------------------
# Parity: unpacked
# ----------------------------------------------------------------------------------------------------------------

SHAPES = [
    ((7,), "contiguous"),
    ((4, 5), "contiguous"),
    ((4, 5), "permuted"),
    ((3, 4, 5, 6), "contiguous"),
    ((3, 4, 5, 6), "channels_last"),
    ((3, 4, 5, 6), "permuted"),
    ((3, 4, 5, 6), "sliced"),
    ((0,), "contiguous"),
    ((2, 0, 3), "contiguous"),
]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("free", [False, True], ids=["coupled", "free"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", SHAPES, ids=[f"{s}-{lay}" for s, lay in SHAPES])
def test_parity(shape, layout, dtype, free, activation):
    inputs, grad_out = make_inputs(shape, dtype, free, layout=layout)
    out, _grads = check_against_reference(fused_unpacked(activation), ref_unpacked(activation), inputs, grad_out, dtype)
    fmt = expected_format(inputs[0])
    assert out.is_contiguous(memory_format=fmt)
    # The kernels' gradients (before autograd restrides them to the leaves') are dense in the same format.
    mask = [True, True, True, free]
    for g in torch.ops.fusedres.highway_backward(grad_out, *inputs, activation, mask)[: 3 + free]:
        assert g.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("free", [False, True], ids=["coupled", "free"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_parity_large_parallel(dtype, free):
    """Many chunks of one dense row over several threads, with a vector tail."""
    inputs, grad_out = make_inputs((3, 40001), dtype, free, seed=1)
    check_against_reference(fused_unpacked("tanh"), ref_unpacked("tanh"), inputs, grad_out, dtype)


@pytest.mark.parametrize("free", [False, True], ids=["coupled", "free"])
@pytest.mark.parametrize("shape,dtype", [((4_200_001,), torch.float32), ((2_100_003,), torch.float64)], ids=str)
def test_large_outputs_streaming_stores(shape, dtype, free):
    """Outputs over 16 MB are written with non-temporal stores (aligned vector body, scalar tail)."""
    inputs, grad_out = make_inputs(shape, dtype, free, seed=6)
    check_against_reference(fused_unpacked("sigmoid"), ref_unpacked("sigmoid"), inputs, grad_out, dtype)


@pytest.mark.parametrize("cols", [1000, 1024])  # rows misaligned (scalar head, or no streaming) / aligned
def test_large_packed_streaming_stores(cols):
    gen = torch.Generator().manual_seed(7)
    projected = torch.randn(4200, 2 * cols, generator=gen)
    carry = torch.randn(4200, cols, generator=gen)
    grad_out = torch.randn(4200, cols, generator=gen)
    check_against_reference(
        lambda p, x: fusedres.highway_packed(p, x, activation="tanh"),
        lambda p, x: reference_highway_packed(p, x, activation="tanh"),
        [projected, carry],
        grad_out,
        torch.float32,
    )


# ----------------------------------------------------------------------------------------------------------------
# Parity: packed
# ----------------------------------------------------------------------------------------------------------------

PACKED = [
    ((5, 14), -1, "contiguous"),  # Linear(d, 2 * 7): rows shorter than a vector
    ((6, 74), 1, "contiguous"),
    ((64, 600), -1, "contiguous"),
    ((3, 2, 74), 1, "contiguous"),  # split in the middle
    ((2, 8, 5, 3), 1, "contiguous"),  # conv to 2C channels
    ((2, 8, 5, 3), 1, "channels_last"),
    ((2, 8, 5, 3), 0, "contiguous"),
    ((2, 6, 4, 3), 2, "channels_last"),
    ((2, 8, 5, 3), 1, "permuted"),
    ((2, 8, 5, 3), 1, "sliced"),
    ((0, 8), -1, "contiguous"),
]


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("free", [False, True], ids=["coupled", "free"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,dim,layout", PACKED, ids=[f"{s}-d{d}-{lay}" for s, d, lay in PACKED])
def test_packed_parity(shape, dim, layout, dtype, free, activation):
    shape = list(shape)
    parts = 3 if free else 2
    shape[dim] = shape[dim] // 2 * parts
    part = list(shape)
    part[dim] //= parts
    gen = torch.Generator().manual_seed(2)
    projected = arrange((torch.randn(shape, generator=gen, dtype=torch.float64) * 2).to(dtype), layout)
    carry = arrange(torch.randn(part, generator=gen, dtype=torch.float64).to(dtype), layout)
    grad_out = torch.randn(part, generator=gen, dtype=torch.float64).to(dtype)

    def fused(p, x):
        return fusedres.highway_packed(p, x, activation=activation, dim=dim, free_carry=free)

    def ref(p, x):
        return reference_highway_packed(p, x, activation=activation, dim=dim, free_carry=free)

    out, (gp, gx) = check_against_reference(fused, ref, [projected, carry], grad_out, dtype)
    fmt = expected_format(projected)
    assert out.is_contiguous(memory_format=fmt)
    d = dim % projected.dim()
    gp, gx = torch.ops.fusedres.highway_packed_backward(grad_out, projected, carry, d, free, activation, [True, True])
    assert gp.is_contiguous(memory_format=fmt) and gx.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("free", [False, True], ids=["coupled", "free"])
@pytest.mark.parametrize(
    "shape,dim,fmt",
    [
        ((64, 256), -1, torch.contiguous_format),
        ((4, 16, 6, 6), 1, torch.contiguous_format),
        ((4, 16, 6, 6), 1, torch.channels_last),
    ],
)
def test_packed_does_not_copy(shape, dim, fmt, free):
    """The parts are read in place: no copy, clone or contiguous in the forward and backward kernels."""
    shape = list(shape)
    shape[dim] = shape[dim] // 2 * (3 if free else 2)
    projected = torch.randn(shape).contiguous(memory_format=fmt)
    part = list(shape)
    part[dim] //= 3 if free else 2
    carry = torch.randn(part).contiguous(memory_format=fmt)
    d = dim % projected.dim()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = torch.ops.fusedres.highway_packed_forward(projected, carry, d, free, "relu")
        torch.ops.fusedres.highway_packed_backward(out, projected, carry, d, free, "relu", [True, True])
    names = {e.name for e in prof.events()}
    assert "fusedres::highway_packed_forward" in names
    assert not names & {"aten::copy_", "aten::clone", "aten::contiguous", "aten::cat", "aten::split"}, names


# ----------------------------------------------------------------------------------------------------------------
# Extreme values
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("free", [False, True], ids=["coupled", "free"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_extreme_gates(dtype, free, activation):
    special = torch.tensor([-math.inf, -30.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 30.0, math.inf], dtype=torch.float64)
    n = 37  # vector body and scalar tail both see every value
    gate = special.repeat(n)[: 9 * n]
    gen = torch.Generator().manual_seed(3)
    transform = torch.randn(gate.shape, generator=gen, dtype=torch.float64) * 30
    carry = torch.randn(gate.shape, generator=gen, dtype=torch.float64)
    carry_gate = special.roll(4).repeat(n)[: 9 * n] if free else None
    grad_out = torch.randn(gate.shape, generator=gen, dtype=torch.float64).to(dtype)
    inputs = [t.to(dtype) if t is not None else None for t in (transform, gate, carry, carry_gate)]
    out, grads = check_against_reference(fused_unpacked(activation), ref_unpacked(activation), inputs, grad_out, dtype)
    assert torch.isfinite(out).all()
    for g in grads:
        assert g is None or torch.isfinite(g).all()
    # Exact values at +-inf.
    h = fusedres.highway(inputs[0], inputs[1], inputs[2], activation="identity")
    pos, neg = inputs[1] == math.inf, inputs[1] == -math.inf
    assert torch.equal(h[pos], inputs[0][pos]) and torch.equal(h[neg], inputs[2][neg])


def test_extreme_transform_saturating_activations():
    t = torch.tensor([-math.inf, -100.0, -30.0, 30.0, 100.0, math.inf] * 7)
    g, x = torch.randn(t.shape), torch.randn(t.shape)
    grad_out = torch.randn(t.shape)
    for act in ("tanh", "sigmoid"):
        # The activation's derivative underflows to ~0 here: compare with PyTorch in the same dtype, absolutely.
        out, grads = forward_backward(fused_unpacked(act), [t, g, x, None], grad_out)
        ref_out, ref_grads = forward_backward(ref_unpacked(act), [t, g, x, None], grad_out)
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
        for gr, rg in zip(grads[:3], ref_grads[:3]):
            assert torch.isfinite(gr).all()
            torch.testing.assert_close(gr, rg, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Autograd: gradcheck, saved tensors, needs_input_grad, double backward
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("free", [False, True], ids=["coupled", "free"])
def test_gradcheck(free, activation):
    inputs, _ = make_inputs((3, 2, 4, 5), torch.float64, free, seed=4, layout="channels_last")
    inputs = [t.requires_grad_(True) if t is not None else None for t in inputs]
    assert torch.autograd.gradcheck(fused_unpacked(activation), inputs)


@pytest.mark.parametrize("free", [False, True], ids=["coupled", "free"])
@pytest.mark.parametrize("shape,dim", [((3, 12), -1), ((2, 6, 3, 2), 1)])
def test_gradcheck_packed(shape, dim, free):
    projected = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    part = list(shape)
    part[dim] //= 3 if free else 2
    carry = torch.randn(part, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda p, x: fusedres.highway_packed(p, x, activation="tanh", dim=dim, free_carry=free), (projected, carry)
    )


def saved_by(fn, *inputs):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*inputs)
    return out, saved


@pytest.mark.parametrize("free", [False, True], ids=["coupled", "free"])
def test_saved_tensors_are_the_inputs(free):
    inputs, _ = make_inputs((4, 6), torch.float32, free)
    inputs = [t.requires_grad_(True) if t is not None else None for t in inputs]
    _, saved = saved_by(fused_unpacked("tanh"), *inputs)
    expected = [t for t in inputs if t is not None]
    assert len(saved) == len(expected)
    assert all(s.data_ptr() == e.data_ptr() and s.shape == e.shape for s, e in zip(saved, expected))

    projected = torch.randn(4, 12 if not free else 18, requires_grad=True)
    carry = torch.randn(4, 6, requires_grad=True)
    _, saved = saved_by(lambda p, x: fusedres.highway_packed(p, x, free_carry=free), projected, carry)
    assert [s.data_ptr() for s in saved] == [projected.data_ptr(), carry.data_ptr()]


class RecordBackwardMasks(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.masks = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.fusedres.highway_backward.default, torch.ops.fusedres.highway_packed_backward.default):
            self.masks.append(list(args[-1]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "wants", [(True, False, False, False), (False, True, False, True), (False, False, True, False)]
)
def test_backward_computes_only_what_is_needed(wants):
    inputs, grad_out = make_inputs((5, 3), torch.float32, True)
    leaves = [t.requires_grad_(w) for t, w in zip(inputs, wants)]
    out = fusedres.highway(*leaves[:3], carry_gate=leaves[3], activation="relu")
    with RecordBackwardMasks() as rec:
        out.backward(grad_out)
    assert rec.masks == [list(wants)]
    for t, w in zip(leaves, wants):
        assert (t.grad is not None) == w

    projected = torch.randn(5, 6)
    carry = torch.randn(5, 3, requires_grad=True)
    out = fusedres.highway_packed(projected, carry)
    with RecordBackwardMasks() as rec:
        out.backward(torch.ones_like(out))
    assert rec.masks == [[False, True]] and projected.grad is None and carry.grad is not None


def test_no_grad_mode_skips_autograd():
    inputs, _ = make_inputs((4, 3), torch.float32, False)
    leaves = [t.requires_grad_(True) for t in inputs[:3]]
    with torch.no_grad():
        out = fusedres.highway(*leaves)
    assert out.grad_fn is None


def test_double_backward_refused():
    inputs, grad_out = make_inputs((4, 3), torch.float64, False)
    leaves = [t.requires_grad_(True) for t in inputs[:3]]
    out = fusedres.highway(*leaves, activation="tanh")
    (gh,) = torch.autograd.grad(out, leaves[0], grad_out, create_graph=True)
    with pytest.raises(RuntimeError, match=DOUBLE_BACKWARD_ERROR):
        gh.sum().backward()
    projected = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    out = fusedres.highway_packed(projected, leaves[2])
    (gp,) = torch.autograd.grad(out, projected, torch.ones_like(out), create_graph=True)
    with pytest.raises(RuntimeError, match=DOUBLE_BACKWARD_ERROR):
        gp.sum().backward()


# ----------------------------------------------------------------------------------------------------------------
# opcheck, fake kernels, torch.compile
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("free", [False, True], ids=["coupled", "free"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "permuted"])
def test_opcheck_unpacked(layout, free):
    inputs, grad_out = make_inputs((2, 3, 4, 5), torch.float32, free, layout=layout)
    torch.library.opcheck(torch.ops.fusedres.highway_forward.default, (*inputs, "tanh"))
    mask = [True, False, True, free]
    args = (grad_out, *inputs, "relu", mask)
    torch.library.opcheck(torch.ops.fusedres.highway_backward.default, args)


@pytest.mark.parametrize("free", [False, True], ids=["coupled", "free"])
@pytest.mark.parametrize(
    "shape,dim,fmt", [((6, 12), 1, torch.contiguous_format), ((2, 12, 3, 4), 1, torch.channels_last)]
)
def test_opcheck_packed(shape, dim, fmt, free):
    projected = torch.randn(shape).contiguous(memory_format=fmt)
    part = list(shape)
    part[dim] //= 3 if free else 2
    carry = torch.randn(part).contiguous(memory_format=fmt)
    torch.library.opcheck(torch.ops.fusedres.highway_packed_forward.default, (projected, carry, dim, free, "sigmoid"))
    grad_out = torch.randn(part)
    for mask in ([True, True], [False, True], [True, False]):
        args = (grad_out, projected, carry, dim, free, "tanh", mask)
        torch.library.opcheck(torch.ops.fusedres.highway_packed_backward.default, args)


@pytest.mark.parametrize("free", [False, True], ids=["coupled", "free"])
def test_opcheck_differentiable_ops(free):
    """fusedres::highway / highway_packed (the eager path: C++ autograd nodes) with inputs that require grad, so
    opcheck also checks their autograd registration against the fake kernels."""
    inputs, _ = make_inputs((2, 3, 4, 5), torch.float32, free, layout="channels_last")
    inputs = [t.requires_grad_() if t is not None else None for t in inputs]
    torch.library.opcheck(torch.ops.fusedres.highway.default, (*inputs, "tanh"))
    projected = torch.randn(2, 9 if free else 6, 4, 5, requires_grad=True)
    carry = torch.randn(2, 3, 4, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.fusedres.highway_packed.default, (projected, carry, 1, free, "relu"))


@torch._inductor.config.patch(force_disable_caches=True)
def test_compile_fullgraph():
    """torch.compile(fullgraph=True) of both functionals, forward and backward, against eager.

    Inductor's caches are off so the test always compiles from scratch: a cached graph from an earlier run (another
    ATEN_CPU_CAPABILITY / another build of the extension) was once reused here and gave wrong packed gradients.
    """

    def f(h, g, x, c, p, y):
        a = fusedres.highway(h, g, x, activation="tanh", carry_gate=c)
        b = fusedres.highway_packed(p, y, activation="relu", dim=1)
        return a.sum() + (b * b).sum()

    gen = torch.Generator().manual_seed(5)
    vals = [torch.randn(4, 3, 5, 5, generator=gen).contiguous(memory_format=torch.channels_last) for _ in range(4)]
    vals += [torch.randn(4, 6, 5, 5, generator=gen).contiguous(memory_format=torch.channels_last)]
    vals += [torch.randn(4, 3, 5, 5, generator=gen).contiguous(memory_format=torch.channels_last)]
    eager_in = [v.clone().requires_grad_(True) for v in vals]
    comp_in = [v.clone().requires_grad_(True) for v in vals]
    f(*eager_in).backward()
    torch._dynamo.reset()
    torch.compile(f, fullgraph=True)(*comp_in).backward()
    for e, c in zip(eager_in, comp_in):
        torch.testing.assert_close(c.grad, e.grad)


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------


def test_error_shape_mismatch():
    h, g, x = torch.randn(2, 3), torch.randn(2, 4), torch.randn(2, 3)
    with pytest.raises(RuntimeError, match=r"gate must have the same shape as transform, got \[2, 4\] and \[2, 3\]"):
        fusedres.highway(h, g, x)
    with pytest.raises(RuntimeError, match=r"carry must have the same shape as transform"):
        fusedres.highway(h, h, g)
    with pytest.raises(RuntimeError, match=r"carry_gate must have the same shape as transform"):
        fusedres.highway(h, h, x, carry_gate=g)
    with pytest.raises(RuntimeError, match=r"carry must have the same shape as one part of projected"):
        fusedres.highway_packed(torch.randn(2, 8), torch.randn(2, 3))


def test_error_dtype_mismatch():
    h = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match=r"gate must have the same dtype as transform \(Float\), got Double"):
        fusedres.highway(h, h.double(), h)
    with pytest.raises(RuntimeError, match=r"carry must have the same dtype"):
        fusedres.highway_packed(torch.randn(2, 6), torch.randn(2, 3, dtype=torch.float16))
    with pytest.raises(RuntimeError, match=r"transform must have a floating dtype"):
        fusedres.highway(*(torch.ones(2, 3, dtype=torch.int32),) * 3)


def test_error_activation():
    h = torch.randn(2, 3)
    expected = r"activation must be one of 'relu', 'tanh', 'sigmoid', 'identity', got 'gelu'"
    with pytest.raises(ValueError, match=expected):
        fusedres.highway(h, h, h, activation="gelu")
    with pytest.raises(TypeError, match=r"activation must be a str"):
        fusedres.highway_packed(torch.randn(2, 6), h, activation=None)
    with pytest.raises(ValueError, match=r"activation must be one of"):  # the op itself checks too
        torch.ops.fusedres.highway_forward(h, h, h, None, "gelu")


def test_error_packed_dim():
    with pytest.raises(ValueError, match=r"projected.size\(dim\) must be even \(2 \* features"):
        fusedres.highway_packed(torch.randn(2, 7), torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"projected.size\(dim\) must be divisible by 3"):
        fusedres.highway_packed(torch.randn(2, 8), torch.randn(2, 4), free_carry=True)
    with pytest.raises(RuntimeError, match=r"projected.size\(dim\) must be even"):
        torch.ops.fusedres.highway_packed_forward(torch.randn(2, 7), torch.randn(2, 3), 1, False, "relu")
    with pytest.raises(ValueError, match=r"dim must be in \[-2, 1\] for projected of shape \[2, 6\], got 2"):
        fusedres.highway_packed(torch.randn(2, 6), torch.randn(2, 3), dim=2)
    with pytest.raises(IndexError, match=r"dim must be in \[-2, 1\]"):
        torch.ops.fusedres.highway_packed_forward(torch.randn(2, 6), torch.randn(2, 3), -3, False, "relu")
    with pytest.raises(TypeError, match=r"dim must be an int"):
        fusedres.highway_packed(torch.randn(2, 6), torch.randn(2, 3), dim=1.0)


def test_error_argument_types():
    h = torch.randn(2, 3)
    with pytest.raises(TypeError, match=r"gate must be a Tensor"):
        fusedres.highway(h, 1.0, h)
    with pytest.raises(TypeError, match=r"carry_gate must be a Tensor or None"):
        fusedres.highway(h, h, h, carry_gate=1.0)


# ----------------------------------------------------------------------------------------------------------------
# CUDA vs CPU
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.needs_cuda
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("free", [False, True], ids=["coupled", "free"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "permuted"])
def test_cuda_matches_cpu(layout, dtype, free, activation):
    inputs, grad_out = make_inputs((3, 4, 5, 7), dtype, free, layout=layout)
    cpu_out, cpu_grads = forward_backward(fused_unpacked(activation), inputs, grad_out)
    cuda_in = [t.cuda() if t is not None else None for t in inputs]
    out, grads = forward_backward(fused_unpacked(activation), cuda_in, grad_out.cuda())
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
    torch.testing.assert_close(out.cpu(), cpu_out, rtol=tol, atol=tol)
    assert out.is_contiguous(memory_format=expected_format(inputs[0]))
    for g, c in zip(grads, cpu_grads):
        assert (g is None) == (c is None)
        if g is not None:
            torch.testing.assert_close(g.cpu(), c, rtol=tol, atol=tol)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("free", [False, True], ids=["coupled", "free"])
@pytest.mark.parametrize(
    "shape,dim,fmt",
    [
        ((64, 600), -1, torch.contiguous_format),
        ((4, 16, 6, 6), 1, torch.channels_last),
        ((4, 16, 6, 6), 1, torch.contiguous_format),
    ],
)
def test_cuda_packed_matches_cpu(shape, dim, fmt, free):
    shape = list(shape)
    shape[dim] = shape[dim] // 2 * (3 if free else 2)
    part = list(shape)
    part[dim] //= 3 if free else 2
    projected = torch.randn(shape).contiguous(memory_format=fmt)
    carry = torch.randn(part).contiguous(memory_format=fmt)
    grad_out = torch.randn(part)

    def fn(p, x):
        return fusedres.highway_packed(p, x, activation="tanh", dim=dim, free_carry=free)

    cpu_out, cpu_grads = forward_backward(fn, [projected, carry], grad_out)
    out, grads = forward_backward(fn, [projected.cuda(), carry.cuda()], grad_out.cuda())
    torch.testing.assert_close(out.cpu(), cpu_out, rtol=1e-5, atol=1e-5)
    for g, c in zip(grads, cpu_grads):
        torch.testing.assert_close(g.cpu(), c, rtol=1e-5, atol=1e-5)
