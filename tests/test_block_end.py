"""The block end act(scale * batch_norm(input) + residual): fusedres.batch_norm_act with ``scale`` /
``backward_scale`` / a residual with fewer channels or any strides, torch.ops.fusedres.block_end_*, and the modules.

Oracle: fusedres.reference.batch_norm_act (F.batch_norm, the scale, a zero-padded residual, the activation) in
float64 on the same rounded values; float64 must match it to a few ulps of the terms, float32 / bfloat16 within 2x
the error of the same reference run in that dtype (tests/_numerics.py).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from fusedres import batch_norm_act
from fusedres.nn import BatchNormAct2d
from fusedres.ops.block_end import DOUBLE_BACKWARD_ERROR
from fusedres.reference import batch_norm_act as reference
from _numerics import assert_2x, fold_allowance, max_abs

native = pytest.mark.needs_native
EPS = 1e-5
SCALES = ("none", "sample", "channel", "dropped")
RESIDUALS = ("none", "same", "narrow", "narrow_strided", "strided")


def _subsample(base):
    """Every other position of each spatial dimension: a strided view of ``base``."""
    return base[(slice(None), slice(None)) + (slice(None, None, 2),) * (base.dim() - 2)]


def make_case(shape, dtype, layout, scale_kind, residual_kind, backward_scale, seed=0):
    """Leaf tensors (in float64 before rounding): x, residual, scale, backward scale, w, b, running stats, dy."""
    g = torch.Generator().manual_seed(seed)
    N, C = shape[0], shape[1]
    spatial = shape[2:]
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format

    def full(s, scale=1.0, shift=0.0):
        t = (torch.randn(s, generator=g, dtype=torch.float64) * scale + shift).to(dtype)
        return t.contiguous(memory_format=fmt) if len(s) == 4 else t

    x = full(shape, 1.5, 0.3)
    dy = full(shape)
    r = None
    if residual_kind != "none":
        cr = C if residual_kind in ("same", "strided") else max(1, C // 2)
        if residual_kind in ("narrow_strided", "strided"):
            # A subsampled view (option A / PyramidNet's downsampling shortcut), read in place.
            r = _subsample(full((N, cr) + tuple(2 * d for d in spatial)))
        else:
            r = full((N, cr) + tuple(spatial))
    s = bs = None
    if scale_kind == "sample":
        s = torch.rand(N, generator=g, dtype=torch.float64) + 0.5
    elif scale_kind == "channel":
        s = torch.rand(N, C, generator=g, dtype=torch.float64) * 2 - 0.5
    elif scale_kind == "dropped":  # stochastic depth: a 0/1 mask over the samples, divided by the keep probability
        m = torch.zeros(N, dtype=torch.float64)
        m[::2] = 1
        s = m / 0.8
    if s is not None and backward_scale:
        bs = torch.rand(s.shape, generator=g, dtype=torch.float64)
    to_param = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    w = torch.randn(C, generator=g, dtype=torch.float64).to(to_param)
    b = torch.randn(C, generator=g, dtype=torch.float64).to(to_param)
    rm = (torch.randn(C, generator=g, dtype=torch.float64) * 0.5).to(to_param)
    rv = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(to_param)
    s = s.to(to_param) if s is not None else None
    bs = bs.to(to_param) if bs is not None else None
    return {"x": x, "r": r, "s": s, "bs": bs, "w": w, "b": b, "rm": rm, "rv": rv, "dy": dy}


def step(fn, c, training, activation, cast=None, grads=True):
    """Forward + backward of fn on fresh copies of case c (cast to `cast`); returns outputs, grads, running stats."""

    def leaf(t):
        if t is None:
            return None
        t = t.detach()
        if cast is not None:
            t = t.to(cast)
        return t.clone(memory_format=torch.preserve_format).requires_grad_(grads)

    x, s, w, b = leaf(c["x"]), leaf(c["s"]), leaf(c["w"]), leaf(c["b"])
    r = None
    if c["r"] is not None:
        r = c["r"].detach()
        if r._base is not None:  # a strided view: the same view of a copy of its base (same layout)
            base = r._base.to(cast) if cast is not None else r._base
            r = _subsample(base.clone(memory_format=torch.preserve_format).requires_grad_(grads))
            if grads:
                r.retain_grad()
        else:
            r = leaf(r)
    bs = c["bs"].to(cast) if c["bs"] is not None and cast is not None else c["bs"]
    rm, rv = c["rm"].clone(), c["rv"].clone()
    if cast is not None:
        rm, rv = rm.to(cast), rv.to(cast)
    out = fn(
        x, rm, rv, w, b, training, 0.1, EPS, residual=r, activation=activation, negative_slope=0.1, scale=s,
        backward_scale=bs,
    )
    res = {"out": out.detach(), "rm": rm, "rv": rv}
    if grads:
        dy = c["dy"].to(cast) if cast is not None else c["dy"]
        out.backward(dy)
        for name, t in (("gx", x), ("gr", r), ("gs", s), ("gw", w), ("gb", b)):
            res[name] = t.grad if t is not None else None
    return res


def check_against_reference(c, dtype, training, activation):
    got = step(batch_norm_act, c, training, activation)
    ref64 = step(reference, c, training, activation, cast=torch.float64)
    same = step(reference, c, training, activation)
    x64 = c["x"].double()
    dims = [0, *range(2, x64.dim())]
    invstd = 1 / (x64.var(dims, unbiased=False) + EPS).sqrt() if training else 1 / (c["rv"].double() + EPS).sqrt()
    extra = fold_allowance(x64, invstd, c["w"], dtype)
    if c["s"] is not None:
        extra *= max(1.0, max_abs(c["s"]))
    scale_out = max(max_abs(ref64["out"]), 1.0)
    assert_2x("output", got["out"], ref64["out"], same["out"], scale_out, dtype, extra)
    x = c["x"]
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    assert got["out"].is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    for name in ("rm", "rv"):
        assert_2x(name, got[name], ref64[name], same[name], max(max_abs(ref64[name]), 1.0), got[name].dtype)
    for name in ("gx", "gr", "gs", "gw", "gb"):
        if ref64[name] is None:
            assert got[name] is None, name
            continue
        # Gradients are sums over up to N * H * W terms of |dy| ~ 1: their scale is that of the largest term sum.
        terms = max(max_abs(ref64[name]), 1.0) * (c["x"].numel() / c["x"].shape[1]) ** 0.5
        assert_2x(name, got[name], ref64[name], same[name], terms, got[name].dtype)
    return got, ref64


@native
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize(("scale_kind", "residual_kind"), list(itertools.product(SCALES, RESIDUALS)))
@pytest.mark.parametrize("training", [True, False])
def test_parity_float64(layout, scale_kind, residual_kind, training):
    if scale_kind == "none" and residual_kind in ("none", "same", "strided"):
        pytest.skip("no scale and a full residual: batch_norm_act's own op (tests/test_bn_act.py)")
    c = make_case((4, 6, 5, 3), torch.float64, layout, scale_kind, residual_kind, backward_scale=False, seed=1)
    check_against_reference(c, torch.float64, training, "relu")


@native
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("activation", ["relu", "identity", "leaky_relu", "relu6"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("scale_kind", "residual_kind"), [("channel", "narrow_strided"), ("dropped", "narrow")])
def test_parity_dtypes_activations(layout, activation, dtype, scale_kind, residual_kind):
    c = make_case((8, 20, 6, 5), dtype, layout, scale_kind, residual_kind, backward_scale=False, seed=2)
    check_against_reference(c, dtype, True, activation)


@native
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("scale_kind", ["sample", "channel"])
def test_backward_scale_shake_shake(layout, scale_kind):
    """backward_scale replaces scale in the gradients of input, weight and bias (Shake-Shake's beta), and the
    scale's own gradient stays sum(grad * batch_norm(input))."""
    c = make_case((6, 5, 4, 4), torch.float64, layout, scale_kind, "same", backward_scale=True, seed=3)
    got, ref64 = check_against_reference(c, torch.float64, True, "identity")
    c_fwd = dict(c, bs=None)
    plain = step(batch_norm_act, c_fwd, True, "identity")
    assert torch.equal(got["out"], plain["out"])
    assert not torch.allclose(got["gx"], plain["gx"])
    torch.testing.assert_close(got["gs"], plain["gs"], rtol=1e-12, atol=1e-12)


@native
@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 9), (2, 3, 3, 4, 2)])
@pytest.mark.parametrize(("scale_kind", "residual_kind"), [("channel", "narrow"), ("dropped", "strided")])
def test_parity_other_ranks(shape, scale_kind, residual_kind):
    c = make_case(shape, torch.float64, "contiguous", scale_kind, residual_kind, backward_scale=False, seed=4)
    check_against_reference(c, torch.float64, True, "leaky_relu")


