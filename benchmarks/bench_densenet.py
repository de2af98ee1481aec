"""DenseNet-BC-100 training step: fused memory-efficient vs eager reference vs torchvision-style checkpointing.

Configurations (all ``fusedres.models.densenet_bc_100``, the same weights, float32, NCHW, CIFAR-sized input):

* ``fused``       fused=True, memory_efficient=True: recompute-in-backward bottlenecks, statistics once per map;
* ``fused-keep``  fused=True, memory_efficient=False: fused kernels, BN/act outputs kept for backward;
* ``reference``   fused=False: eager ``torch.cat`` + BatchNorm + ReLU + conv (torchvision's DenseNet);
* ``checkpoint``  fused=False, checkpoint=True: torchvision's ``memory_efficient=True`` (``torch.utils.checkpoint``
  of each layer's cat + norm1 + ReLU + conv1; it updates the BatchNorm running statistics twice per step).

A step is ``fusedres.bench.memory.make_train_step``: SGD zero_grad(set_to_none) + forward + cross-entropy +
backward + step. Peak memory: one fresh process per configuration (``fusedres.bench.memory.measure_peak_memory``,
method in its MEMORY_METHOD: peak RSS of the measured steps minus the RSS before them, after a warm-up step,
malloc_trim and a reset of the peak), taken under both glibc allocator settings.

Two entry points:

* ``pytest benchmarks/bench_densenet.py --benchmark-only``: one pytest-benchmark group, the peak memory of each
  configuration in ``extra_info``;
* ``python benchmarks/bench_densenet.py [--batch 64] [--rounds 5]``: the report (time per step from alternating
  rounds, medians of per-round ratios to the reference, and peak memory with both allocator settings). It
  re-executes itself with MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 for the timing (as
  ``python -m fusedres bench`` does; docs/design.md section 6) unless --default-allocator.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from fusedres.bench import harness
from fusedres.bench.memory import make_batch, make_train_step, measure_peak_memory
from fusedres.models import get_model

MODEL = "densenet_bc_100"
INPUT_SHAPE = (3, 32, 32)
BATCH = 64
CONFIGS: dict[str, dict[str, Any]] = {
    "fused": {"fused": True, "memory_efficient": True},
    "fused-keep": {"fused": True, "memory_efficient": False},
    "reference": {"fused": False},
    "checkpoint": {"fused": False, "checkpoint": True},
}


def build_steps(batch: int, names: list[str] | None = None, seed: int = 0) -> dict[str, Any]:
    """One training step per configuration, all models starting from the same weights and the same batch."""
    names = list(CONFIGS) if names is None else names
    torch.manual_seed(seed)
    state = get_model(MODEL, **CONFIGS["reference"]).state_dict()
    x = make_batch(batch, INPUT_SHAPE)
    steps = {}
    for name in names:
        model = get_model(MODEL, **CONFIGS[name])
        model.load_state_dict(state)
        steps[name] = make_train_step(model, x)
    return steps


@contextlib.contextmanager
def _allocator_env(page_fault_free: bool) -> Iterator[None]:
    """The glibc allocator setting the memory workers inherit."""
    saved = {k: os.environ.get(k) for k in harness.ALLOCATOR_ENV}
    for k, v in harness.ALLOCATOR_ENV.items():
        if page_fault_free:
            os.environ[k] = v
        else:
            os.environ.pop(k, None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def peak_memory(name: str, batch: int, page_fault_free: bool, steps: int = 2) -> dict[str, Any]:
    """measure_peak_memory of one configuration in a fresh process under the given allocator setting."""
    with _allocator_env(page_fault_free):
        return measure_peak_memory(MODEL, {**CONFIGS[name], "num_classes": 10}, batch, INPUT_SHAPE, steps=steps)


# ----------------------------------------------------------------------------------------------------------------
# pytest-benchmark

_steps_cache: dict[int, dict[str, Any]] = {}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_densenet_bc_100_step(benchmark, name: str) -> None:
    if BATCH not in _steps_cache:
        _steps_cache[BATCH] = build_steps(BATCH)
    step = _steps_cache[BATCH][name]
    benchmark.group = f"{MODEL} training step, batch {BATCH}, float32"
    benchmark.pedantic(step, rounds=5, warmup_rounds=1, iterations=1)
    setting = harness.allocator_setting()
    mem = peak_memory(name, BATCH, page_fault_free=bool(setting["no_page_fault_setting"]))
    benchmark.extra_info.update(
        {
            "config": CONFIGS[name],
            "peak_mb": mem.get("peak_mb"),
            "peak_mb_null_reason": mem.get("null_reasons", {}).get("peak_mb"),
            "memory_method": mem.get("method"),
            "allocator": harness.describe_allocator(setting),
        }
    )


# ----------------------------------------------------------------------------------------------------------------
# Report


def _reexec_with_allocator() -> None:
    if all(os.environ.get(k) == v for k, v in harness.ALLOCATOR_ENV.items()):
        return
    env = {**os.environ, **harness.ALLOCATOR_ENV}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=BATCH, help="batch size (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timing rounds (default %(default)s)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of %(default)s")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory workers")
    parser.add_argument("--no-time", action="store_true", help="skip the timing")
    parser.add_argument("--default-allocator", action="store_true", help="time with glibc's default allocator settings")
    args = parser.parse_args(argv)
    if not args.default_allocator:
        _reexec_with_allocator()
    names = [n for n in args.configs.split(",") if n]
    for n in names:
        if n not in CONFIGS:
            parser.error(f"--configs must name configurations of {list(CONFIGS)}, got {n!r}")
    setting = harness.allocator_setting()
    print(f"{MODEL} training step (SGD, cross-entropy), batch {args.batch}, float32, NCHW 32x32")
    info = harness.machine_info()
    print(f"  cpu        {info['cpu_model']}, {info['cpus_usable']} cores, {info['torch_threads']} torch threads")
    if not args.no_time:
        print(f"  timing     allocator {harness.describe_allocator(setting)}; {args.rounds} alternating rounds")
    times: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    if not args.no_time:
        steps = build_steps(args.batch, names)

        def with_cpu_time(name: str, step: Any) -> Any:
            def run() -> None:
                c0 = time.process_time()
                step()
                cpu[name].append(time.process_time() - c0)

            return run

        times, _faults = harness.measure_alternating(
            {n: with_cpu_time(n, s) for n, s in steps.items()}, rounds=args.rounds, warmup=1
        )
        for n in names:
            del cpu[n][:1]  # the warm-up call
    mem: dict[tuple[str, bool], dict[str, Any]] = {}
    if not args.no_memory:
        for n in names:
            for pff in (True, False):
                mem[(n, pff)] = peak_memory(n, args.batch, pff)
    base = "reference" if "reference" in names else names[0]
    header = (
        f"{'config':<11} {'step ms':>9} {'cpu ms':>9} {'ref/this [IQR]':>20} {'peak MB (no-fault alloc)':>25} "
        f"{'peak MB (default)':>18}"
    )
    print(header)
    print("-" * len(header))
    for n in names:
        cells = [f"{n:<11}"]
        if times:
            med = statistics.median(times[n]) * 1e3
            r = harness.ratio_stats(times, base, n)
            cpu_med = statistics.median(cpu[n]) * 1e3
            cells += [
                f"{med:>9.1f}",
                f"{cpu_med:>9.1f}",
                f"{r['median']:>6.2f}x [{r['q25']:.2f}-{r['q75']:.2f}]".rjust(20),
            ]
        else:
            cells += [f"{'-':>9}", f"{'-':>9}", f"{'-':>20}"]
        for pff, width in ((True, 25), (False, 18)):
            m = mem.get((n, pff), {})
            pk, bk = m.get("peak_mb"), mem.get((base, pff), {}).get("peak_mb")
            text = "-" if pk is None else (f"{pk:.0f} ({pk / bk:.0%})" if bk else f"{pk:.0f}")
            cells.append(f"{text:>{width}}")
        print(" ".join(cells))
    if times:
        print("  step ms: median wall time per step; cpu ms: median process CPU time per step (all threads);")
        print("  ref/this: median [IQR] of per-round wall-time ratios reference / this (> 1: faster than eager)")
    if mem:
        print("  peak MB: " + next(iter(mem.values())).get("method", ""))
        print("  (%): of the reference's peak under the same allocator setting")
        print("  RSS detail (MB): after build -> at the reset (after the warm-up step) -> peak; peak - after build")
        for (n, pff), m in mem.items():
            build, base_rss, peak_rss = (m.get(k) for k in ("rss_after_build_mb", "rss_baseline_mb", "peak_rss_mb"))
            if None not in (build, base_rss, peak_rss):
                print(
                    f"    {n:<11} {'no-fault' if pff else 'default ':<8} {build:7.0f} -> {base_rss:7.0f} -> "
                    f"{peak_rss:7.0f}; {peak_rss - build:7.0f}"
                )
        for (n, pff), m in mem.items():
            reason = m.get("null_reasons", {}).get("peak_mb")
            if m.get("peak_mb") is None and reason:
                print(f"  {n} ({'no-fault' if pff else 'default'}): {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
