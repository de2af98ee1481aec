"""pytest-benchmark: fused dense concatenation + BatchNorm + ReLU vs eager torch.cat + BN + ReLU vs torch.compile.

One group per layout x direction (fusedres/bench/dense.py's CONFIG: 16 inputs of (64, C_j, 32, 32), 36 + 15 x 12 =
216 channels, float32, training), holding the four implementations side by side:

* ``fused``        fusedres.dense_batch_norm_act (statistics reduced by the op);
* ``fused+stats``  the same with each input's statistics precomputed once (input_stats, not timed);
* ``reference``    eager torch.cat + F.batch_norm + ReLU;
* ``compiled``     torch.compile(reference), compiled once per layout outside the timing.

Directions: ``fwd`` (training forward with autograd recording) and ``fwd+bwd`` (+ autograd.grad of every input,
weight and bias). ``extra_info`` carries the minimal bytes and the achieved GB/s at the median time. Run with
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000`` for page-fault-free figures (docs/design.md section 6); the
setting in force is recorded. FUSEDRES_BENCH_TINY=1 shrinks the shape. For ratios measured in alternating rounds
use ``python -m fusedres bench``.
"""

from __future__ import annotations

import itertools
import os

import pytest

from fusedres.bench import dense, harness

CONFIG = dense.TINY_CONFIG if os.environ.get("FUSEDRES_BENCH_TINY") == "1" else dense.CONFIG

PARAMS = [
    pytest.param(layout, direction, impl, id=f"{layout}-{direction}-{impl}")
    for layout, direction, impl in itertools.product(dense.LAYOUTS, dense.DIRECTIONS, dense.IMPLS)
]

_case_cache: dict[str, dense.DenseBenchCase] = {}
_forward_cache: dict[tuple[str, str], object] = {}


def _case(layout: str) -> dense.DenseBenchCase:
    if layout not in _case_cache:
        _case_cache.clear()  # one layout's tensors alive at a time
        _forward_cache.clear()
        _case_cache[layout] = dense.DenseBenchCase(CONFIG["batch"], CONFIG["channels"], CONFIG["spatial"], layout)
    return _case_cache[layout]


def _forward(case: dense.DenseBenchCase, impl: str):
    """The implementation's training forward; torch.compile compiles (forward and backward) on first use."""
    key = (case.layout, impl)
    if key not in _forward_cache:
        fn = case.functional(impl)
        if impl == "compiled":
            try:
                case.call("fwd+bwd", fn)()
            except Exception as exc:  # noqa: BLE001 - reported as a skip with the reason
                fn = f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        _forward_cache[key] = fn
    return _forward_cache[key]


@pytest.mark.parametrize("layout, direction, impl", PARAMS)
def test_dense(benchmark, layout, direction, impl) -> None:
    if impl in ("fused", dense.EXTRA_IMPL):
        reason = dense.fused_unavailable("cpu")
        if reason is not None:
            pytest.skip(reason)
    case = _case(layout)
    forward = _forward(case, impl)
    if isinstance(forward, str):
        pytest.skip(forward)
    fn = case.call(direction, forward)
    benchmark.group = f"dense {len(case.channels)} inputs {'x'.join(map(str, case.shape))} {layout} {direction}"
    benchmark.pedantic(fn, rounds=10, warmup_rounds=2, iterations=1)

    floor = case.floor_bytes(direction)
    benchmark.extra_info.update(
        {
            "shape": list(case.shape),
            "channels": list(case.channels),
            "dtype": "float32",
            "layout": layout,
            "direction": direction,
            "impl": impl,
            "floor_bytes": floor,
            "allocator": harness.describe_allocator(harness.allocator_setting()),
        }
    )
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["gbps"] = floor / stats.stats.median / 1e9