@native
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_dropped_sample_reads_no_input(layout):
    """A per-sample scale of 0 drops the branch: the sample's input is not read (NaN there does not reach its output)
    and its output is exactly act(residual) with zero-padded channels (eval: the statistics are the running ones)."""
    c = make_case((4, 6, 3, 3), torch.float32, layout, "dropped", "narrow", backward_scale=False, seed=5)
    x = c["x"].clone()
    x[1] = float("nan")  # sample 1 is dropped (the mask keeps the even samples)
    out = batch_norm_act(x, c["rm"], c["rv"], c["w"], c["b"], False, residual=c["r"], scale=c["s"])
    cr = c["r"].shape[1]
    assert torch.equal(out[1, :cr], torch.relu(c["r"][1]))
    assert torch.equal(out[1, cr:], torch.zeros_like(out[1, cr:]))
    assert torch.isnan(out[0]).sum() == 0 and torch.isfinite(out).all()
    xs = x.clone().requires_grad_()
    out = batch_norm_act(xs, c["rm"], c["rv"], c["w"], c["b"], False, residual=c["r"], scale=c["s"])
    out.backward(c["dy"])
    assert torch.equal(xs.grad[1], torch.zeros_like(xs.grad[1]))


@native
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_module_matches_reference_module(layout):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    torch.manual_seed(6)
    fused, ref = BatchNormAct2d(8), BatchNormAct2d(8, fused=False)
    with torch.no_grad():
        for m in (fused, ref):
            m.weight.copy_(torch.linspace(0.5, 1.5, 8))
            m.bias.copy_(torch.linspace(-0.3, 0.3, 8))
    x = torch.randn(4, 8, 6, 6).contiguous(memory_format=fmt)
    r = torch.randn(4, 4, 12, 12).contiguous(memory_format=fmt)[:, :, ::2, ::2]
    s = torch.tensor([1.25, 0.0, 1.25, 1.25])
    outs = []
    for m in (fused, ref):
        xi, ri = x.clone().requires_grad_(), r.detach().clone().requires_grad_()
        out = m(xi, ri, s)
        out.sum().backward()
        outs.append((out, xi.grad, ri.grad, m.weight.grad, m.running_mean, m.num_batches_tracked))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_reference_pads_and_scales():
    """The oracle itself: scale multiplies the normalised input before a zero-padded residual is added."""
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    r = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    s = torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64)
    got = reference(x, None, None, None, None, True, residual=r, scale=s, activation="identity")
    bn = torch.nn.functional.batch_norm(x, None, None, training=True)
    want = bn * s.view(3, 1, 1, 1)
    want[:, :2] += r
    torch.testing.assert_close(got, want)


