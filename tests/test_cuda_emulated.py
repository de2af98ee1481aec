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
    ORDERS,
    ROOT,
    SHAPE_IDS,
    SHAPES,
    global_kernels,
    launch_sites,
    run_backward,
    run_forward,
)

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
