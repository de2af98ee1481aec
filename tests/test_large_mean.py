"""Precision for inputs with a large mean (issue 17): float32 outputs, every gradient and the running statistics
within 2x PyTorch's own float32 error for mean/std = 1e2, 1e3, 1e4, contiguous and channels_last, with and
without a residual, training and eval, forward and backward, on the CPU.

The kind of input a BatchNorm sees after an un-normalised layer. Oracle: plain PyTorch in float64 on the same
float32 inputs; rule and floor of ``tests/_numerics.py`` (no allowance for the folded ``x * scale + shift``: PyTorch
folds too, and at these means its own error is far above a few units of rounding). The upstream gradient is zeroed
where the ReLU's branch is ambiguous at float32 rounding (a band that widens with the mean).

Cases today's kernels fail are marked ``xfail(strict=True)`` (``KNOWN_FAILURES``): the kernel fix turns them into
failures that ask for the mark to be removed.
"""

from __future__ import annotations

import pytest
import torch

import fusedres
from fusedres import reference

from _numerics import ambiguous_branch, assert_2x, channel_view, max_abs, max_err, reduce_dims

pytestmark = pytest.mark.needs_native

RATIOS = [1e2, 1e3, 1e4]
SHAPE = (8, 16, 9, 11)  # 792 values per channel, 16 channels (two AVX2 / one AVX-512 float vector)
EPS = 1e-5
MOMENTUM = 0.1
NAMES = ("output", "grad_input", "grad_residual", "grad_weight", "grad_bias", "running_mean", "running_var")

# (ratio, layout, residual, training) -> the quantities known to exceed 2x PyTorch's float32 error. Empty since the
# CPU kernels normalise as (x - centre) * scale + shift (docs/design.md section 1); before, x * scale + shift
# cancelled a large mean * scale: output error 1.64e-4 where PyTorch's is 6.9e-5 (2.4x) at 1e3 contiguous training.
KNOWN_FAILURES: dict[tuple[float, str, bool, bool], tuple[str, ...]] = {}


def make_case(ratio: float, seed: int = 0) -> dict:
    """float64 values (exactly representable in float32): x with per-channel mean ~ +-ratio * std, std in [0.5, 2]."""
    g = torch.Generator().manual_seed(seed)
    C = SHAPE[1]
    std = torch.rand(C, generator=g, dtype=torch.float64) * 1.5 + 0.5
    sign = torch.where(torch.rand(C, generator=g, dtype=torch.float64) < 0.5, -1.0, 1.0)
    mean = sign * ratio * std * (1 + 0.1 * torch.rand(C, generator=g, dtype=torch.float64))
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64) * channel_view(std, 4) + channel_view(mean, 4)
    running_mean = (mean + std * torch.randn(C, generator=g, dtype=torch.float64) * 0.2).float().double()
    running_var = (std**2 * (torch.rand(C, generator=g, dtype=torch.float64) * 0.5 + 0.75)).float().double()
    return {
        "x": x.float().double(),
        "r": torch.randn(SHAPE, generator=g, dtype=torch.float64).float().double(),
        "w": (torch.randn(C, generator=g, dtype=torch.float64) * 2).float().double(),
        "b": torch.randn(C, generator=g, dtype=torch.float64).float().double(),
        "rm": running_mean,
        "rv": running_var,
        "dy": torch.randn(SHAPE, generator=g, dtype=torch.float64).float().double(),
    }


def run(fn, case: dict, dtype: torch.dtype, layout: str, residual: bool, training: bool, dy: torch.Tensor) -> dict:
    fmt = torch.channels_last if layout == "channels_last" and dtype != torch.float64 else torch.contiguous_format
    x = case["x"].to(dtype).contiguous(memory_format=fmt).requires_grad_()
    r = case["r"].to(dtype).contiguous(memory_format=fmt).requires_grad_() if residual else None
    w, b = (case[k].to(dtype).clone().requires_grad_() for k in ("w", "b"))
    rm, rv = case["rm"].to(dtype).clone(), case["rv"].to(dtype).clone()
    y = fn(x, rm, rv, w, b, training, MOMENTUM, EPS, residual=r, activation="relu")
    leaves = [t for t in (x, r, w, b) if t is not None]
    grads = iter(torch.autograd.grad(y, leaves, dy.to(dtype).contiguous(memory_format=fmt)))
    gx, gr, gw, gb = (next(grads) if t is not None else None for t in (x, r, w, b))
    return dict(zip(NAMES, (y.detach(), gx, gr, gw, gb, rm if training else None, rv if training else None)))