@native
def test_bad_arguments_name_themselves_and_leave_stats():
    c = make_case((4, 6, 3, 3), torch.float32, "contiguous", "sample", "narrow", backward_scale=False)
    rm, rv = c["rm"].clone(), c["rv"].clone()

    def call(fn=batch_norm_act, **kw):
        args = {"residual": c["r"], "scale": c["s"]}
        args.update(kw)
        return fn(c["x"], rm, rv, c["w"], c["b"], True, **args)

    for fn in (batch_norm_act, reference):
        with pytest.raises((ValueError, RuntimeError), match="scale must have shape"):
            call(fn, scale=torch.ones(3))
        with pytest.raises((ValueError, RuntimeError), match="residual must have"):
            call(fn, residual=torch.ones(4, 7, 3, 3))
        with pytest.raises((ValueError, RuntimeError), match="residual must have"):
            call(fn, residual=torch.ones(4, 3, 2, 3))
        with pytest.raises(ValueError, match="backward_scale needs scale"):
            call(fn, scale=None, backward_scale=torch.ones(4))
        with pytest.raises(ValueError, match="backward_scale must have scale's shape"):
            call(fn, backward_scale=torch.ones(4, 6))
    with pytest.raises(ValueError, match="activation 'silu' is not supported by the block end|silu"):
        call(activation="silu")
    with pytest.raises(RuntimeError, match="scale must have shape"):
        torch.ops.fusedres.block_end_forward(
            c["x"], c["r"], torch.ones(5), c["w"], c["b"], rm, rv, True, 0.1, EPS, "relu", 0.0
        )
    with pytest.raises(RuntimeError, match="residual must have the same dtype"):
        call(residual=c["r"].double())
    assert torch.equal(rm, c["rm"]) and torch.equal(rv, c["rv"]), "a failed call changed the running statistics"


