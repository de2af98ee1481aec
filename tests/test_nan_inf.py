"""NaN / Inf propagation: each op, with one NaN, +Inf or -Inf in each position (input, residual, weight, bias,
running statistics, gradient), gives the same non-finite values as plain PyTorch (the reference ops in the same
dtype) in every output, gradient and updated running statistic — the same elements NaN, +Inf and -Inf — and the
same finite values elsewhere.

Deliberate differences (also in the README's Reliability section), asserted as such below:

* BatchNorm ReLU where the pre-activation is NaN: the output is NaN in both, but our mask bit is 0 (``z > 0`` is
  false), so no gradient flows back through that element, while PyTorch's relu backward (which tests
  ``output <= 0``, false for NaN) passes it on. The PyTorch runs of these tests zero the upstream gradient where
  the ReLU output is NaN; everything else must then match.
* Highway ReLU where the transform is NaN: our derivative ``(h > 0)`` is 0 there, PyTorch's passes the gradient
  on (same reason); the PyTorch runs zero the transform gradient at NaN transforms.
* An infinite BatchNorm weight: the channel's input gradient is non-finite in both, but NaN in ours where PyTorch
  may give +-Inf. The backward ``w * invstd * (dz - mean(dz) - x_hat * mean(dz * x_hat))`` meets Inf * 0 and
  Inf - Inf in a different order from PyTorch's; either way the channel's gradient carries no information.
* Highway, an infinite upstream gradient: the gate gradient is ``dy * (H - x) * T * (1 - T)`` (docs/design.md section 2),
  +-Inf where PyTorch's autograd of ``H * T + x * (1 - T)`` forms ``Inf * H - Inf * x`` = NaN (same elements).
"""

from __future__ import annotations

import pytest
import torch

import fusedres
from fusedres import reference

pytestmark = pytest.mark.needs_native

NAN, INF = float("nan"), float("inf")
VALUES = {"nan": NAN, "+inf": INF, "-inf": -INF}
LAYOUTS = ["contiguous", "channels_last"]


def kinds(t: torch.Tensor) -> torch.Tensor:
    """Per element: 0 finite, 1 NaN, 2 +Inf, 3 -Inf."""
    out = torch.zeros(t.shape, dtype=torch.uint8)
    out[torch.isnan(t)] = 1
    out[torch.isposinf(t)] = 2
    out[torch.isneginf(t)] = 3
    return out


def assert_same_propagation(name: str, ours: torch.Tensor | None, torch_: torch.Tensor | None, rtol: float) -> None:
    """Same NaN / +Inf / -Inf elements; the finite values agree to ``rtol`` (relative to the largest)."""
    assert (ours is None) == (torch_ is None), name
    if ours is None:
        return
    ko, kt = kinds(ours.detach()), kinds(torch_.detach())
    diff = (ko != kt).nonzero()
    assert diff.shape[0] == 0, (
        f"{name}: {diff.shape[0]} elements differ in kind (0 finite, 1 NaN, 2 +Inf, 3 -Inf), first at "
        f"{diff[0].tolist()}: ours {ko[tuple(diff[0])].item()}, PyTorch {kt[tuple(diff[0])].item()}"
    )
    finite = ko == 0
    a, b = ours.detach().double()[finite], torch_.detach().double()[finite]
    if b.numel():
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * max(b.abs().max().item(), 1.0), msg=name)


def assert_same_nonfinite_set(name: str, ours: torch.Tensor, torch_: torch.Tensor) -> None:
    """Non-finite in the same elements (the kind may differ: a documented difference)."""
    assert torch.equal(torch.isfinite(ours), torch.isfinite(torch_)), f"{name}: non-finite in other elements"


def _tol(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]


# ---------------------------------------------------------------------------------------------------- bn_act


def _stop_at_nan_relu(y: torch.Tensor, dy: torch.Tensor, activation: str) -> torch.Tensor:
    """The upstream gradient as our BatchNorm ReLU mask sees it: zero where the ReLU output is NaN (module doc)."""
    return dy.masked_fill(torch.isnan(y.detach()), 0.0) if activation == "relu" else dy


