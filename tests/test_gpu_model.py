"""tools/gpu_model.py (`make gpu-model`): the byte counts and time formula of the model, the launch counts it
derives against the emulator's launch log, and a smoke run of its --measure harness on the CPU."""

from __future__ import annotations

import math
import os
import sys
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import gpu_model as gm  # noqa: E402


def _args(**kw) -> SimpleNamespace:
    base = dict(op=None, dtype=None, gpu=["h100"], efficiency=0.9, launch_us=4.0, shapes=[(32, 64, 56, 56)])
    base.update(kw)
    return SimpleNamespace(**base)


def _baseline() -> dict:
    import json

    with open(gm.BASELINE) as fh:
        return json.load(fh)["kernels"]


def test_bytes_and_time_formula():
    rows = gm.model(_args(), _baseline(), None)["h100"]
    numel = 32 * 64 * 56 * 56
    by_key = {(r.op, r.layout, r.dtype): r for r in rows}
    hw = by_key[("highway_forward", "any", "fp16")]
    assert hw.total_bytes == 4 * numel * 2  # h, g, x read, y written, 2 bytes each
    assert by_key[("highway_backward", "any", "fp32")].total_bytes == 7 * numel * 4
    fwd = by_key[("bn_act_forward", "nchw", "fp32")]
    # x read twice (statistics, normalise), residual read, y written, 1 mask bit per element, + per-channel vectors
    assert 4 * numel * 4 + numel / 8 < fwd.total_bytes < 4 * numel * 4 + numel / 8 + 1e5
    gpu = gm.GPUS["h100"]
    for r in rows:
        assert r.launches == len(r.kernels) == gm.DERIVED_LAUNCHES[r.op] and r.launches_from == "derived"
        # never faster than the bytes at the full peak, never slower than bytes and issue serialised + launches
        assert r.seconds > r.total_bytes / gpu.bandwidth + r.launches * 4e-6
        for k, ipe, t in r.kernels:
            assert ipe is not None and ipe > 0, k.name  # every modelled kernel has a baseline figure
            issue = k.elements * ipe / (gpu.sms * gm.ISSUE_PER_SM_CLOCK * gpu.clock)
            assert t == pytest.approx(max(k.bytes / (gpu.bandwidth * 0.9), issue) + 4e-6)
        assert r.share == pytest.approx(r.total_bytes / r.seconds / gpu.bandwidth)


def test_emulated_launch_counts_match_the_derived_ones(request, tmp_path_factory):
    cache = getattr(request.config, "cache", None)  # the emulator tests' library cache: built once per session
    emus = gm.emulator(str(cache.mkdir("cuda_emu")) if cache is not None else str(tmp_path_factory.mktemp("emu")))
    if emus is None:
        pytest.skip("the emulator libraries could not be built (see the message above)")
    for op, derived in gm.DERIVED_LAUNCHES.items():
        for cl in (False, True):
            assert gm.emulated_launches(emus, op, cl) == derived, (op, cl)
    rows = gm.model(_args(shapes=[(16, 2048, 7, 7)]), _baseline(), emus)["h100"]
    assert {r.launches_from for r in rows} == {"emulator"}
    # the partial count comes from the launcher's sizing: the statistics partials are part of the bytes
    cl = next(r for r in rows if r.op == "bn_act_forward" and r.layout == "channels_last" and r.dtype == "fp32")
    numel = 16 * 2048 * 49
    assert cl.kernels[0][0].bytes > numel * 4


def test_measure_harness_runs_on_cpu():
    rows = gm.model(_args(gpu=["a100"], shapes=[(2, 3, 4, 5)], dtype=["fp32"]), _baseline(), None)["a100"]
    gm.measure(rows, reps=1, device="cpu")
    assert all(r.measured is not None and math.isfinite(r.measured) and r.measured >= 0 for r in rows)
    text = gm.render(rows, gm.GPUS["a100"], per_kernel=True)
    assert "measured us" in text and "bn_act_forward_elementwise_kernel<float, float, false>" in text