@native
def test_double_backward_refused():
    c = make_case((3, 4, 2, 2), torch.float64, "contiguous", "channel", "narrow", backward_scale=False)
    x, s = c["x"].requires_grad_(), c["s"].requires_grad_()
    out = batch_norm_act(x, None, None, c["w"], c["b"], True, residual=c["r"], scale=s)
    gx, gs = torch.autograd.grad(out, (x, s), c["dy"], create_graph=True)
    with pytest.raises(RuntimeError, match=DOUBLE_BACKWARD_ERROR.replace("(", r"\(").replace(")", r"\)")):
        torch.autograd.grad(gx.sum(), x)


@native
@pytest.mark.parametrize("activation", ["identity", "leaky_relu"])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck(activation, training):
    c = make_case((3, 4, 3, 2), torch.float64, "contiguous", "channel", "narrow_strided", backward_scale=False, seed=8)
    r = c["r"].detach().clone().requires_grad_()
    inputs = (c["x"].requires_grad_(), r, c["s"].requires_grad_(), c["w"].requires_grad_(), c["b"].requires_grad_())

    def fn(x, r, s, w, b):
        return batch_norm_act(
            x, c["rm"].clone(), c["rv"].clone(), w, b, training, residual=r, scale=s, activation=activation,
            negative_slope=0.2,
        )

    assert torch.autograd.gradcheck(fn, inputs)


@native
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False])
def test_opcheck_forward(layout, training):
    c = make_case((3, 4, 3, 2), torch.float32, layout, "channel", "narrow_strided", backward_scale=False, seed=9)
    args = (c["x"], c["r"], c["s"], c["w"], c["b"], c["rm"], c["rv"], training, 0.1, EPS, "relu", 0.0)
    torch.library.opcheck(torch.ops.fusedres.block_end_forward.default, args)


@native
@pytest.mark.parametrize(
    ("activation", "output_mask", "layout", "scale_kind"),
    [
        ("relu", [True, True, True, True, True], "contiguous", "channel"),
        ("leaky_relu", [True, False, True, False, True], "channels_last", "sample"),
        ("identity", [False, True, False, True, False], "contiguous", "dropped"),
        ("relu6", [True, True, False, True, True], "channels_last", "none"),
    ],
)
def test_opcheck_backward(activation, output_mask, layout, scale_kind):
    c = make_case((3, 4, 3, 2), torch.float32, layout, scale_kind, "narrow", backward_scale=False, seed=10)
    _, mean, invstd, mask = torch.ops.fusedres.block_end_forward(
        c["x"], c["r"], c["s"], c["w"], c["b"], None, None, True, 0.1, EPS, activation, 0.2
    )
    args = (c["dy"], c["x"], c["s"], c["w"], c["b"], mean, invstd, mask, c["r"].shape[1], True, activation, 0.2,
            output_mask)
    torch.library.opcheck(torch.ops.fusedres.block_end_backward.default, args)


@native
@pytest.mark.parametrize(("layout", "scale_kind", "backward_scale"), [("contiguous", "channel", False),
                                                                      ("channels_last", "sample", True)])
def test_opcheck_differentiable_op(layout, scale_kind, backward_scale):
    """fusedres::block_end (the eager path: a C++ autograd node) with inputs that require grad, so opcheck also
    checks its autograd registration against the fake kernel."""
    c = make_case((3, 4, 3, 2), torch.float32, layout, scale_kind, "narrow", backward_scale, seed=12)
    x, r, s, w, b = (t.detach().clone().requires_grad_() for t in (c["x"], c["r"], c["s"], c["w"], c["b"]))
    args = (x, r, s, c["bs"], w, b, c["rm"], c["rv"], True, 0.1, EPS, "relu", 0.0)
    torch.library.opcheck(torch.ops.fusedres.block_end.default, args)


