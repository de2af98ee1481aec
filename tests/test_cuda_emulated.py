"""The CUDA kernels of csrc/cuda executed on the CPU by the CUDA emulator (tests/cuda_emu/cuda_emu.h).

A small library (tests/cuda_emu/emu_bn_act.cpp, built and called by tests/_cuda_emu.py) is built with g++ from the
project's actual kernel headers and the launch sequences the .cu launchers call (csrc/cuda/bn_act_launch.cuh), with
the same sizing function (bn_act_launch_config). Every simulated GPU thread is a fiber; threads run between synchronisation points in
ascending, descending or random order, so a result that depends on a missing barrier changes with the order.
The results are compared with the CPU op (torch.ops.fusedres.*): the mask bit for bit, values within tolerance.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from _cuda_emu import (
    ACTS,
    CUDA_SRC,
    EMULATED_HEADERS,
    EPS,
    ORDERS,
    ROOT,
    SHAPE_IDS,
    SHAPES,
    global_kernels,
    flat_buffer,
    make_inputs,
    launch_sites,
    run_backward,
    run_forward,
    seed_of,
    spatial_dims,
)
from _numerics import activation_kinks, ambiguous_branch, assert_2x, channel_view, max_abs

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
        run_forward(emu, shape, cl, training, act, residual, dtype, order)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_backward(emu, shape, cl, training, act, dtype, order):
    """Backward kernels vs the CPU op: all four gradients, from the CPU forward's statistics and mask; silu (which
    recomputes the pre-activation from the residual when there is one) with and without a residual."""
    for residual in (True, False) if act == "silu" else (True,):
        run_backward(emu, shape, cl, training, act, dtype, order, residual=residual)


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
    run_backward(emu, (3, 5, 7, 1), cl, training, act, torch.float32, "rand", output_mask)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3], SHAPES[4]], ids=[SHAPE_IDS[0], SHAPE_IDS[3], SHAPE_IDS[4]])
def test_half(emu, shape, cl, training, dtype):
    """float16 / bfloat16 storage (float accumulation), forward and backward, random thread order."""
    if not emu.has_half:
        pytest.skip("the emulator library was built without cuda_fp16.h / cuda_bf16.h (no CUDA toolkit headers)")
    run_forward(emu, shape, cl, training, "relu", True, dtype, "rand")
    run_backward(emu, shape, cl, training, "leaky_relu", dtype, "rand")
    for act in ("relu6", "silu"):  # silu's backward without a residual: z from the input and parameters alone
        run_forward(emu, shape, cl, training, act, True, dtype, "rand")
        run_backward(emu, shape, cl, training, act, dtype, "rand", residual=act != "silu")


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


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize(
    "dtype, rs_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float64, torch.float32),  # float64 model with float32 running statistics
        (torch.float16, torch.float16),  # half model: half running statistics, float accumulation
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float32),
    ],
    ids=["f32-f32", "f64-f32", "f16-f16", "bf16-bf16", "f16-f32"],
)
def test_running_stats_dtypes(emu, cl, training, dtype, rs_dtype):
    """Every running-statistics dtype the CPU op accepts (float32 or the input's) is updated (training) or read
    (eval) by the kernels themselves: the launch counts of test_launch_counts hold for all of them."""
    if dtype in (torch.float16, torch.bfloat16) and not emu.has_half:
        pytest.skip("the emulator library was built without cuda_fp16.h / cuda_bf16.h (no CUDA toolkit headers)")
    for shape in (SHAPES[3], SHAPES[4]):
        run_forward(emu, shape, cl, training, "relu", True, dtype, "rand", rs_dtype=rs_dtype)


def _launches(emu, run) -> list[str]:
    """The kernels (launch sites) one call of run() launched, from the emulator's launch log."""
    before = emu.launch_log()
    run()
    after = emu.launch_log()
    return sorted(name for name in after for _ in range(after[name] - before.get(name, 0)))


# Launches of each bn_act sequence (bn_act_launch.cuh). These are all the kernels of the op for dense inputs and
# acc-dtype weight / bias (otherwise argument preparation adds its copies): the .cu launchers run the sequence on raw
# buffers and only allocate around it; the statistics work that used to follow in ATen (running-statistics update:
# ~9 kernels; eval statistics: ~3) is now in the sequence (checked by the source test below).
LAUNCHES = {
    "forward_train": 3,  # reduce, stats finalize (+ running statistics), elementwise
    "forward_eval": 1,  # elementwise from the running statistics (writes save_mean / save_invstd)
    "bn_stats": 2,  # reduce, stats finalize
    "bn_act_elemt": 1,  # elementwise from the given mean / invstd
    "backward_train": 3,  # reduce, finalize, elementwise
    "backward_eval_input": 1,  # elementwise (forms w * invstd itself)
    "backward_reduce": 2,  # reduce, finalize
    "backward_elemt": 2,  # given-sums coefficients, elementwise
}


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_launch_counts(emu, cl):
    """The number of kernel launches of each mode, counted from the emulator's launch log around one call."""
    shape = (3, 3, 2000, 1)  # P > 1: every kernel of the sequence has work
    N, C, S, sms = shape
    f32 = torch.float32
    x, r, dy, w, b, rm, rv = make_inputs(N, C, S, cl, f32, seed_of("launches", cl))
    xb, rb, dyb = flat_buffer(x, cl), flat_buffer(r, cl), flat_buffer(dy, cl)
    numel = x.numel()

    def vec():
        return torch.full((C,), math.nan)

    y, mask = torch.empty(numel), torch.zeros(((numel + 31) // 32 + 1) * 4, dtype=torch.uint8)
    mean, invstd, var = vec(), vec(), vec()
    got = {
        "forward_train": _launches(emu, lambda: emu.forward(f32, N, C, S, cl, sms, True, "relu", xb, rb, w, b, mean,
                                                            invstd, y, mask, var, rm.clone(), rv.clone())),
        "forward_eval": _launches(emu, lambda: emu.forward(f32, N, C, S, cl, sms, False, "relu", xb, rb, w, b, vec(),
                                                           vec(), y, mask, None, rm, rv)),
        "bn_stats": _launches(emu, lambda: emu.bn_stats(f32, N, C, S, cl, sms, xb, vec(), vec())),
        "bn_act_elemt": _launches(emu, lambda: emu.elemt(f32, N, C, S, cl, sms, "relu", xb, rb, w, b, mean, invstd,
                                                         y, 0, mask)),
        "backward_train": _launches(emu, lambda: emu.backward(f32, N, C, S, cl, sms, True, "relu", dyb, xb, mask, mean,
                                                              invstd, w, y.clone(), y.clone(), vec(), vec())),
        "backward_eval_input": _launches(emu, lambda: emu.backward(f32, N, C, S, cl, sms, False, "relu", dyb, xb,
                                                                   mask, mean, invstd, w, y.clone(), None, None,
                                                                   None)),
        "backward_reduce": _launches(emu, lambda: emu.backward_reduce(f32, N, C, S, cl, sms, "relu", dyb, 0, xb, mask,
                                                                      mean, invstd, vec(), vec())),
        "backward_elemt": _launches(emu, lambda: emu.backward_elemt(f32, N, C, S, cl, sms, "relu", dyb, 0, xb, mask,
                                                                    mean, invstd, w, vec().zero_(), vec().zero_(),
                                                                    N * S, y.clone(), y.clone())),
    }  # fmt: skip
    assert {mode: len(k) for mode, k in got.items()} == LAUNCHES, got
    assert not any("eval_scale" in k for k in got["forward_eval"]), got["forward_eval"]


def test_launchers_leave_statistics_to_the_sequence():
    """The .cu launchers call the host helpers that compute statistics with ATen ops (bn_act_update_running_stats:
    ~9 kernels, bn_act_eval_stats: ~3) only where no kernel can: non-contiguous running statistics (the
    running_stats_on_device test guards them), no elements, or precomputed batch statistics (dense). Each call must
    sit in a branch whose condition names device_running (within the 4 lines above it): a new unguarded call would
    add ATen launches that test_launch_counts cannot see."""
    bad = []
    for path in sorted(CUDA_SRC.glob("*.cu")):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            for helper in ("bn_act_update_running_stats", "bn_act_eval_stats"):
                if helper + "(" not in line.split("//")[0]:
                    continue
                context = "\n".join(lines[max(0, i - 4) : i + 1])
                if "device_running" not in context:
                    bad.append(f"{path.name}:{i + 1}: {line.strip()}")
    assert not bad, "host statistics helpers called outside the device_running fallback:\n" + "\n".join(bad)


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_launch_config_follows_occupancy(emu, cl):
    """The grids are one wave of the resident blocks the launchers get from the occupancy API: the elementwise grid
    (grid-stride beyond it) and the number of reduction partials scale with them."""
    N, C, S, sms = 64, 2, 4096, 4  # work enough to fill any grid: the occupancy alone limits it
    fixed = emu.launch_config(N, C, S, cl, sms)  # kFixedOccupancy: 8 elementwise, 4 reduction blocks per SM
    assert fixed == emu.launch_config(N, C, S, cl, sms, occupancy=(8, 4))
    low = emu.launch_config(N, C, S, cl, sms, occupancy=(3, 1))
    high = emu.launch_config(N, C, S, cl, sms, occupancy=(16, 8))
    grids = (low["elementwise_grid"], fixed["elementwise_grid"], high["elementwise_grid"])
    assert grids == (3 * sms, 8 * sms, 16 * sms)
    # num_sms * occupancy reduction blocks shared by the channel tiles (reduce_grid_x): P = ceil of their quotient.
    tiles = fixed["reduce_grid_x"]
    assert (low["partials"], fixed["partials"], high["partials"]) == tuple(-(-sms * o // tiles) for o in (1, 4, 8))


# ------------------------------------------------------------------------------------------------ large mean

# Inputs whose per-channel mean is LARGE_MEAN_RATIO standard deviations (issue 17): the kind of input a BatchNorm sees
# after an un-normalised layer. (N, C, S, num_sms): test_large_mean.py's shape (16 channels), and one with P > 1
# partial reductions in both layouts (the Welford merge of the finalize kernel).
LARGE_MEAN_RATIO = 1e4
LARGE_MEAN_SHAPES = [(8, 16, 99, 1), (3, 3, 2000, 1)]


def _large_mean_case(N, C, S, seed):
    """float64 values exactly representable in float32: x with per-channel mean ~ +-ratio * std, std in [0.5, 2];
    running statistics near the batch ones (eval); as tests/test_large_mean.py's make_case."""
    g = torch.Generator().manual_seed(seed)
    H, W = spatial_dims(S)
    std = torch.rand(C, generator=g, dtype=torch.float64) * 1.5 + 0.5
    sign = torch.where(torch.rand(C, generator=g, dtype=torch.float64) < 0.5, -1.0, 1.0)
    mean = sign * LARGE_MEAN_RATIO * std * (1 + 0.1 * torch.rand(C, generator=g, dtype=torch.float64))
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64) * channel_view(std, 4) + channel_view(mean, 4)

    def f32(t):
        return t.float().double()

    return {
        "x": f32(x),
        "r": f32(torch.randn(N, C, H, W, generator=g, dtype=torch.float64)),
        "dy": f32(torch.randn(N, C, H, W, generator=g, dtype=torch.float64)),
        "w": f32(torch.randn(C, generator=g, dtype=torch.float64) * 2),
        "b": f32(torch.randn(C, generator=g, dtype=torch.float64)),
        "rm": f32(mean + std * torch.randn(C, generator=g, dtype=torch.float64) * 0.2),
        "rv": f32(std**2 * (torch.rand(C, generator=g, dtype=torch.float64) * 0.5 + 0.75)),
    }


def _torch_bn_act(case, dtype, training, act, dy):
    """Plain PyTorch in ``dtype`` on the case's values: output, the four gradients, batch mean and biased variance."""
    x, r, w, b = (case[k].to(dtype).requires_grad_() for k in ("x", "r", "w", "b"))
    rm, rv = case["rm"].to(dtype), case["rv"].to(dtype)
    z = torch.nn.functional.batch_norm(x, rm, rv, w, b, training, 0.0, EPS) + r
    y = torch.nn.functional.relu(z) if act == "relu" else torch.nn.functional.silu(z)
    gx, gr, gw, gb = torch.autograd.grad(y, (x, r, w, b), dy.to(dtype))
    var, mean = torch.var_mean(x.detach(), dim=(0, 2, 3), correction=0)
    return {"output": y.detach(), "grad_input": gx, "grad_residual": gr, "grad_weight": gw, "grad_bias": gb,
            "mean": mean, "var": var}  # fmt: skip


def large_mean_errors(emu, shape, cl, training, act):
    """Per quantity: (emulated CUDA kernels, float64 PyTorch oracle, float32 PyTorch, scale of its terms), float32
    inputs with a mean of LARGE_MEAN_RATIO standard deviations; the backward runs on the emulated forward's
    statistics and mask (the whole CUDA chain)."""
    N, C, S, sms = shape
    case = _large_mean_case(N, C, S, seed_of("large_mean", shape))
    x64 = case["x"]
    if training:
        var, mean = torch.var_mean(x64, dim=(0, 2, 3), correction=0)
    else:
        mean, var = case["rm"], case["rv"]
    invstd = (var + EPS).rsqrt()
    # The upstream gradient is zeroed where the ReLU's branch is not decided at float32 rounding (a band that widens
    # with the mean): no implementation can be held to either side there.
    amb = ambiguous_branch(x64, mean, invstd, case["w"], case["b"], case["r"], torch.float32,
                           kinks=activation_kinks(act))  # fmt: skip
    dy = case["dy"].masked_fill(amb, 0.0)
    ref = _torch_bn_act(case, torch.float64, training, act, dy)
    same = _torch_bn_act(case, torch.float32, training, act, dy)

    def buf(t):
        return flat_buffer(t.float().contiguous(memory_format=torch.channels_last) if cl else t.float(), cl)

    x, r, w, b = buf(case["x"]), buf(case["r"]), case["w"].float(), case["b"].float()
    numel = x.numel()
    e_y = torch.full((numel,), -777.0)
    mask_bytes = ((numel + 31) // 32 + 1) * 4  # math::mask_bytes
    e_mask = torch.full((mask_bytes,), 0xAB, dtype=torch.uint8) if act != "silu" else None
    e_var = torch.full((C,), math.nan)
    # Written in both modes (in eval from the running statistics, as the launcher runs it).
    e_mean, e_invstd = torch.full((C,), math.nan), torch.full((C,), math.nan)
    emu.configure("rand", seed_of("large_mean", shape, cl, training, act))
    emu.forward(torch.float32, N, C, S, cl, sms, training, act, x, r, w, b, e_mean, e_invstd, e_y, e_mask,
                e_var if training else None, case["rm"].float(), case["rv"].float())  # fmt: skip
    e_gi, e_gr = torch.full((numel,), -777.0), torch.full((numel,), -777.0)
    e_gw, e_gb = torch.full((C,), math.nan), torch.full((C,), math.nan)
    emu.backward(torch.float32, N, C, S, cl, sms, training, act, buf(dy), x, e_mask, e_mean, e_invstd, w,
                 e_gi, e_gr, e_gw, e_gb, b, r)  # fmt: skip
    ours = {"output": e_y, "grad_input": e_gi, "grad_residual": e_gr, "grad_weight": e_gw, "grad_bias": e_gb}
    if training:
        ours.update(mean=e_mean, var=e_var)

    x_hat = (x64 - channel_view(mean, 4)) * channel_view(invstd, 4)
    w_abs = channel_view(case["w"].abs(), 4)
    dims = (0, 2, 3)
    scales = {
        "output": max_abs(x_hat * w_abs) + max_abs(case["b"]) + max_abs(case["r"]),
        "grad_input": max_abs(dy.abs() * w_abs * channel_view(invstd, 4)),
        "grad_residual": max_abs(dy),
        "grad_weight": max_abs((dy.abs() * x_hat.abs()).sum(dims)),
        "grad_bias": max_abs(dy.abs().sum(dims)),
        "mean": max_abs(x64),
        "var": max_abs(var),
    }
    out = {}
    for name, got in ours.items():
        ref_t, same_t = ref[name], same[name]
        if ref_t.dim() == 4:  # element tensors: the kernels' flat buffers
            ref_t, same_t = flat_buffer(ref_t, cl), flat_buffer(same_t, cl)
        out[name] = (got, ref_t, same_t, scales[name])
    return out


@pytest.mark.parametrize("act", ["relu", "silu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", LARGE_MEAN_SHAPES, ids=["x".join(map(str, s[:3])) for s in LARGE_MEAN_SHAPES])
def test_large_mean_within_2x_pytorch(emu, shape, cl, training, act):
    """float32 inputs with a mean of 1e4 standard deviations (issue 17): the output, every gradient and the batch
    statistics of the CUDA kernels within 2x PyTorch's own float32 error against float64 PyTorch on the same rounded
    inputs, plus a floor of a few float32 roundings of the terms (tests/_numerics.py's rule). The forward normalises
    as (x - mean) * scale + bias: the folded x * scale + (bias - mean * scale) cancels a large mean * scale."""
    failures = []
    for name, (got, ref, same, scale) in large_mean_errors(emu, shape, cl, training, act).items():
        try:
            assert_2x(name, got, ref, same, scale, torch.float32)
        except AssertionError as e:
            failures.append(str(e))
    assert not failures, "\n".join(failures)


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
                run_forward(emu, shape, cl, True, "relu", True, torch.float32, order, drop_sync=site)
                run_backward(emu, shape, cl, True, "relu", torch.float32, order, drop_sync=site)
            except (AssertionError, RuntimeError) as e:
                caught.append(f"{order} {'cl' if cl else 'nchw'}: {str(e).splitlines()[0][:100]}")
    emu.configure("asc")
    assert caught, f"removing the barrier at {site[0]}:{site[1]} went unnoticed in every thread order"


# ------------------------------------------------------------------------------------------------ coverage


def test_every_kernel_header_has_an_emulated_test():
    """Each csrc/cuda header with a __global__ kernel or a launch site is covered by an emulated test file."""
    with_kernels = {p.name for p in CUDA_SRC.glob("*.cuh") if global_kernels([p.name])}
    unlisted = with_kernels - set(EMULATED_HEADERS)
    assert not unlisted, f"kernel headers without an emulated test (add them to EMULATED_HEADERS): {sorted(unlisted)}"
    with_sites = {p.name for p in CUDA_SRC.glob("*.cuh") if launch_sites([p.name])}
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
    assert global_kernels() == set().union(*(global_kernels([h]) for h in EMULATED_HEADERS))