def bn_step(fn, position: str, value: float, training: bool, activation: str, layout: str, dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    shape = (3, 4, 5, 6)
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    x, r, dy = (torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))
    w = (torch.rand(4, generator=g, dtype=torch.float64) + 0.5).to(pdt)
    b = torch.randn(4, generator=g, dtype=torch.float64).to(pdt)
    rm = (torch.randn(4, generator=g, dtype=torch.float64) * 0.1).to(pdt)
    rv = (torch.rand(4, generator=g, dtype=torch.float64) + 0.5).to(pdt)
    at = (1, 2, 3, 4)
    {"input": x, "residual": r, "grad": dy}.get(position, torch.empty(shape))[at] = value
    {"weight": w, "bias": b, "running_mean": rm, "running_var": rv}.get(position, torch.empty(4))[2] = value
    if layout == "channels_last":
        x, r, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, r, dy))
    leaves = [t.requires_grad_() for t in (x, r, w, b)]
    y = fn(x, rm, rv, w, b, training, 0.1, 1e-5, residual=r, activation=activation, negative_slope=0.1)
    gx, gr, gw, gb = torch.autograd.grad(y, leaves, _stop_at_nan_relu(y, dy, activation))
    return {"output": y, "grad_input": gx, "grad_residual": gr, "grad_weight": gw, "grad_bias": gb, "running_mean": rm,
            "running_var": rv}  # fmt: skip


BN_POSITIONS = ["input", "residual", "weight", "bias", "running_mean", "running_var", "grad"]


def _bn_expectation(position: str, value: str, training: bool, layout: str) -> str:
    if position == "weight" and value != "nan":
        return "weight-inf"
    return "same"


# Deliberate difference (docs/design.md section 1): the CPU kernels evaluate (x - centre) * scale + shift, PyTorch
# x * alpha + beta with beta = b - mean * alpha. With an infinite weight alpha is infinite and PyTorch's form gives
# inf - inf = NaN for most elements; ours gives +-inf (or NaN where x == centre), which the activation may turn into
# a finite 0. What is kept: nothing is non-finite in ours where PyTorch's result is finite.
WEIGHT_INF_DIFFERS = ("output", "grad_residual", "grad_weight", "grad_bias")


def assert_nonfinite_within(name: str, ours, theirs) -> None:
    bad = ~torch.isfinite(ours) & torch.isfinite(theirs)
    assert not bad.any(), f"{name}: {int(bad.sum())} elements non-finite in ours but finite in PyTorch"


