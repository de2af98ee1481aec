"""pytest-benchmark: fused BatchNorm + residual + ReLU vs eager reference vs torch.compile(reference).

One group per shape x layout x residual x direction, holding the three implementations side by side:

* ``fwd``      training forward with autograd recording (the inputs require grad);
* ``fwd+bwd``  training forward + ``torch.autograd.grad`` of input, residual, weight and bias;
* ``eval``     eval forward under ``torch.no_grad()``.

``extra_info`` carries the minimal bytes of the call (docs/design.md section 1, 1-bit mask) and the achieved GB/s at the
median time. torch.compile compiles each configuration once (outside the timing) and is warmed up like the others.
Run with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000`` for page-fault-free figures (docs/design.md section 6);
the setting in force is recorded in ``extra_info``. For ratios measured in alternating rounds use
``python -m fusedres bench``.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import fusedres
from fusedres import _native
from fusedres import reference as _reference
from fusedres.bench import bn_act, harness

# Every configuration compiles the same two reference functions for its own static shapes.
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)

# Ordered so that one configuration's benchmarks run together (its inputs are built once).
PARAMS = [
    pytest.param(
        shape,
        layout,
        residual,
        direction,
        impl,
        id=f"{'x'.join(map(str, shape))}-{layout}-{'res' if residual else 'nores'}-{direction}-{impl}",
    )
    for shape, layout, residual, direction, impl in itertools.product(
        bn_act.SHAPES, bn_act.LAYOUTS, (False, True), bn_act.DIRECTIONS, bn_act.IMPLS
    )
]
_LARGE_BYTES = 64 << 20  # tensors above this get fewer rounds (the (32, 256, 56, 56) shape is 103 MB)

_case_cache: dict[tuple, bn_act.BnActCase] = {}
_compiled_cache: dict[tuple, object] = {}


def _case(shape, layout, residual) -> bn_act.BnActCase:
    key = (shape, layout, residual)
    if key not in _case_cache:
        _case_cache.clear()  # keep one configuration's tensors alive at a time
        _case_cache[key] = bn_act.BnActCase(shape, layout, residual)
    return _case_cache[key]


def _compiled(case: bn_act.BnActCase, mode: str):
    """torch.compile(reference) for this configuration, compiled (forward and backward) on first use."""
    key = (case.shape, case.layout, case.residual, mode)
    if key not in _compiled_cache:
        fn = bn_act.compile_reference(mode == "train")
        try:
            (case.train_step_call(fn, True) if mode == "train" else case.eval_call(fn, True))()
        except Exception as exc:  # noqa: BLE001 - reported as a skip with the reason
            _compiled_cache[key] = f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        else:
            _compiled_cache[key] = fn
    return _compiled_cache[key]


@pytest.mark.parametrize("shape, layout, residual, direction, impl", PARAMS)
def test_bn_act(benchmark, shape, layout, residual, direction, impl) -> None:
    case = _case(shape, layout, residual)
    if impl == "fused":
        if not _native.has_kernel("cpu"):
            pytest.skip(f"fusedres has no native CPU kernel (native_error: {_native.native_error})")
        fn = case.call(direction, fusedres.batch_norm_act)
    elif impl == "reference":
        fn = case.call(direction, _reference.batch_norm_act)
    else:
        compiled = _compiled(case, "eval" if direction == "eval" else "train")
        if isinstance(compiled, str):
            pytest.skip(compiled)
        fn = case.call(direction, compiled, compiled=True)

    large = case.x.numel() * case.x.element_size() > _LARGE_BYTES
    benchmark.group = (
        f"bn_act {'x'.join(map(str, shape))} {layout} {'residual' if residual else 'no-residual'} {direction}"
    )
    benchmark.pedantic(fn, rounds=5 if large else 12, warmup_rounds=1 if large else 2, iterations=1)

    floor = case.floor_bytes(direction)
    benchmark.extra_info.update(
        {
            "shape": list(shape),
            "dtype": "float32",
            "layout": layout,
            "residual": residual,
            "direction": direction,
            "impl": impl,
            "floor_bytes": floor,
            "allocator": harness.describe_allocator(harness.allocator_setting()),
        }
    )
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["gbps"] = floor / stats.stats.median / 1e9