def compare(ratio: float, layout: str, residual: bool, training: bool) -> dict[str, tuple]:
    """Per quantity: (ours, float64 oracle, PyTorch float32, scale of its terms)."""
    return compare_case(make_case(ratio), layout, residual, training)


def compare_case(case: dict, layout: str, residual: bool, training: bool) -> dict[str, tuple]:
    """compare() for the values of ``case`` (as make_case returns them)."""
    x = case["x"]
    if training:
        dims = reduce_dims(4)
        mean, var = x.mean(dims), x.var(dims, correction=0)
    else:
        mean, var = case["rm"], case["rv"]
    invstd = (var + EPS).rsqrt()
    amb = ambiguous_branch(x, mean, invstd, case["w"], case["b"], case["r"] if residual else None, torch.float32)
    dy = case["dy"].masked_fill(amb, 0.0)
    ours = run(fusedres.batch_norm_act, case, torch.float32, layout, residual, training, dy)
    same = run(reference.batch_norm_act, case, torch.float32, layout, residual, training, dy)
    ref = run(reference.batch_norm_act, case, torch.float64, layout, residual, training, dy)
    x_hat = (x - channel_view(mean, 4)) * channel_view(invstd, 4)
    w_abs = channel_view(case["w"].abs(), 4)
    dims = reduce_dims(4)
    scales = {
        "output": max_abs(x_hat * w_abs) + max_abs(case["b"]) + (max_abs(case["r"]) if residual else 0.0),
        "grad_input": max_abs(dy.abs() * w_abs * channel_view(invstd, 4)),
        "grad_residual": max_abs(dy),
        "grad_weight": max_abs((dy.abs() * x_hat.abs()).sum(dims)),
        "grad_bias": max_abs(dy.abs().sum(dims)),
        "running_mean": max(max_abs(case["rm"]), max_abs(mean)),
        "running_var": 2 * max(max_abs(case["rv"]), max_abs(var)),
    }
    return {name: (ours[name], ref[name], same[name], scales[name]) for name in NAMES if ref[name] is not None}


def report(ratio: float, layout: str, residual: bool, training: bool) -> list[str]:
    """One line per quantity: our error, PyTorch's float32 error, their ratio (for the notes on this test)."""
    lines = []
    for name, (got, ref, same, _scale) in compare(ratio, layout, residual, training).items():
        err, torch_err = max_err(got, ref), max_err(same, ref)
        lines.append(f"{name:14s} ours {err:.3g}  PyTorch {torch_err:.3g}  ratio {err / max(torch_err, 1e-300):.2f}")
    return lines


CASES = [
    pytest.param(
        ratio, layout, residual, training,
        id=f"{ratio:.0e}-{layout}-{'res' if residual else 'nores'}-{'train' if training else 'eval'}",
        marks=[
            pytest.mark.xfail(strict=True, reason=f"large-mean precision of today's kernels: {', '.join(bad)}")
        ] if (bad := KNOWN_FAILURES.get((ratio, layout, residual, training))) else [],
    )
    for ratio in RATIOS
    for layout in ("contiguous", "channels_last")
    for residual in (False, True)
    for training in (True, False)
]  # fmt: skip


@pytest.mark.parametrize(("ratio", "layout", "residual", "training"), CASES)
def test_large_mean_within_2x_pytorch(ratio: float, layout: str, residual: bool, training: bool) -> None:
    failures = []
    for name, (got, ref, same, scale) in compare(ratio, layout, residual, training).items():
        try:
            assert_2x(name, got, ref, same, scale, torch.float32)
        except AssertionError as e:
            failures.append(str(e))
    assert not failures, "\n".join(failures)