def _check_bn_like(ours: dict, theirs: dict, expectation: str, dtype) -> None:
    for name in ours:
        if expectation == "weight-inf" and name == "grad_input":
            assert_same_nonfinite_set(name, ours[name], theirs[name])
            continue
        if expectation == "weight-inf" and name in WEIGHT_INF_DIFFERS:
            assert_nonfinite_within(name, ours[name], theirs[name])
            continue
        assert_same_propagation(name, ours[name], theirs[name], _tol(dtype))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("activation", ["relu", "identity", "leaky_relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("position", BN_POSITIONS)
def test_batch_norm_act(position: str, value: str, training: bool, activation: str, layout: str) -> None:
    expectation = _bn_expectation(position, value, training, layout)
    args = (position, VALUES[value], training, activation, layout, torch.float32)
    _check_bn_like(bn_step(fusedres.batch_norm_act, *args), bn_step(reference.batch_norm_act, *args), expectation,
                   torch.float32)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("position", BN_POSITIONS)
def test_batch_norm_act_dtypes(position: str, value: str, dtype) -> None:
    expectation = _bn_expectation(position, value, True, "contiguous")
    args = (position, VALUES[value], True, "relu", "contiguous", dtype)
    _check_bn_like(bn_step(fusedres.batch_norm_act, *args), bn_step(reference.batch_norm_act, *args), expectation,
                   dtype)  # fmt: skip


@pytest.mark.parametrize("momentum", [0.0, 1.0])
@pytest.mark.parametrize("position", ["running_mean", "running_var", "input"])
def test_running_statistics_momentum_edges(position: str, momentum: float) -> None:
    """momentum 0 keeps a NaN running statistic (0 * batch + 1 * NaN), momentum 1 keeps it too (0 * NaN = NaN), as
    PyTorch's ``(1 - m) * running + m * batch``; a NaN input reaches the running statistics unless momentum is 0."""

    def run(fn):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(4, 3, 5, generator=g)
        rm, rv = torch.zeros(3), torch.ones(3)
        {"input": x[:, 1], "running_mean": rm[1:2], "running_var": rv[1:2]}[position][0] = NAN
        fn(x, rm, rv, None, None, True, momentum, 1e-5)
        return {"running_mean": rm, "running_var": rv}

    ours, theirs = run(fusedres.batch_norm_act), run(reference.batch_norm_act)
    for name in ours:
        assert_same_propagation(name, ours[name], theirs[name], 1e-5)


# ------------------------------------------------------------------------------------------- dense_batch_norm_act


def _dense_reference(inputs, rm, rv, w, b, training, momentum, eps, *, activation, negative_slope):
    return reference.batch_norm_act(
        torch.cat(inputs, 1), rm, rv, w, b, training, momentum, eps, activation=activation, negative_slope=negative_slope
    )


def dense_step(fn, position: str, value: float, training: bool, activation: str, layout: str) -> dict:
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, c, 5, 6, generator=g) for c in (2, 3, 2)]
    dy = torch.randn(3, 7, 5, 6, generator=g)
    w, b = torch.rand(7, generator=g) + 0.5, torch.randn(7, generator=g)
    rm, rv = torch.randn(7, generator=g) * 0.1, torch.rand(7, generator=g) + 0.5
    if position.startswith("inputs"):
        xs[int(position[-2])][1, 1, 3, 4] = value
    if position == "grad":
        dy[1, 3, 3, 4] = value
    {"weight": w, "bias": b, "running_mean": rm, "running_var": rv}.get(position, torch.empty(7))[3] = value
    if layout == "channels_last":
        xs = [t.contiguous(memory_format=torch.channels_last) for t in xs]
        dy = dy.contiguous(memory_format=torch.channels_last)
    leaves = [t.requires_grad_() for t in (*xs, w, b)]
    y = fn(xs, rm, rv, w, b, training, 0.1, 1e-5, activation=activation, negative_slope=0.1)
    grads = torch.autograd.grad(y, leaves, _stop_at_nan_relu(y, dy, activation))
    out = {"output": y, "grad_weight": grads[3], "grad_bias": grads[4], "running_mean": rm, "running_var": rv}
    out.update({f"grad inputs[{j}]": grads[j] for j in range(3)})
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("position", ["inputs[0]", "inputs[1]", "weight", "bias", "running_mean", "running_var", "grad"])
def test_dense_batch_norm_act(position: str, value: str, training: bool, layout: str) -> None:
    expectation = _bn_expectation("input" if position.startswith("inputs") else position, value, training, layout)
    args = (position, VALUES[value], training, "relu", layout)
    ours, theirs = dense_step(fusedres.dense_batch_norm_act, *args), dense_step(_dense_reference, *args)
    for name in ours:
        if expectation == "weight-inf" and name.startswith("grad inputs"):
            assert_same_nonfinite_set(name, ours[name], theirs[name])
        elif expectation == "weight-inf" and not name.startswith("running"):
            assert_nonfinite_within(name, ours[name], theirs[name])
        else:
            assert_same_propagation(name, ours[name], theirs[name], 1e-4)


# ------------------------------------------------------------------------------------------ highway, highway_packed

