"""Property-based tests (hypothesis) of the fused ops against plain PyTorch in float64 on the same rounded inputs.

Each example draws a shape (1-sized and empty dimensions, odd channel counts, sizes around the vector widths of
the CPU kernels), a dtype, a storage for every full-size tensor (contiguous, channels_last, permuted, sliced,
expanded where the op allows it), the activation, train / eval, momentum, which of weight / bias / running
statistics are given, the magnitude of the values and the mean offset (up to ``MAX_MEAN_OFFSET`` standard
deviations). Everything the op returns or updates is compared with the rule of ``tests/_numerics.py``: our error
at most 2x PyTorch's own error in the same dtype plus a small floor; upstream gradients are zeroed where the
activation's branch is ambiguous at the dtype's rounding.

The float64 oracle is plain PyTorch in float64 on the inputs shifted by a per-channel constant near the mean
(:func:`oracle_shift`; BatchNorm is shift-invariant, the running mean is shifted with the input and the shift added
back to it): its sums and its folded ``x * scale + shift`` then round at the size of the deviations, not of the mean,
so it is accurate at any mean offset, and plain float64 PyTorch on the unshifted inputs is a real "same-dtype"
result with an error of its own for float64 cases (where the unshifted oracle would be PyTorch itself: error 0).

Examples are derandomised (the same examples on every run, so a CI failure reproduces) unless a seed is given.
Profiles (``FUSEDRES_HYPOTHESIS_PROFILE``): ``ci`` (default, a few hundred examples in all, part of ``make test``)
and ``fuzz`` (``make fuzz``: ``FUSEDRES_FUZZ_EXAMPLES`` per test, default 5000, random unless
``--hypothesis-seed`` is given; a failure prints the seed and a ``@reproduce_failure`` blob).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fusedres
from fusedres import reference
from fusedres.ops import bn_stats

from _numerics import (
    FLOAT_DTYPES,
    HALF,
    activation_kinks,
    ambiguous_branch,
    arrange,
    assert_2x,
    channel_view,
    fold_allowance,
    max_abs,
    reduce_dims,
    storage_layouts,
    values,
)

pytestmark = pytest.mark.needs_native

# Inputs are drawn with a mean of up to MAX_MEAN_OFFSET standard deviations (times a random sign and a per-channel
# spread): 1e4, issue 17's target. Float32 also has tests/test_large_mean.py. Up to 1e2 only while the float64
# oracle was PyTorch on the unshifted inputs: PyTorch's float64 "same-dtype" error was then 0 by construction, while
# x - mean at 1e3 std carries ~1e3 ulps of float64 (ours: output 2.1e-11 > floor 4.6e-12 at 1e4); the shifted
# oracle (oracle_shift) measures PyTorch's float64 error instead. Before the CPU NCHW statistics summed x - pivot,
# float32 failed at 1e2-1e4 (grad_weight 3.2e-3 vs PyTorch's 1.3e-3).
MAX_MEAN_OFFSET = 1e4

settings.register_profile(
    "ci",
    max_examples=60,
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "fuzz",
    max_examples=int(os.environ.get("FUSEDRES_FUZZ_EXAMPLES", "5000")),
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = os.environ.get("FUSEDRES_HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)

# Channel counts around the CPU kernels' vector widths (8 and 16 floats, 32 for the mask bits) and odd ones.
CHANNELS = [1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33]
# Sizes along the contiguous dimension around the same widths, and small ones.
SIZES = [1, 2, 3, 4, 5, 7, 8, 9, 13, 14, 15, 16, 17]
MAX_NUMEL = 6000
SLOPES = [0.01, 0.2, 1.0, 3.0]
MOMENTA = [0.0, 0.1, 0.5, 1.0]


def _mean_offsets() -> list[float]:
    """0 and the powers of ten up to MAX_MEAN_OFFSET."""
    return [0.0] + [10.0**k for k in range(0, round(math.log10(MAX_MEAN_OFFSET)) + 1)]


@st.composite
def shapes(draw, min_dims: int = 2, max_dims: int = 5, allow_empty: bool = True) -> tuple[int, ...]:
    """(N, C, *spatial) with 0-3 spatial dimensions, at most MAX_NUMEL elements; rarely an empty dimension."""
    ndim = draw(st.integers(min_dims, max_dims))
    n = draw(st.sampled_from([1, 2, 3, 4, 5, 8]))
    c = draw(st.sampled_from(CHANNELS))
    shape = [n, c]
    for _ in range(ndim - 2):
        budget = max(1, MAX_NUMEL // math.prod(shape))
        shape.append(draw(st.sampled_from([s for s in SIZES if s <= budget] or [1])))
    if allow_empty and draw(st.integers(0, 19)) == 0:
        shape[draw(st.sampled_from([0] + list(range(2, ndim))))] = 0
    return tuple(shape)


def _magnitude(draw, dtype: torch.dtype) -> tuple[float, float]:
    """(scale, mean offset in units of the scale), kept inside float16's range."""
    scale = 10.0 ** draw(st.integers(-2, 2))
    offset = draw(st.sampled_from(_mean_offsets())) * draw(st.sampled_from([1.0, -1.0]))
    if dtype == torch.float16:
        assume(scale * (abs(offset) + 8.0) < 2e3)
    return scale, offset