# Short NCHW channels of values with a large mean and a small spread: 169 values per channel, mean ~ +-10 with a
# standard deviation of 0.01 (1e3 std). The CPU NCHW statistics once summed the values themselves in float blocks
# (folded into double): the batch mean came out 1.4-1.9 units of rounding off where PyTorch's (double sums) is within
# 0.45, and x - mean carried that offset into grad_weight: 3.2e-3 where PyTorch's error is 1.3e-3 (tests/
# test_properties.py found it). Sums of x - pivot fixed it (docs/design.md section 1).
SHORT_SHAPE = (1, 33, 13, 13)


def make_short_channels_case(seed: int) -> dict:
    """As make_case, for SHORT_SHAPE: per-channel mean ~ +-10 (spread 10%), standard deviation 0.01."""
    g = torch.Generator().manual_seed(seed)
    C = SHORT_SHAPE[1]
    sign = torch.where(torch.rand(C, generator=g, dtype=torch.float64) < 0.5, -1.0, 1.0)
    mean = sign * 10 * (1 + 0.1 * torch.randn(C, generator=g, dtype=torch.float64))
    x = torch.randn(SHORT_SHAPE, generator=g, dtype=torch.float64) * 0.01 + channel_view(mean, 4)
    rounded = lambda t: t.float().double()  # noqa: E731
    return {
        "x": rounded(x),
        "r": rounded(torch.randn(SHORT_SHAPE, generator=g, dtype=torch.float64)),
        "w": rounded(torch.randn(C, generator=g, dtype=torch.float64) * 2),
        "b": rounded(torch.randn(C, generator=g, dtype=torch.float64)),
        "rm": rounded(mean),
        "rv": torch.full((C,), 1e-4, dtype=torch.float64).float().double(),
        "dy": rounded(torch.randn(SHORT_SHAPE, generator=g, dtype=torch.float64)),
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_short_channels_within_2x_pytorch(layout: str, seed: int) -> None:
    """Training on SHORT_SHAPE: the saved batch mean within 2x PyTorch's float32 error plus half a unit of rounding
    of the mean (the error of the correctly rounded mean), and every output and gradient by the rule of
    test_large_mean_within_2x_pytorch."""
    case = make_short_channels_case(seed)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = case["x"].float().contiguous(memory_format=fmt)
    C = SHORT_SHAPE[1]
    _, save_mean, _, _ = torch.ops.fusedres.bn_act_forward(
        x, None, case["w"].float(), case["b"].float(), None, None, True, MOMENTUM, EPS, "relu", 0.0
    )
    torch_mean, torch_var = torch.zeros(C), torch.ones(C)  # momentum 1: PyTorch's float32 batch mean
    torch.nn.functional.batch_norm(x, torch_mean, torch_var, None, None, True, 1.0, EPS)
    ref_mean = case["x"].mean(reduce_dims(4))
    err, torch_err = max_err(save_mean, ref_mean), max_err(torch_mean, ref_mean)
    half_ulp = 0.5 * torch.finfo(torch.float32).eps * max_abs(ref_mean)
    failures = []
    if err > 2 * torch_err + half_ulp:
        failures.append(f"save_mean: error {err:.3g} > 2 x PyTorch's float32 error {torch_err:.3g} + {half_ulp:.3g}")
    for name, (got, ref, same, scale) in compare_case(case, layout, False, True).items():
        try:
            assert_2x(name, got, ref, same, scale, torch.float32)
        except AssertionError as e:
            failures.append(str(e))
    assert not failures, "\n".join(failures)


def test_known_failures_name_real_cases() -> None:
    for ratio, layout, residual, training in KNOWN_FAILURES:
        assert ratio in RATIOS and layout in ("contiguous", "channels_last") and isinstance(residual, bool)
        assert isinstance(training, bool)
