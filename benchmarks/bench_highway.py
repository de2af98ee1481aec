"""pytest-benchmark: fused highway gate vs eager reference vs torch.compile(reference), and a highway_mlp step.

Groups (one per configuration, the implementations side by side):

* ``highway <shape> <split|packed> <fwd|fwd+bwd>``: the coupled ReLU gate at (4096, 1024) (packed along -1, as
  the output of one Linear(1024, 2048)) and (256, 64, 32, 32) (packed along the channels), float32. ``split``
  passes transform, gate and carry as three tensors, ``packed`` the single [transform | gate] projection;
* ``highway_mlp step``: one SGD step of ``highway_mlp(1024, 1024, depth=20, 10)`` at batch 256.

``extra_info`` has the minimal bytes of docs/design.md section 2 (fwd 4 tensor passes, fwd+bwd 11) and the achieved
GB/s at the median. Cases and byte floors are shared with ``python -m fusedres bench`` (fusedres/bench/highway.py),
which also gives ratios from alternating rounds. Run with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000``
for page-fault-free figures (docs/design.md section 6); the setting in force is recorded in ``extra_info``.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from fusedres.bench import harness
from fusedres.bench import highway as hb

torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)

PARAMS = [
    pytest.param(shape, form, direction, impl, id=f"{'x'.join(map(str, shape))}-{form}-{direction}-{impl}")
    for shape, form, direction, impl in itertools.product(hb.SHAPES, hb.FORMS, hb.DIRECTIONS, harness.IMPLS)
]

_case_cache: dict[tuple, hb.HighwayCase] = {}
_compiled_cache: dict[tuple, object] = {}


def _case(shape, form) -> hb.HighwayCase:
    key = (shape, form)
    if key not in _case_cache:
        _case_cache.clear()  # one configuration's tensors alive at a time
        _case_cache[key] = hb.HighwayCase(shape, form == "packed")
    return _case_cache[key]


def _compiled(case: hb.HighwayCase):
    """torch.compile(reference) for this configuration, compiled (forward and backward) on first use."""
    key = (case.shape, case.packed)
    if key not in _compiled_cache:
        fn = case.compiled()
        try:
            case.call("fwd+bwd", fn)()
        except Exception as exc:  # noqa: BLE001 - reported as a skip with the reason
            _compiled_cache[key] = f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        else:
            _compiled_cache[key] = fn
    return _compiled_cache[key]


def _skip_if_no_fused() -> None:
    reason = hb.fused_unavailable("cpu")
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("shape, form, direction, impl", PARAMS)
def test_highway(benchmark, shape, form, direction, impl) -> None:
    case = _case(shape, form)
    if impl == "fused":
        _skip_if_no_fused()
        fn = case.functional("fused")
    elif impl == "reference":
        fn = case.functional("reference")
    else:
        fn = _compiled(case)
        if isinstance(fn, str):
            pytest.skip(fn)
    benchmark.group = f"highway {'x'.join(map(str, shape))} {form} {direction}"
    benchmark.pedantic(case.call(direction, fn), rounds=10, warmup_rounds=2, iterations=1)

    floor = case.floor_bytes(direction)
    benchmark.extra_info.update(
        {
            "shape": list(shape),
            "dtype": "float32",
            "form": form,
            "packed_dim": case.dim if case.packed else None,
            "direction": direction,
            "impl": impl,
            "floor_bytes": floor,
            "allocator": harness.describe_allocator(harness.allocator_setting()),
        }
    )
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["gbps"] = floor / stats.stats.median / 1e9


_step_cache: dict[str, hb.HighwayMLPStep] = {}


@pytest.mark.parametrize("impl", harness.IMPLS)
def test_highway_mlp_step(benchmark, impl) -> None:
    if impl == "fused":
        _skip_if_no_fused()
    if "case" not in _step_cache:
        _step_cache["case"] = hb.HighwayMLPStep(hb.MLP_STEP)
    step = _step_cache["case"].step_fn(impl)
    if impl == "compiled":
        try:
            step()  # compile outside the timing
        except Exception as exc:  # noqa: BLE001
            pytest.skip(f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    benchmark.group = "highway_mlp step depth 20 width 1024 batch 256"
    benchmark.pedantic(step, rounds=5, warmup_rounds=1, iterations=1)
    benchmark.extra_info.update(
        {
            **hb.MLP_STEP,
            "dtype": "float32",
            "impl": impl,
            "allocator": harness.describe_allocator(harness.allocator_setting()),
        }
    )
