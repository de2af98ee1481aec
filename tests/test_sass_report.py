"""tools/sass_report.py: the SASS parser and hot-loop heuristic on a checked-in fixture, the baseline check, and one
real kernel file (csrc/cuda/highway.cu, compiled for sm_90 and cached under build/sass_cache) when nvcc and
cuobjdump exist. The full run over every csrc/cuda/*.cu is `make sass-check` (a minute or two of nvcc)."""

from __future__ import annotations

import json
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import sass_report as sr  # noqa: E402

FIXTURE = os.path.join(ROOT, "tests", "data", "sass_fixture.txt")


def fixture_function() -> list[sr.Instr]:
    with open(FIXTURE) as fh:
        funcs = sr.parse_sass(fh.read())
    assert list(funcs) == ["_Z7fixturePKfS0_Pfi"]
    return funcs["_Z7fixturePKfS0_Pfi"]


def test_parse_fixture():
    instrs = fixture_function()
    assert len(instrs) == 24
    assert [i.addr for i in instrs] == [16 * k for k in range(24)]
    bra = instrs[7]
    assert (bra.pred, bra.op, sr.branch_target(bra)) == ("@P1", "BRA", 0xB0)
    assert sr.global_load_bits(instrs[5]) == 128  # LDG.E.128.CONSTANT
    assert sr.global_load_bits(instrs[19]) == 32  # LDG.E
    assert sr.global_load_bits(instrs[12]) is None and sr.is_global_store(instrs[12])


def test_loops_and_hot_loop_of_fixture():
    instrs = fixture_function()
    loops = sr.find_loops(instrs)
    # outer [0x40, 0x120], inner [0x50, 0xf0], scalar tail [0x130, 0x150]; the final branch-to-self is no loop
    assert [(lp.head, lp.end) for lp in loops] == [(0x40, 0x120), (0x50, 0xF0), (0x130, 0x150)]
    hot = sr.find_hot_loop(instrs)
    # innermost loops that load: the inner one (32 B of loads) beats the tail (4 B); the outer contains the inner
    assert (hot.head, hot.end, len(hot.instrs)) == (0x50, 0xF0, 11)
    path = sr.full_tile_path(hot)
    # the path through the optional 128-bit load (more bytes) rather than the branch around it
    assert (path.instrs, path.loads, path.stores, path.load_bytes) == (11, [128, 128], 1, 32)


def test_full_tile_path_prefers_bytes_then_length():
    # A diamond whose short side loads and whose long side does not: the loading side wins.
    text = "\n".join(
        ["Function : k"]
        + [f"/*{16 * k:04x}*/ {s} ;" for k, s in enumerate([
            "IMAD R0, R0, 2, RZ",  # 0x00 head
            "@P0 BRA 0x50",  # 0x10
            "FADD R1, R1, R2",  # 0x20 long side, no load
            "FADD R1, R1, R3",
            "BRA 0x60",  # 0x40
            "LDG.E.64 R4, desc[UR4][R6.64]",  # 0x50 short side, one 64-bit load
            "@P1 BRA 0x0",  # 0x60 back edge
            "EXIT",
        ])]
    )
    instrs = sr.parse_sass(text)["k"]
    hot = sr.find_hot_loop(instrs)
    path = sr.full_tile_path(hot)
    assert (path.instrs, path.loads) == (4, [64])


def test_element_bytes_from_operand_table():
    # highway forward reads h, g, x, c at the storage width
    assert sr.element_bytes("highway_forward_kernel<half, float>")[0] == 8
    assert sr.element_bytes("highway_forward_kernel<double, double>")[0] == 32
    # bn_act forward: x, residual (storage) + mean, scale, bias (float accumulation) per element
    assert sr.element_bytes("bn_act_forward_elementwise_kernel<bf16, float, true>")[0] == 2 + 2 + 12
    # the SiLU gradient sums (kSiLU = true) are matched before the generic gradient sums
    assert sr.element_bytes("bn_act_reduce_nchw_kernel<BnActGradSumsOp<float, float, true> >")[0] == 12
    assert sr.element_bytes("bn_act_reduce_nchw_kernel<BnActGradSumsOp<float, float, false> >")[0] == 12
    assert sr.element_bytes("bn_act_reduce_nchw_kernel<BnActGradSumsOp<half, float, false> >")[0] == 8
    assert sr.element_bytes("some_new_kernel<float, float>") is None


def figures(name: str, path: int, elements: float | None, loads_128: bool) -> sr.KernelFigures:
    return sr.KernelFigures(name, name, 100, 50, path, 64, [128] if loads_128 else [32], loads_128, elements, True)


def test_check_flags_growth_and_lost_vector_loads():
    base = {
        "a": figures("a", 40, 4, True).row(),
        "b": figures("b", 40, 4, False).row(),
        "c": figures("c", 40, None, False).row(),
    }
    assert sr.check([figures("a", 44, 4, True), figures("b", 40, 4, False), figures("c", 44, None, False)],
                    base, 0.10) == []
    errors = sr.check([figures("a", 45, 4, True), figures("b", 40, 4, False), figures("c", 45, None, False)],
                      base, 0.10)
    assert len(errors) == 2 and errors[0].startswith("a: instructions per element 11.2 > baseline 10.0")
    assert "full-tile path instructions 45.0 > baseline 40.0" in errors[1]
    lost = sr.check([figures("a", 40, 4, False)], base, 0.10)
    assert lost == ["a: hot-loop loads no longer all 128-bit (widths [32])"]


def _tools_missing() -> str | None:
    if sr.tool("nvcc") is None:
        return "nvcc not found (PATH, CUDA_HOME or /usr/local/cuda)"
    if sr.tool("cuobjdump") is None:
        return "cuobjdump not found (CUDA toolkit bin, or the pip wheels' triton/backends/nvidia/bin)"
    return None


@pytest.mark.skipif(_tools_missing() is not None, reason=str(_tools_missing()))
def test_highway_kernels_real_sass_and_baseline(capsys):
    """highway.cu for sm_90: every kernel has a hot loop; the aligned kernels (highway_*_kernel) load 16 bytes per
    operand and iteration (LDG.E.128 only: 16 / element size elements), the strided ones (strided_highway_*_kernel)
    one element per load, kHighwayUnroll per iteration; the figures are within the checked-in baseline's margin."""
    args = ["--arch", "sm_90", os.path.join(ROOT, "csrc", "cuda", "highway.cu"), "--json", "--check"]
    assert sr.main(args) == 0, capsys.readouterr().err
    got = json.loads(capsys.readouterr().out)
    with open(os.path.join(ROOT, "csrc", "cuda", "highway_kernels.cuh")) as fh:
        unroll = int(re.search(r"constexpr int kHighwayUnroll = (\d+);", fh.read()).group(1))
    assert len(got) >= 16  # forward and backward x float, double, half, bfloat16 x two walks (more specialised)
    assert any(n.startswith("highway_") for n in got) and any(n.startswith("strided_highway_") for n in got)
    for name, k in got.items():
        assert name.startswith(("highway_", "strided_highway_")), name
        assert k["loop"] > 0 and k["path"] > 0, name
        if name.startswith("strided_"):
            elements = unroll
            assert 128 not in k["load_widths"], (name, k)
        else:
            elements = 16 // sr.template_types(name)[0]
            assert k["loads_128"], (name, k)
        assert k["elements"] == elements, (name, k)
        assert k["per_element"] == pytest.approx(k["path"] / elements, abs=0.01)