def _layout(draw, ndim: int, expandable: bool = True) -> str:
    return draw(st.sampled_from(storage_layouts(ndim) + (["expanded"] if expandable else [])))


def _storage(layout: str, dtype: torch.dtype) -> str:
    """The oracle (float64) runs on contiguous tensors, but keeps an expanded operand expanded (its gradient is the
    sum over the broadcast dimension)."""
    return layout if dtype != torch.float64 or layout == "expanded" else "contiguous"


def _leaf(v64, dtype, layout, perm_seed):
    """(leaf requiring grad, the tensor handed to the op): an expanded layout broadcasts a leaf of size 1 in dim 0."""
    if layout == "expanded":
        leaf = v64[:1].to(dtype).clone().requires_grad_()
        return leaf, leaf.expand(v64.shape)
    leaf = arrange(v64, dtype, layout, perm_seed).requires_grad_()
    return leaf, leaf


def _grads(out, leaves, dy):
    wanted = [t for t in leaves if t is not None]
    got = iter(torch.autograd.grad(out, wanted, dy, allow_unused=True))
    return [next(got) if t is not None else None for t in leaves]


# ------------------------------------------------------------------------------------------------ batch_norm_act


@st.composite
def bn_cases(draw) -> dict:
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    shape = draw(shapes())
    ndim = len(shape)
    spatial = math.prod(shape[2:])
    training = draw(st.booleans())
    if training and shape[0] * spatial == 1:
        shape = (2,) + shape[1:]
    scale, offset = _magnitude(draw, dtype)
    case = {
        "dtype": dtype,
        "shape": shape,
        "training": training,
        "scale": scale,
        "offset": offset,
        "x_layout": _layout(draw, ndim),
        "residual": draw(st.one_of(st.none(), st.just("x"), st.just("other"))),
        "r_layout": _layout(draw, ndim),
        "weight": draw(st.booleans()),
        "bias": draw(st.booleans()),
        "running": (not training) or draw(st.booleans()),
        "param_dtype": draw(st.sampled_from([torch.float32, dtype])) if dtype in HALF else dtype,
        "momentum": draw(st.sampled_from(MOMENTA)),
        "eps": draw(st.sampled_from([1e-5, 1e-3])),
        "activation": draw(st.sampled_from(["relu", "identity", "leaky_relu", "relu6", "silu"])),
        "negative_slope": draw(st.sampled_from(SLOPES)),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }
    if case["residual"] == "x":  # the residual in the same storage as the input, the common case
        case["r_layout"] = case["x_layout"]
    return case


def _bn_inputs(case: dict) -> dict:
    g = torch.Generator().manual_seed(case["seed"])
    shape, C, scale = case["shape"], case["shape"][1], case["scale"]
    offset = case["offset"] * scale * (1 + 0.1 * torch.randn(C, generator=g, dtype=torch.float64))
    pdt = case["param_dtype"]
    x64 = values(shape, g, scale, offset)
    if case["x_layout"] == "expanded":
        x64 = x64[:1].expand(shape)
    r64 = values(shape, g, 1.0) if case["residual"] else None
    if r64 is not None and case["r_layout"] == "expanded":
        r64 = r64[:1].expand(shape)
    w = (torch.randn(C, generator=g, dtype=torch.float64) * 2).to(pdt) if case["weight"] else None
    b = torch.randn(C, generator=g, dtype=torch.float64).to(pdt) if case["bias"] else None
    rm = rv = None
    if case["running"]:
        rm = (offset + scale * torch.randn(C, generator=g, dtype=torch.float64) * 0.3).to(pdt)
        rv = (scale**2 * (torch.rand(C, generator=g, dtype=torch.float64) * 1.5 + 0.5)).to(pdt)
    dy = values(shape, g)
    return {"x": x64, "r": r64, "w": w, "b": b, "rm": rm, "rv": rv, "dy": dy}