@native
def test_eager_node_matches_python_function():
    """The C++ node (eager) and the Python Function (traced by torch.compile) call the same ops: equal results."""
    from fusedres.ops.block_end import _BlockEndFunction

    c = make_case((4, 6, 3, 3), torch.float32, "channels_last", "channel", "narrow_strided", True, seed=13)
    results = []
    for use_node in (True, False):
        x, s, w, b = (t.detach().clone().requires_grad_() for t in (c["x"], c["s"], c["w"], c["b"]))
        r = c["r"].detach()
        args = (x, r, s, c["bs"], w, b, None, None, True, 0.1, EPS, "relu", 0.0)
        out = torch.ops.fusedres.block_end(*args) if use_node else _BlockEndFunction.apply(*args)[0]
        out.backward(c["dy"])
        results.append((out, x.grad, s.grad, w.grad, b.grad))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@native
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_compile_fullgraph(layout):
    torch._dynamo.reset()
    c = make_case((4, 6, 4, 4), torch.float32, layout, "channel", "narrow_strided", backward_scale=True, seed=11)

    def fn(x, r, s, bs, w, b):
        return batch_norm_act(x, None, None, w, b, True, residual=r, scale=s, backward_scale=bs)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    results = []
    for f in (fn, compiled):
        x, s, w = (t.detach().clone().requires_grad_() for t in (c["x"], c["s"], c["w"]))
        r = c["r"].detach().clone()  # a dense copy is enough here: the strided path is exercised above
        out = f(x, r, s, c["bs"], w, c["b"])
        out.backward(c["dy"])
        results.append((out, x.grad, s.grad, w.grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


def _to_cuda(c):
    """Case c on the GPU; a strided residual stays the same view of its base (read in place there too)."""
    out = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
    if c["r"] is not None and c["r"]._base is not None:
        out["r"] = _subsample(c["r"]._base.cuda())
        assert out["r"].stride() == c["r"].stride()
    return out


@native
@pytest.mark.needs_cuda
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize(
    ("scale_kind", "residual_kind"),
    [("channel", "narrow_strided"), ("dropped", "narrow"), ("sample", "strided"), ("none", "narrow")],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_cuda_parity(layout, scale_kind, residual_kind, dtype, training):
    """The CUDA kernels (csrc/cuda/block_end*) against the reference on the GPU, as the CPU kernels above."""
    c = make_case((8, 20, 6, 5), dtype, layout, scale_kind, residual_kind, backward_scale=False, seed=12)
    got, _ = check_against_reference(_to_cuda(c), dtype, training, "relu")
    assert got["out"].device.type == "cuda"


@native
@pytest.mark.needs_cuda
@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 9), (2, 3, 3, 4, 2)])
def test_cuda_parity_other_ranks_and_shake_shake(shape):
    c = make_case(shape, torch.float64, "contiguous", "sample", "strided", backward_scale=True, seed=13)
    check_against_reference(_to_cuda(c), torch.float64, True, "leaky_relu")


@native
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_drop_path_module(layout):
    """DropPathBatchNormAct2d: eval = BatchNormAct2d; training = timm's drop_path of the BN output + residual, then
    the activation, with the same draws as torch's bernoulli from the same seed; fused and reference agree."""
    from fusedres.nn import DropPathBatchNormAct2d

    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(8, 6, 4, 4, dtype=torch.float64).contiguous(memory_format=fmt)
    r = torch.randn(8, 6, 4, 4, dtype=torch.float64).contiguous(memory_format=fmt)
    fused = DropPathBatchNormAct2d(6, 0.4).double()
    ref = DropPathBatchNormAct2d(6, 0.4, fused=False).double()
    plain = BatchNormAct2d(6, fused=False).double()
    assert "drop_prob=0.4" in repr(fused)
    torch.manual_seed(0)
    keep = torch.empty(8).bernoulli_(0.6).double() / 0.6
    want = torch.relu(torch.nn.functional.batch_norm(x, None, None, training=True) * keep.view(8, 1, 1, 1) + r)
    outs = []
    for m in (fused, ref):
        torch.manual_seed(0)
        xi = x.clone().requires_grad_()
        out = m(xi, r)
        out.sum().backward()
        outs.append((out, xi.grad))
    torch.testing.assert_close(outs[0][0], want)
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])
    plain.load_state_dict(fused.state_dict())  # the running statistics of the training call above
    for m in (fused, plain):
        m.eval()
    torch.testing.assert_close(fused(x, r), plain(x, r))
    with pytest.raises(ValueError, match="drop_prob must be in"):
        DropPathBatchNormAct2d(6, 1.0)