def highway_step(fn, position: str, value: float, activation: str, free: bool, layout: str, dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    shape = (4, 6, 5, 3)
    names = ["transform", "gate", "carry", "carry_gate", "grad"]
    ts = [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in names]
    at = (1, 2, 3, 1)
    ts[0][at] = -0.5  # an inactive ReLU at the element that gets the NaN / Inf (unless it is the transform's)
    ts[names.index(position)][at] = value
    if layout == "channels_last":
        ts = [t.contiguous(memory_format=torch.channels_last) for t in ts]
    h, gate, carry, carry_gate, dy = ts
    leaves = [t.requires_grad_() for t in (h, gate, carry, *([carry_gate] if free else []))]
    y = fn(h, gate, carry, activation=activation, carry_gate=carry_gate if free else None)
    grads = torch.autograd.grad(y, leaves, dy)
    out = {"output": y, **{f"grad_{n}": gr for n, gr in zip(names, grads)}}
    if fn is reference.highway:
        out["grad_transform"] = _stop_at_nan_transform(out["grad_transform"], h, activation)
    return out


def _stop_at_nan_transform(grad: torch.Tensor, transform: torch.Tensor, activation: str) -> torch.Tensor:
    """PyTorch's transform gradient as our highway ReLU derivative ``(h > 0)`` gives it: 0 where h is NaN."""
    return grad.masked_fill(torch.isnan(transform.detach()), 0.0) if activation == "relu" else grad


def _highway_expectation(position: str, value: str, activation: str) -> str:
    if position == "grad" and value != "nan" and activation in ("relu", "sigmoid", "tanh", "identity"):
        return "gate-inf"
    return "same"


def _check_highway(ours: dict, theirs: dict, expectation: str, dtype) -> None:
    for name in ours:
        if expectation == "gate-inf" and name == "grad_gate":
            assert_same_nonfinite_set(name, ours[name], theirs[name])
        else:
            assert_same_propagation(name, ours[name], theirs[name], _tol(dtype))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("free", [False, True], ids=["coupled", "free"])
@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid", "identity"])
@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("position", ["transform", "gate", "carry", "carry_gate", "grad"])
def test_highway(position: str, value: str, activation: str, free: bool, layout: str) -> None:
    if position == "carry_gate" and not free:
        pytest.skip("the coupled form has no carry_gate")
    expectation = _highway_expectation(position, value, activation)
    args = (position, VALUES[value], activation, free, layout, torch.float32)
    _check_highway(highway_step(fusedres.highway, *args), highway_step(reference.highway, *args), expectation,
                   torch.float32)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("position", ["transform", "gate", "carry", "carry_gate", "grad"])
def test_highway_dtypes(position: str, value: str, dtype) -> None:
    expectation = _highway_expectation(position, value, "tanh")
    args = (position, VALUES[value], "tanh", True, "contiguous", dtype)
    _check_highway(highway_step(fusedres.highway, *args), highway_step(reference.highway, *args), expectation, dtype)


def packed_step(fn, position: str, value: float, activation: str, free: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    f = 6
    parts = 3 if free else 2
    proj = torch.randn(5, parts * f, generator=g)
    carry, dy = torch.randn(5, f, generator=g), torch.randn(5, f, generator=g)
    proj[2, 1] = -0.5  # an inactive ReLU at the element that gets the NaN / Inf (unless it is the transform's)
    where = {"transform": (proj, 1), "gate": (proj, f + 1), "carry_gate": (proj, 2 * f + 1), "carry": (carry, 1),
             "grad": (dy, 1)}[position]  # fmt: skip
    where[0][2, where[1]] = value
    leaves = [t.requires_grad_() for t in (proj, carry)]
    y = fn(proj, carry, activation=activation, dim=-1, free_carry=free)
    gp, gc = torch.autograd.grad(y, leaves, dy)
    if fn is reference.highway_packed:
        gp = gp.clone()
        gp[:, :f] = _stop_at_nan_transform(gp[:, :f], proj[:, :f], activation)
    return {"output": y, "grad_projected": gp, "grad_carry": gc}


@pytest.mark.parametrize("free", [False, True], ids=["coupled", "free"])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("position", ["transform", "gate", "carry", "carry_gate", "grad"])
def test_highway_packed(position: str, value: str, activation: str, free: bool) -> None:
    if position == "carry_gate" and not free:
        pytest.skip("the coupled form has no carry_gate")
    expectation = _highway_expectation(position, value, activation)
    ours = packed_step(fusedres.highway_packed, position, VALUES[value], activation, free)
    theirs = packed_step(reference.highway_packed, position, VALUES[value], activation, free)
    for name in ours:
        if expectation == "gate-inf" and name == "grad_projected":
            assert_same_nonfinite_set(name, ours[name], theirs[name])
        else:
            assert_same_propagation(name, ours[name], theirs[name], 1e-4)


def test_kinds_and_comparison_catch_a_difference() -> None:
    """The comparison itself: a NaN where PyTorch has +Inf, or a changed finite value, fails."""
    a = torch.tensor([1.0, NAN, INF, -INF])
    assert kinds(a).tolist() == [0, 1, 2, 3]
    assert_same_propagation("same", a, a.clone(), 1e-6)
    with pytest.raises(AssertionError, match="differ in kind"):
        assert_same_propagation("kind", torch.tensor([1.0, NAN, NAN, -INF]), a, 1e-6)
    with pytest.raises(AssertionError):
        assert_same_propagation("value", torch.tensor([1.5, NAN, INF, -INF]), a, 1e-6)