def _bn_run(fn: Callable, case: dict, data: dict, dtype: torch.dtype, dy64: torch.Tensor) -> dict:
    """fn's output, gradients (input, residual, weight, bias) and running statistics; full-size tensors in
    ``dtype`` in the case's storages (float64: contiguous), parameters in the case's or float64."""
    full_dtype = dtype
    pdt = torch.float64 if dtype == torch.float64 else case["param_dtype"]
    perm = case["seed"] % 997
    x_leaf, x = _leaf(data["x"], full_dtype, _storage(case["x_layout"], dtype), perm)
    r_leaf = r = None
    if data["r"] is not None:
        r_leaf, r = _leaf(data["r"], full_dtype, _storage(case["r_layout"], dtype), perm + 1)
    w = data["w"].to(pdt).clone().requires_grad_() if data["w"] is not None else None
    b = data["b"].to(pdt).clone().requires_grad_() if data["b"] is not None else None
    rm = data["rm"].to(pdt).clone() if data["rm"] is not None else None
    rv = data["rv"].to(pdt).clone() if data["rv"] is not None else None
    out = fn(
        x, rm, rv, w, b, case["training"], case["momentum"], case["eps"], residual=r,
        activation=case["activation"], negative_slope=case["negative_slope"],
    )  # fmt: skip
    gx, gr, gw, gb = _grads(out, [x_leaf, r_leaf, w, b], dy64.to(full_dtype))
    return {"out": out.detach(), "gx": gx, "gr": gr, "gw": gw, "gb": gb, "rm": rm, "rv": rv}


def oracle_shift(x64: torch.Tensor) -> torch.Tensor:
    """A constant near each channel's mean for the float64 oracle to subtract: Tensor[C] (0 for an empty input).

    The channel's mean rounded to float32: x - c is then exact in float64 for inputs rounded to float32 or narrower
    (two float32 values differ by a float64 exactly), and for float64 inputs within a factor 2 of c (Sterbenz's
    lemma), i.e. whenever the mean is large against the spread, the case the shift is for; elsewhere it rounds once,
    at the size of x - c, below the oracle's other roundings.
    """
    C = x64.shape[1]
    if x64.numel() == 0:
        return torch.zeros(C, dtype=torch.float64)
    c = x64.detach().double().mean(reduce_dims(x64.dim())).float().double()
    return torch.where(torch.isfinite(c), c, torch.zeros_like(c))


def _batch_stats64(x64: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 oracle's batch mean and biased variance, taken about :func:`oracle_shift` (accurate at any mean
    offset, where PyTorch's float64 sums of the values themselves lose ~offset units of rounding of the mean)."""
    dims = reduce_dims(x64.dim())
    if x64.numel() == 0:
        C = x64.shape[1]
        return torch.zeros(C, dtype=torch.float64), torch.zeros(C, dtype=torch.float64)
    c = oracle_shift(x64)
    d = x64 - channel_view(c, x64.dim())
    return d.mean(dims) + c, d.var(dims, correction=0)


def _shift_running_mean(running_mean: torch.Tensor | None, c: torch.Tensor) -> torch.Tensor | None:
    """The running mean of inputs shifted by -c (float64), for the shifted oracle."""
    return running_mean.double() - c if running_mean is not None else None


def check_bn_case(case: dict) -> None:
    dtype = case["dtype"]
    data = _bn_inputs(case)
    # The oracle sees exactly the rounded values the ops see.
    rounded = {k: (v.to(dtype).double() if k in ("x", "r", "dy") and v is not None else v) for k, v in data.items()}
    rounded["w"] = data["w"].double() if data["w"] is not None else None
    rounded["b"] = data["b"].double() if data["b"] is not None else None
    x64 = rounded["x"]
    if case["training"]:
        mean, var = _batch_stats64(x64)
    else:
        mean, var = data["rm"].double(), data["rv"].double()
    invstd = (var + case["eps"]).rsqrt()
    dy64 = rounded["dy"]
    if activation_kinks(case["activation"]):  # silu is smooth: no branch to be ambiguous about
        kinks = activation_kinks(case["activation"])
        amb = ambiguous_branch(x64, mean, invstd, rounded["w"], rounded["b"], rounded["r"], dtype, kinks=kinks)
        dy64 = dy64.masked_fill(amb, 0.0)
    ours = _bn_run(fusedres.batch_norm_act, case, rounded, dtype, dy64)
    same = _bn_run(reference.batch_norm_act, case, rounded, dtype, dy64)
    # The oracle on x - c (module doc): every result is shift-invariant but the running mean, shifted back.
    c = oracle_shift(x64)
    shifted = {**rounded, "x": x64.detach() - channel_view(c, x64.dim()), "rm": _shift_running_mean(rounded["rm"], c)}
    ref = _bn_run(reference.batch_norm_act, case, shifted, torch.float64, dy64)
    if ref["rm"] is not None:
        ref["rm"] = ref["rm"] + c

    assert ours["out"].dtype == dtype and ours["out"].shape == case["shape"]
    nd = len(case["shape"])
    w_abs = channel_view(rounded["w"].abs(), nd) if rounded["w"] is not None else 1.0
    x_hat = (x64 - channel_view(mean, nd)) * channel_view(invstd, nd)
    dy_abs = dy64.abs()
    n_expand = case["shape"][0] if case["x_layout"] == "expanded" else 1
    dims = reduce_dims(nd)
    # The pre-activation's terms: normalised input times weight, bias, residual.
    out_scale = max_abs(x_hat * w_abs) + max_abs(rounded["b"]) + max_abs(rounded["r"])
    gx_scale = max_abs(dy_abs * w_abs * channel_view(invstd, nd)) * n_expand
    sum_scale = lambda t: max_abs(t.sum(dims)) if t.numel() else 0.0  # noqa: E731
    pdt = case["param_dtype"]
    fold = fold_allowance(x64, invstd, rounded["w"], dtype)
    assert_2x("output", ours["out"], ref["out"], same["out"], out_scale, dtype, fold)
    assert_2x("grad_input", ours["gx"], ref["gx"], same["gx"], gx_scale, dtype)
    r_expand = case["shape"][0] if case["r_layout"] == "expanded" else 1
    assert_2x("grad_residual", ours["gr"], ref["gr"], same["gr"], max_abs(dy64) * r_expand, dtype)
    assert_2x("grad_weight", ours["gw"], ref["gw"], same["gw"], sum_scale(dy_abs * x_hat.abs()), pdt)
    assert_2x("grad_bias", ours["gb"], ref["gb"], same["gb"], sum_scale(dy_abs), pdt)
    if ours["rm"] is not None:
        assert_2x("running_mean", ours["rm"], ref["rm"], same["rm"], max(max_abs(data["rm"]), max_abs(mean)), pdt)
        assert_2x("running_var", ours["rv"], ref["rv"], same["rv"], max(max_abs(data["rv"]), max_abs(var)) * 2, pdt)


@given(bn_cases())
def test_batch_norm_act_properties(case: dict) -> None:
    check_bn_case(case)


# ------------------------------------------------------------------------------------------- dense_batch_norm_act


@st.composite
def dense_cases(draw) -> dict:
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    base = draw(shapes(allow_empty=True))
    ndim = len(base)
    k = draw(st.integers(1, 4))
    channels = [draw(st.sampled_from([1, 2, 3, 4, 5, 7, 8, 9, 16, 17])) for _ in range(k)]
    while len(channels) > 1 and math.prod(base[:1] + base[2:]) * sum(channels) > MAX_NUMEL:
        channels.pop()
    training = draw(st.booleans())
    if training and base[0] * math.prod(base[2:]) == 1:
        base = (2,) + base[1:]
    scale, offset = _magnitude(draw, dtype)
    return {
        "dtype": dtype,
        "base": base,
        "channels": channels,
        "layouts": [draw(st.sampled_from(storage_layouts(ndim))) for _ in channels],
        "training": training,
        "input_stats": training and draw(st.booleans()),
        "scale": scale,
        "offset": offset,
        "weight": draw(st.booleans()),
        "bias": draw(st.booleans()),
        "running": (not training) or draw(st.booleans()),
        "param_dtype": draw(st.sampled_from([torch.float32, dtype])) if dtype in HALF else dtype,
        "momentum": draw(st.sampled_from(MOMENTA)),
        "eps": 1e-5,
        "activation": draw(st.sampled_from(["relu", "identity", "leaky_relu"])),
        "negative_slope": draw(st.sampled_from(SLOPES)),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _dense_reference(inputs, rm, rv, w, b, training, momentum, eps, *, activation, negative_slope, input_stats=None):
    """Plain PyTorch: cat + F.batch_norm + act (input_stats are the inputs' own statistics: not needed here)."""
    return reference.batch_norm_act(
        torch.cat(inputs, 1), rm, rv, w, b, training, momentum, eps, activation=activation,
        negative_slope=negative_slope,
    )  # fmt: skip


def _dense_run(fn, case, xs64, params, dtype, dy64, use_stats: bool) -> dict:
    pdt = torch.float64 if dtype == torch.float64 else case["param_dtype"]
    leaves = [
        arrange(x, dtype, _storage(lay, dtype), case["seed"] + j).requires_grad_()
        for j, (x, lay) in enumerate(zip(xs64, case["layouts"], strict=True))
    ]
    w = params["w"].to(pdt).clone().requires_grad_() if params["w"] is not None else None
    b = params["b"].to(pdt).clone().requires_grad_() if params["b"] is not None else None
    rm = params["rm"].to(pdt).clone() if params["rm"] is not None else None
    rv = params["rv"].to(pdt).clone() if params["rv"] is not None else None
    stats = [bn_stats(x) for x in leaves] if use_stats else None
    out = fn(
        leaves, rm, rv, w, b, case["training"], case["momentum"], case["eps"], activation=case["activation"],
        negative_slope=case["negative_slope"], input_stats=stats,
    )  # fmt: skip
    grads = _grads(out, [*leaves, w, b], dy64.to(dtype))
    return {"out": out.detach(), "gx": grads[: len(leaves)], "gw": grads[-2], "gb": grads[-1], "rm": rm, "rv": rv}


def check_dense_case(case: dict) -> None:
    dtype = case["dtype"]
    g = torch.Generator().manual_seed(case["seed"])
    base, channels = case["base"], case["channels"]
    C = sum(channels)
    offsets = case["offset"] * case["scale"] * (1 + 0.1 * torch.randn(C, generator=g, dtype=torch.float64))
    xs64, start = [], 0
    for cj in channels:
        shape = (base[0], cj, *base[2:])
        xs64.append(values(shape, g, case["scale"], offsets[start : start + cj]).to(dtype).double())
        start += cj
    pdt = case["param_dtype"]
    params = {
        "w": (torch.randn(C, generator=g, dtype=torch.float64) * 2).to(pdt).double() if case["weight"] else None,
        "b": torch.randn(C, generator=g, dtype=torch.float64).to(pdt).double() if case["bias"] else None,
        "rm": None,
        "rv": None,
    }
    if case["running"]:
        params["rm"] = (offsets + case["scale"] * 0.3 * torch.randn(C, generator=g, dtype=torch.float64)).to(pdt)
        params["rv"] = (case["scale"] ** 2 * (torch.rand(C, generator=g, dtype=torch.float64) + 0.5)).to(pdt)
    out_shape = (base[0], C, *base[2:])
    dy64 = values(out_shape, g).to(dtype).double()
    cat64 = torch.cat(xs64, 1)
    if case["training"]:
        mean, var = _batch_stats64(cat64)
    else:
        mean, var = params["rm"].double(), params["rv"].double()
    invstd = (var + case["eps"]).rsqrt()
    if case["activation"] != "identity":
        amb = ambiguous_branch(cat64, mean, invstd, params["w"], params["b"], None, dtype)
        dy64 = dy64.masked_fill(amb, 0.0)
    ours = _dense_run(fusedres.dense_batch_norm_act, case, xs64, params, dtype, dy64, case["input_stats"])
    same = _dense_run(_dense_reference, case, xs64, params, dtype, dy64, False)
    # The oracle on the maps shifted by c (module doc), the running mean shifted back.
    c = oracle_shift(cat64)
    xs_shifted = [x.detach() - channel_view(cj, x.dim()) for x, cj in zip(xs64, c.split(channels), strict=True)]
    ref = _dense_run(_dense_reference, case, xs_shifted, {**params, "rm": _shift_running_mean(params["rm"], c)},
                     torch.float64, dy64, False)  # fmt: skip
    if ref["rm"] is not None:
        ref["rm"] = ref["rm"] + c

    nd = len(base)
    dims = reduce_dims(nd)
    w_abs = channel_view(params["w"].abs(), nd) if params["w"] is not None else 1.0
    x_hat = (cat64 - channel_view(mean, nd)) * channel_view(invstd, nd)
    sum_scale = lambda t: max_abs(t.sum(dims)) if t.numel() else 0.0  # noqa: E731
    out_scale = max_abs(x_hat * w_abs) + max_abs(params["b"])
    fold = fold_allowance(cat64, invstd, params["w"], dtype)
    assert_2x("output", ours["out"], ref["out"], same["out"], out_scale, dtype, fold)
    gx_scale = max_abs(dy64.abs() * w_abs * channel_view(invstd, nd))
    for j, (got, want, same_j) in enumerate(zip(ours["gx"], ref["gx"], same["gx"], strict=True)):
        assert_2x(f"grad inputs[{j}]", got, want, same_j, gx_scale, dtype)
    assert_2x("grad_weight", ours["gw"], ref["gw"], same["gw"], sum_scale(dy64.abs() * x_hat.abs()), pdt)
    assert_2x("grad_bias", ours["gb"], ref["gb"], same["gb"], sum_scale(dy64.abs()), pdt)
    if ours["rm"] is not None:
        assert_2x("running_mean", ours["rm"], ref["rm"], same["rm"], max(max_abs(params["rm"]), max_abs(mean)), pdt)
        assert_2x("running_var", ours["rv"], ref["rv"], same["rv"], max(max_abs(params["rv"]), max_abs(var)) * 2, pdt)


@given(dense_cases())
def test_dense_batch_norm_act_properties(case: dict) -> None:
    check_dense_case(case)


# ------------------------------------------------------------------------------------------ highway, highway_packed


@st.composite
def highway_cases(draw) -> dict:
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    ndim = draw(st.integers(1, 4))
    shape = [draw(st.sampled_from(SIZES + [24, 31, 32, 33, 64, 65])) for _ in range(ndim)]
    while math.prod(shape) > MAX_NUMEL:
        shape[0] = max(1, shape[0] // 2)
        if math.prod(shape) > MAX_NUMEL:
            shape = shape[1:] or [1]
    if draw(st.integers(0, 19)) == 0:
        shape[draw(st.integers(0, len(shape) - 1))] = 0
    layouts = storage_layouts(len(shape)) + ["expanded"]
    return {
        "dtype": dtype,
        "shape": tuple(shape),
        "free_carry": draw(st.booleans()),
        "activation": draw(st.sampled_from(["relu", "tanh", "sigmoid", "identity"])),
        "layouts": [draw(st.sampled_from(layouts)) for _ in range(4)],
        "scale": 10.0 ** draw(st.integers(-2, 2 if dtype != torch.float16 else 1)),
        "gate_scale": draw(st.sampled_from([0.1, 1.0, 5.0, 30.0])),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _highway_run(fn, case, vals64, dtype, dy64) -> list:
    pairs = [
        _leaf(v, dtype, _storage(lay, dtype), case["seed"] + i) if v is not None else (None, None)
        for i, (v, lay) in enumerate(zip(vals64, case["layouts"], strict=True))
    ]
    h, g, c, cg = (p[1] for p in pairs)
    out = fn(h, g, c, activation=case["activation"], carry_gate=cg)
    return [out.detach(), *_grads(out, [p[0] for p in pairs], dy64.to(dtype))]


def check_highway_case(case: dict) -> None:
    dtype, shape = case["dtype"], case["shape"]
    gen = torch.Generator().manual_seed(case["seed"])
    s = case["scale"]
    vals = [values(shape, gen, s), values(shape, gen, case["gate_scale"]), values(shape, gen, s)]
    vals.append(values(shape, gen, case["gate_scale"]) if case["free_carry"] else None)
    for i, lay in enumerate(case["layouts"]):
        if lay == "expanded" and vals[i] is not None and len(shape) > 0:
            vals[i] = vals[i][:1].expand(shape)
    vals = [v.to(dtype).double() if v is not None else None for v in vals]
    dy64 = values(shape, gen).to(dtype).double()
    ours = _highway_run(fusedres.highway, case, vals, dtype, dy64)
    same = _highway_run(reference.highway, case, vals, dtype, dy64)
    ref = _highway_run(reference.highway, case, vals, torch.float64, dy64)
    n_exp = [shape[0] if lay == "expanded" and len(shape) else 1 for lay in case["layouts"]]
    h_scale = max(max_abs(vals[0]), 1.0 if case["activation"] == "sigmoid" else 0.0)
    scales = [
        max(h_scale, max_abs(vals[2])),
        max_abs(dy64) * n_exp[0],
        max_abs(dy64) * (h_scale + max_abs(vals[2])) * n_exp[1],
        max_abs(dy64) * n_exp[2],
        max_abs(dy64) * max_abs(vals[2]) * n_exp[3],
    ]
    names = ["output", "grad_transform", "grad_gate", "grad_carry", "grad_carry_gate"]
    for name, got, want, same_t, scale in zip(names, ours, ref, same, scales, strict=True):
        assert_2x(name, got, want, same_t, scale, dtype)


@given(highway_cases())
def test_highway_properties(case: dict) -> None:
    check_highway_case(case)


@st.composite
def packed_cases(draw) -> dict:
    case = draw(highway_cases())
    shape = list(case["shape"])
    if not shape:
        shape = [1]
    dim = draw(st.integers(-len(shape), len(shape) - 1))
    parts = 3 if case["free_carry"] else 2
    packed = list(shape)
    packed[dim] *= parts
    case.update(shape=tuple(shape), dim=dim, packed=tuple(packed))
    case["p_layout"] = draw(st.sampled_from(storage_layouts(len(shape))))
    case["c_layout"] = draw(st.sampled_from(storage_layouts(len(shape)) + ["expanded"]))
    return case


def check_packed_case(case: dict) -> None:
    dtype, shape, packed, dim = case["dtype"], case["shape"], case["packed"], case["dim"]
    gen = torch.Generator().manual_seed(case["seed"])
    parts = 3 if case["free_carry"] else 2
    chunks = [values(shape, gen, case["scale"])] + [values(shape, gen, case["gate_scale"]) for _ in range(parts - 1)]
    proj64 = torch.cat(chunks, dim).to(dtype).double()
    carry64 = values(shape, gen, case["scale"])
    if case["c_layout"] == "expanded":
        carry64 = carry64[:1].expand(shape)
    carry64 = carry64.to(dtype).double()
    dy64 = values(shape, gen).to(dtype).double()
    assert proj64.shape == packed

    def run(fn, dt):
        p = arrange(proj64, dt, _storage(case["p_layout"], dt), case["seed"]).requires_grad_()
        c_leaf, c = _leaf(carry64, dt, _storage(case["c_layout"], dt), case["seed"] + 1)
        out = fn(p, c, activation=case["activation"], dim=dim, free_carry=case["free_carry"])
        return [out.detach(), *_grads(out, [p, c_leaf], dy64.to(dt))]

    ours = run(fusedres.highway_packed, dtype)
    same = run(reference.highway_packed, dtype)
    ref = run(reference.highway_packed, torch.float64)
    n_exp = shape[0] if case["c_layout"] == "expanded" else 1
    h_scale = max(max_abs(proj64), 1.0)
    dy_max = max_abs(dy64)
    scales = [h_scale + max_abs(carry64), dy_max * (h_scale + max_abs(carry64)), dy_max * n_exp]
    for name, got, want, same_t, scale in zip(["output", "grad_projected", "grad_carry"], ours, ref, same, scales):
        assert_2x(name, got, want, same_t, scale, dtype)


@given(packed_cases())
def test_highway_packed_properties(case: dict) -> None:
    check_packed_case(case)


# ---------------------------------------------------------------------------- building blocks (docs/design.md section 7)

ops = torch.ops.fusedres


@st.composite
def block_cases(draw) -> dict:
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    shape = draw(shapes())
    if shape[0] * math.prod(shape[2:]) == 1:
        shape = (2,) + shape[1:]
    scale, offset = _magnitude(draw, dtype)
    return {
        "dtype": dtype,
        "shape": shape,
        "layout": draw(st.sampled_from(storage_layouts(len(shape)))),
        "residual": draw(st.booleans()),
        "weight": draw(st.booleans()),
        "bias": draw(st.booleans()),
        # relu6 too; not silu, which the building-block backward ops refuse (they take no bias / residual)
        "activation": draw(st.sampled_from(["relu", "identity", "leaky_relu", "relu6"])),
        "negative_slope": draw(st.sampled_from(SLOPES)),
        "count_factor": draw(st.sampled_from([1, 3])),
        "scale": scale,
        "offset": offset,
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _act_grad(z: torch.Tensor, activation: str, slope: float) -> torch.Tensor:
    if activation == "identity":
        return torch.ones_like(z)
    if activation == "relu6":  # 1 exactly where 0 < z < 6 (hardtanh_backward's kinks; NaN: 0, as relu's bit)
        return ((z > 0) & (z < 6)).to(z.dtype)
    below = torch.full_like(z, 0.0 if activation == "relu" else slope)  # (a Python float would be float32 here)
    return torch.where(z > 0, torch.ones_like(z), below)


def _act(z: torch.Tensor, activation: str, slope: float) -> torch.Tensor:
    if activation == "relu":
        return torch.relu(z)
    if activation == "leaky_relu":
        return torch.nn.functional.leaky_relu(z, slope)
    if activation == "relu6":
        return torch.nn.functional.relu6(z)
    return z


def check_block_case(case: dict) -> None:
    """bn_stats, bn_act_elemt, bn_act_backward_reduce and bn_act_backward_elemt against their float64 formulas.

    PyTorch's own same-dtype path is the same formulas in the dtype PyTorch's CPU BatchNorm computes in (the
    accumulation dtype: float64 for float64 inputs, else float32), full-size results rounded to the input dtype.
    """
    dtype, shape = case["dtype"], case["shape"]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(case["seed"])
    nd, C = len(shape), shape[1]
    offset = case["offset"] * case["scale"] * (1 + 0.1 * torch.randn(C, generator=g, dtype=torch.float64))
    x64 = values(shape, g, case["scale"], offset).to(dtype).double()
    r64 = values(shape, g).to(dtype).double() if case["residual"] else None
    w64 = (torch.randn(C, generator=g, dtype=torch.float64) * 2).to(dtype).double() if case["weight"] else None
    b64 = torch.randn(C, generator=g, dtype=torch.float64).to(dtype).double() if case["bias"] else None
    dy64 = values(shape, g).to(dtype).double()
    act, slope = case["activation"], case["negative_slope"]
    lay = case["layout"]
    x = arrange(x64, dtype, lay, case["seed"])
    r = arrange(r64, dtype, lay, case["seed"] + 1) if r64 is not None else None
    w = w64.to(dtype) if w64 is not None else None
    b = b64.to(dtype) if b64 is not None else None
    dims = reduce_dims(nd)
    cv = lambda v: channel_view(v, nd)  # noqa: E731

    # bn_stats
    mean, var = ops.bn_stats(x)
    assert mean.dtype == var.dtype == acc
    mean64, var64 = _batch_stats64(x64)  # the shifted oracle; PyTorch's float64 var_mean is the same-dtype result
    same_mean, same_var = _stats_acc(x64.to(acc), dims)
    assert_2x("bn_stats mean", mean, mean64, same_mean, max_abs(x64), acc)
    assert_2x("bn_stats var", var, var64, same_var, max_abs(var64) + max_abs(x64 - cv(mean64)) ** 2, acc)
    if x64.numel() == 0:
        return

    # bn_act_elemt with given statistics (ours, in acc dtype): the oracle uses the same given vectors.
    invstd = (var.double() + 1e-5).rsqrt().to(acc)
    m64, s64 = mean.double(), invstd.double()

    def elemt(dt, rnd):
        z = (x64.to(dt) - cv(m64.to(dt))) * cv(s64.to(dt))
        if w64 is not None:
            z = z * cv(w64.to(dt))
        if b64 is not None:
            z = z + cv(b64.to(dt))
        if r64 is not None:
            z = z + r64.to(dt)
        return _act(z, act, slope).to(rnd), z

    y, mask = ops.bn_act_elemt(x, r, w, b, mean, invstd, act, slope)
    y_ref, z64 = elemt(torch.float64, torch.float64)
    y_same, _ = elemt(acc, dtype)
    out_scale = max(max_abs(y_ref), max_abs(r64), max_abs(b64), max_abs(x64 * cv(s64)) * max(max_abs(w64), 1.0))
    assert_2x("bn_act_elemt", y, y_ref, y_same, out_scale, dtype)

    # backward_reduce / backward_elemt with our mask; gradients zeroed where the branch is ambiguous.
    if act != "identity":
        amb = ambiguous_branch(x64, m64, s64, w64, b64, r64, dtype, kinks=activation_kinks(act))
        dy64 = dy64.masked_fill(amb, 0.0)
    dy = arrange(dy64, dtype, lay, case["seed"] + 2)
    x_hat64 = (x64 - cv(m64)) * cv(s64)
    dz64 = dy64 * _act_grad(z64, act, slope)
    sum_dz, sum_dz_xhat = ops.bn_act_backward_reduce(dy, x, mean, invstd, mask, act, slope)
    x_hat_acc = (x64.to(acc) - cv(m64.to(acc))) * cv(s64.to(acc))
    dz_acc = dy64.to(acc) * _act_grad(z64, act, slope).to(acc)
    assert_2x("sum_dz", sum_dz, dz64.sum(dims), dz_acc.sum(dims), max_abs(dz64.abs().sum(dims)), acc)
    sxh_scale = max_abs((dz64.abs() * x_hat64.abs()).sum(dims))
    assert_2x("sum_dz_xhat", sum_dz_xhat, (dz64 * x_hat64).sum(dims), (dz_acc * x_hat_acc).sum(dims), sxh_scale, acc)

    count = case["count_factor"] * x64.numel() // C
    sdz, sdzx = sum_dz.double(), sum_dz_xhat.double()
    gi, gr = ops.bn_act_backward_elemt(dy, x, w, mean, invstd, mask, sum_dz, sum_dz_xhat, count, act, slope, [True, True])

    def elemt_backward(dt, rnd):
        ws = cv(s64.to(dt)) * (cv(w64.to(dt)) if w64 is not None else 1.0)
        dz = dy64.to(dt) * _act_grad(z64, act, slope).to(dt)
        xh = (x64.to(dt) - cv(m64.to(dt))) * cv(s64.to(dt))
        return (ws * (dz - cv(sdz.to(dt)) / count - xh * cv(sdzx.to(dt)) / count)).to(rnd), dz.to(rnd)

    (gi_ref, gr_ref), (gi_same, gr_same) = elemt_backward(torch.float64, torch.float64), elemt_backward(acc, dtype)
    w_max = max(max_abs(w64), 1.0) if w64 is not None else 1.0
    gi_scale = w_max * max_abs(s64) * (max_abs(dy64) + (max_abs(sdz) + max_abs(x_hat64) * max_abs(sdzx)) / count)
    assert_2x("backward_elemt grad_input", gi, gi_ref, gi_same, gi_scale, dtype)
    assert_2x("backward_elemt grad_residual", gr, gr_ref, gr_same, max_abs(dy64), dtype)


def _stats_acc(x: torch.Tensor, dims: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance as PyTorch computes them in ``x``'s dtype (float32: two-pass var_mean)."""
    if x.numel() == 0:
        C = x.shape[1]
        return torch.zeros(C, dtype=x.dtype), torch.zeros(C, dtype=x.dtype)
    var, mean = torch.var_mean(x, dims, correction=0)
    return mean, var


@given(block_cases())
def test_building_block_properties(case: dict) -> None:
    check_block_case(case)


# --------------------------------------------------------------------------------------------- the harness itself


def test_profile_and_mean_offset_constant() -> None:
    """The suite reproduces (derandomised unless fuzzing) and MAX_MEAN_OFFSET is a power of ten the strategies use."""
    from _numerics import is_power_of_ten

    assert is_power_of_ten(MAX_MEAN_OFFSET)
    assert max(_mean_offsets()) == MAX_MEAN_OFFSET
    if PROFILE == "ci":
        assert settings().derandomize


def test_the_rule_catches_an_error() -> None:
    """assert_2x fails for a result twice as far from the oracle as PyTorch's plus more than the floor."""
    ref = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    same = ref.float() + torch.tensor([1e-4, 0.0, 0.0])
    assert_2x("ok", ref.float() + torch.tensor([1.5e-4, 0.0, 0.0]), ref, same, 3.0, torch.float32)
    with pytest.raises(AssertionError, match="error"):
        assert_2x("bad", ref.float() + torch.tensor([3e-4, 0.0, 0.0]), ref, same, 3.0, torch.float32)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_2x("nan", torch.tensor([float("nan"), 2.0, 3.0]), ref, same, 3.0, torch.float32)
