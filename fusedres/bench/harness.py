"""The timing harness every part of ``fusedres bench`` (and benchmarks/) shares: machine facts, the allocator
setting, alternating measurement, ratio statistics, saved-bytes counting and the row figures.

How a figure is taken (CONVENTIONS.md, Benchmarks; docs/design.md section 9): every implementation is warmed up,
then each round times every implementation once, rotating which goes first; times are medians over rounds and a
ratio is the median of the per-round ratios, with its inter-quartile range as the spread (TIMING_METHOD).

Page faults decide naive measurements on large tensors (docs/design.md section 6), so ``bench`` re-executes itself
with ALLOCATOR_ENV unless it is set already or ``--default-allocator`` is given (:func:`reexec_with_allocator`); the
setting in force is printed and recorded, with the minor page faults per call of each side.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

import fusedres
from fusedres import _native

__all__ = [
    "ALLOCATOR_ENV",
    "IMPLS",
    "NOTHING_SAVED",
    "RATIOS",
    "TIMING_METHOD",
    "OtherLoad",
    "Progress",
    "Settings",
    "allocator_setting",
    "copy_bandwidth",
    "describe_allocator",
    "direction_rows",
    "error_text",
    "fill_figures",
    "first_call_seconds",
    "fused_unavailable",
    "implementations",
    "machine_info",
    "measure_alternating",
    "noise_check",
    "overall_load",
    "ratio_stats",
    "reexec_with_allocator",
    "run_groups",
    "saved_bytes",
    "saved_per_impl",
    "set_figure",
    "set_load",
    "set_saved",
    "spread",
    "sync",
    "time_fns",
    "timed_row",
]

ALLOCATOR_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}
_REEXEC_MARK = "_FUSEDRES_BENCH_REEXEC"
# Set (and taken out of the environment, so that child processes do not inherit it) when bench re-executed itself.
_REEXECUTED = os.environ.pop(_REEXEC_MARK, None) == "1"

# The three implementations of an op row and the ratios reported between them.
IMPLS = ("fused", "reference", "compiled")
RATIOS = (("reference/fused", "reference", "fused"), ("compiled/fused", "compiled", "fused"))

TIMING_METHOD = (
    "warm-up, then per round each implementation is timed once (perf_counter around the call, device synchronised), "
    "the order rotating every round; times are medians over rounds; a ratio is the median of per-round ratios, "
    "spread = inter-quartile range (q25..q75) and min..max of those per-round ratios"
)
# The reason of a saved-bytes figure that is null by design, not because it could not be measured.
NOTHING_SAVED = "eval forward runs under torch.no_grad(): nothing is saved"


# --------------------------------------------------------------------------------------------------------------
# Machine facts and the allocator


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def allocator_setting(default_allocator_flag: bool = False) -> dict[str, Any]:
    """The glibc allocator variables in force in this process and where they came from."""
    values = {k: os.environ.get(k) for k in ALLOCATOR_ENV}
    if _REEXECUTED:
        source = "set by fusedres bench (re-executed itself with them)"
    elif all(v is None for v in values.values()):
        source = "--default-allocator" if default_allocator_flag else "no MALLOC_* variables set"
    else:
        source = "from the environment"
    pinned = all(values[k] == v for k, v in ALLOCATOR_ENV.items())
    return {**values, "source": source, "no_page_fault_setting": pinned}


def describe_allocator(setting: dict[str, Any]) -> str:
    """One line: the variables in force and their source, or the glibc default and what it costs."""
    set_vars = " ".join(f"{k}={setting[k]}" for k in ALLOCATOR_ENV if setting[k] is not None)
    if not set_vars:
        return f"glibc default [{setting['source']}]: fresh large outputs are page-faulted on first touch"
    return f"{set_vars} [{setting['source']}]"


def reexec_with_allocator(default_allocator: bool) -> None:
    """Re-executes this process with ALLOCATOR_ENV set, unless they are set already or ``default_allocator``."""
    if default_allocator or all(k in os.environ for k in ALLOCATOR_ENV):
        return
    if _REEXECUTED:  # already re-executed and still not set: never loop
        print("fusedres bench: could not set the allocator variables; measuring with what is in force", file=sys.stderr)
        return
    env = dict(os.environ)
    for k, v in ALLOCATOR_ENV.items():
        env.setdefault(k, v)
    env[_REEXEC_MARK] = "1"
    argv = [sys.executable, *getattr(sys, "orig_argv", [sys.executable, *sys.argv])[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)


def machine_info(device: str = "cpu", default_allocator_flag: bool = False) -> dict[str, Any]:
    """CPU, threads, ISA, torch, fusedres build and allocator facts of this process."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        affinity = os.cpu_count()
    info = _native.info() if hasattr(_native, "info") else {}
    gpu = None
    if device == "cuda" and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name()
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "torch_threads": torch.get_num_threads(),
        "isa": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "torch_version": torch.__version__,
        "fusedres_version": getattr(fusedres, "__version__", None),
        "native_loaded": info.get("native_loaded"),
        "native_error": info.get("native_error"),
        "cuda_compiled": info.get("cuda_compiled"),
        "cuda_available": torch.cuda.is_available(),
        "gpu": gpu,
        "device": device,
        "allocator": allocator_setting(default_allocator_flag),
    }


def sync(device: str) -> None:
    """Waits for the device's queued work (a no-op on the CPU), so that a timer brackets the work itself."""
    if device == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: str = "cpu", nbytes: int = 256 << 20, reps: int = 9) -> dict[str, Any]:
    """Times ``dst.copy_(src)`` on two preallocated, pre-touched float tensors of ``nbytes``.

    Returns:
        dict with gbps = 2 * nbytes / median time (read + write), min/max over the samples, median_ms.
    """
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty(n, dtype=torch.float32, device=device).fill_(0.0)
    for _ in range(2):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {
        "gbps": 2 * nbytes / med / 1e9,
        "gbps_min": 2 * nbytes / max(times) / 1e9,
        "gbps_max": 2 * nbytes / min(times) / 1e9,
        "median_ms": med * 1e3,
        "bytes": nbytes,
        "samples": reps,
        "method": "dst.copy_(src) on float32 tensors of `bytes` each, GB/s = 2 * bytes / median time",
    }


def fused_unavailable(
    device: str, op: str = "fusedres::bn_act_forward", kernel: str = "", instead: str = "it would run the reference"
) -> str | None:
    """Why the fused op ``op`` cannot be measured on ``device`` (None: it can).

    Args:
        kernel: the op's word in the reason ("highway " gives "no native cpu highway kernel").
        instead: what calling the fused op would run instead.
    """
    if not _native.native_loaded:
        return f"not measured: fusedres._C did not load ({_native.native_error})"
    if not hasattr(torch.ops.fusedres, op.split("::")[-1]) or not _native.has_kernel(device, op=op):
        return f"not measured: fusedres has no native {device} {kernel}kernel ({instead})"
    return None


# --------------------------------------------------------------------------------------------------------------
# Measurement


def _minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class OtherLoad:
    """CPU time other processes (and the hypervisor: steal) took while this process measured.

    The machine-wide busy time from /proc/stat minus this process's own CPU time (and its reaped children's), as a
    percentage of all CPUs over the wall time. On a 2-core machine anything much above 0 bends the figures: a
    kernel's two OpenMP threads then wait for each other across scheduler quanta.
    """

    def __init__(self) -> None:
        self._start = self._snapshot()

    @staticmethod
    def _snapshot() -> tuple[float, float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        busy = sum(fields[i] for i in (0, 1, 2, 5, 6) if i < len(fields)) / hz  # user nice system irq softirq
        steal = fields[7] / hz if len(fields) > 7 else 0.0
        own = sum(
            getattr(resource.getrusage(who), f)
            for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
            for f in ("ru_utime", "ru_stime")
        )
        return time.perf_counter(), busy, steal, own

    def percent(self) -> dict[str, float] | None:
        """{"other": %, "steal": %} of all CPUs and wall_s since construction (None: /proc/stat unreadable)."""
        end = self._snapshot()
        if end is None or self._start is None:
            return None
        wall = end[0] - self._start[0]
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        capacity = max(wall * cpus, 1e-9)
        other = (end[1] - self._start[1]) - (end[3] - self._start[3])
        return {
            "other": max(0.0, 100.0 * other / capacity),
            "steal": 100.0 * (end[2] - self._start[2]) / capacity,
            "wall_s": wall,
        }


def measure_alternating(
    fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 2, device: str = "cpu"
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Times every function once per round, rotating which goes first, after ``warmup`` calls of each.

    Returns:
        (seconds per call per round for each name, minor page faults per call for each name).
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    faults = dict.fromkeys(names, 0)
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(rounds):
            k = i % len(names)
            for name in names[k:] + names[:k]:
                f0 = _minflt()
                sync(device)
                t0 = time.perf_counter()
                fns[name]()
                sync(device)
                t1 = time.perf_counter()
                faults[name] += _minflt() - f0
                times[name].append(t1 - t0)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times, {name: faults[name] / max(rounds, 1) for name in names}


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, quartiles (inclusive method) and range of a sample."""
    if len(values) >= 2:
        q25, _, q75 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        q25 = q75 = values[0]
    return {
        "median": statistics.median(values),
        "q25": q25,
        "q75": q75,
        "min": min(values),
        "max": max(values),
    }


def ratio_stats(times: dict[str, list[float]], num: str, den: str) -> dict[str, float]:
    """Median and spread of the per-round ratios times[num][i] / times[den][i]."""
    return spread([a / b for a, b in zip(times[num], times[den], strict=True)])


def noise_check(make_fn: Callable[[], Callable[[], object]], rounds: int, device: str, function: str) -> dict[str, Any]:
    """Two identical functions (two calls of ``make_fn``) measured like the benchmark: their ratio should read 1.00
    (+- 0.1).

    Args:
        function: what the functions run, recorded with the figures.
    """
    times, _ = measure_alternating({"A": make_fn(), "B": make_fn()}, rounds, warmup=2, device=device)
    stats = ratio_stats(times, "A", "B")
    return {**stats, "rounds": rounds, "function": function, "ok": abs(stats["median"] - 1.0) <= 0.1}


def saved_bytes(forward: Callable[[], Tensor], owned: Iterable[Tensor]) -> dict[str, Any]:
    """Bytes autograd saves for backward when ``forward()`` runs: torch.autograd.graph.saved_tensors_hooks sums
    ``untyped_storage().nbytes()`` over the unique storages packed, excluding the storages of ``owned`` (tensors the
    caller holds anyway: inputs, parameters, running statistics).

    Returns:
        dict with total (int) and tensors: one entry per counted storage (nbytes, shape, dtype, is_output).
    """
    excluded = {t.untyped_storage().data_ptr() for t in owned}
    seen: dict[int, dict[str, Any]] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in excluded and key not in seen:
            seen[key] = {
                "nbytes": storage.nbytes(),
                "shape": list(t.shape),
                "dtype": str(t.dtype).replace("torch.", ""),
            }
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    out_key = out.untyped_storage().data_ptr()  # the graph (and so every counted storage) is still alive here
    for key, entry in seen.items():
        entry["is_output"] = key == out_key
    del out
    return {"total": sum(e["nbytes"] for e in seen.values()), "tensors": list(seen.values())}


def saved_per_impl(
    forwards: dict[str, Callable[[], Tensor]],
    missing: dict[str, str],
    owned: Iterable[Tensor],
    impls: Sequence[str] = IMPLS,
) -> dict[str, dict | str]:
    """saved_bytes() of each training forward of ``impls``, or the reason it has none (from ``missing``)."""
    owned = list(owned)
    out: dict[str, dict | str] = {}
    for name in impls:
        if name not in forwards:
            out[name] = missing[name]
            continue
        try:
            out[name] = saved_bytes(forwards[name], owned)
        except Exception as exc:  # noqa: BLE001 - reported in the row
            out[name] = f"not measured: {error_text(exc)}"
    return out


def first_call_seconds(call: Callable[[], object], device: str) -> tuple[float | None, str | None]:
    """Seconds of the first call of a ``torch.compile``'d function (compilation included), or None and why not.

    Compiling here, once per configuration, keeps compilation out of every timing.
    """
    try:
        t0 = time.perf_counter()
        call()
        sync(device)
        return time.perf_counter() - t0, None
    except Exception as exc:  # noqa: BLE001 - any compile failure is reported, not raised
        return None, f"torch.compile failed: {error_text(exc)}"


def implementations(
    fused: dict[str, Any],
    fused_reason: str | None,
    reference: Any,
    compile_skip: str | None,
    compile_fn: Callable[[], Any],
    first_call: Callable[[Any], Callable[[], object]],
    device: str,
    reset: bool = True,
) -> tuple[dict[str, Any], dict[str, str], float | None]:
    """The implementations of one configuration that run, why the others do not, and the compile seconds.

    Args:
        fused: the fused implementations by name (left out, with ``fused_reason``, when that is not None).
        reference: the eager reference ("reference").
        compile_skip: why torch.compile is not measured here, or None to compile ``compile_fn()`` ("compiled") now,
            by running ``first_call(compiled)()`` once, outside every timing.
        reset: ``torch._dynamo.reset()`` first: one configuration's graphs at a time (no recompile limit, no stale
            guards); False when the caller compiles more than one graph of the configuration.

    Returns:
        (implementations by name, reason by name of those missing, seconds of the compiling first call or None).
    """
    runs: dict[str, Any] = {}
    missing: dict[str, str] = {}
    for name, impl in fused.items():
        if fused_reason is None:
            runs[name] = impl
        else:
            missing[name] = fused_reason
    runs["reference"] = reference
    if compile_skip is not None:
        missing["compiled"] = compile_skip
        return runs, missing, None
    if reset:
        torch._dynamo.reset()
    compiled = compile_fn()
    seconds, reason = first_call_seconds(first_call(compiled), device)
    if reason is None:
        runs["compiled"] = compiled
    else:
        missing["compiled"] = reason
    return runs, missing, seconds


def error_text(exc: BaseException) -> str:
    """The first line of ``TypeName: message`` (at most 300 characters), as a row's null reason quotes it."""
    text = f"{type(exc).__name__}: {exc}".strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first[:300]


class Progress:
    """A tqdm bar on stderr when stderr is a terminal and tqdm is installed, else one plain line per step."""

    def __init__(self, total: int, desc: str) -> None:
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        tty = sys.stderr.isatty()
        self._bar = (
            tqdm(total=total, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True) if tqdm and tty else None
        )
        self._n, self._total, self._desc = 0, total, desc

    def step(self, text: str) -> None:
        self._n += 1
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)
            self._bar.update(1)
        else:
            print(f"[{self._desc} {self._n}/{self._total}] {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def run_groups(
    desc: str, groups: Sequence[Any], steps_per_group: int, measure: Callable[[Any, Progress], list[Any]]
) -> list[Any]:
    """``measure(group, progress)`` of every group in turn under one progress bar; their rows, concatenated."""
    progress = Progress(total=len(groups) * steps_per_group, desc=desc)
    rows: list[Any] = []
    try:
        for group in groups:
            rows += measure(group, progress)
    finally:
        progress.close()
    return rows


@dataclasses.dataclass(frozen=True)
class Settings:
    """What one ``bench`` run measures and how long it may spend on each figure."""

    device: str
    quick: bool
    tiny: bool  # FUSEDRES_BENCH_TINY=1 (the CLI's own test): tiny tensors and models
    repeat: int | None  # fixed timed rounds per figure, or None: as many as fit budget_s within [min, max]
    budget_s: float
    min_rounds: int
    max_rounds: int
    default_allocator: bool = False  # --default-allocator was given


def _auto_rounds(fns: dict[str, Callable[[], object]], budget_s: float, lo: int, hi: int, device: str) -> int:
    """Rounds that fit ``budget_s`` after timing one warm call of each function (clamped to [lo, hi])."""
    total = 0.0
    for fn in fns.values():
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        total += time.perf_counter() - t0
    return max(lo, min(hi, int(budget_s / max(total, 1e-9))))


def time_fns(
    fns: dict[str, Callable[[], object]],
    settings: Settings,
    reasons: dict[str, str],
    fixed_rounds: int | None = None,
    untimed: int = 2,
) -> tuple[dict[str, list[float]], dict[str, float], int, dict[str, float] | None]:
    """Alternating measurement (measure_alternating) after ``untimed`` calls of each function.

    Rounds: --repeat, else ``fixed_rounds``, else as many as fit the budget (from the last untimed call's time).
    A failure is recorded in ``reasons`` for every function (no figure is kept from a failed measurement).

    Returns:
        (seconds per round per name, page faults per call per name, rounds, other load of OtherLoad.percent()).
    """
    times: dict[str, list[float]] = {}
    faults: dict[str, float] = {}
    rounds = 0
    load = OtherLoad()
    try:
        auto = not (settings.repeat or fixed_rounds)
        for _ in range(max(untimed - int(auto), 0)):
            for fn in fns.values():
                fn()
        rounds = (
            settings.repeat
            or fixed_rounds
            or _auto_rounds(fns, settings.budget_s, settings.min_rounds, settings.max_rounds, settings.device)
        )
        times, faults = measure_alternating(fns, rounds=rounds, warmup=0, device=settings.device)
    except Exception as exc:  # noqa: BLE001 - reported in the row
        times, faults = {}, {}
        reasons.update(dict.fromkeys(fns, f"measurement failed: {error_text(exc)}"))
    return times, faults, rounds, load.percent()


# --------------------------------------------------------------------------------------------------------------
# The figures of a row (every null with its reason in row["null_reasons"])


def set_figure(row: dict[str, Any], section: str, key: str, value: Any, reason: str | None) -> None:
    """row[section][key] = value, recording why in row["null_reasons"] when value is None."""
    row.setdefault(section, {})[key] = value
    if value is None:
        row["null_reasons"][f"{section}.{key}"] = reason or "not measured"


def timed_row(
    op: str,
    direction: str,
    fns: dict[str, Callable[[], object]],
    missing: dict[str, str],
    settings: Settings,
    floor: int,
    copy_gbps: float,
    compile_s: float | None,
    impls: Sequence[str] = IMPLS,
    ratios: Sequence[tuple[str, str, str]] = RATIOS,
    **config: Any,
) -> dict[str, Any]:
    """One op row: times ``fns`` (time_fns) and records the figures of ``impls`` and ``ratios`` (fill_figures) and
    the other load, after the row's configuration (op, ``config`` such as shape, dtype and layout, direction, device,
    rounds, floor_bytes, compile_s). ``missing``: why each implementation absent from ``fns`` (compiled included)
    is not measured."""
    reasons = dict(missing)
    times, faults, rounds, other = time_fns(fns, settings, reasons)
    row: dict[str, Any] = {
        "op": op,
        **config,
        "direction": direction,
        "device": settings.device,
        "rounds": rounds,
        "floor_bytes": floor,
        "compile_s": compile_s,
        "null_reasons": {},
    }
    if compile_s is None:
        row["null_reasons"]["compile_s"] = missing.get("compiled", "not compiled")
    fill_figures(row, times, faults, reasons, floor, copy_gbps, impls, ratios)
    set_load(row, other)
    return row


def direction_rows(
    op: str,
    directions: Sequence[str],
    case: Any,
    runs: dict[str, Any],
    missing: dict[str, str],
    saved: dict[str, dict | str],
    settings: Settings,
    copy_gbps: float,
    compile_s: float | None,
    progress: Progress,
    label: str,
    impls: Sequence[str] = IMPLS,
    ratios: Sequence[tuple[str, str, str]] = RATIOS,
    **config: Any,
) -> list[dict[str, Any]]:
    """One timed_row per direction of one configuration, whose ``case`` gives ``call(direction, impl)`` (the
    function to time) and ``floor_bytes(direction)``; ``saved``: saved_per_impl() of its training forward."""
    rows = []
    for direction in directions:
        progress.step(f"{label} {direction}")
        fns = {name: case.call(direction, impl) for name, impl in runs.items()}
        floor = case.floor_bytes(direction)
        row = timed_row(op, direction, fns, missing, settings, floor, copy_gbps, compile_s, impls, ratios, **config)
        set_saved(row, saved, impls)
        rows.append(row)
    return rows


def fill_figures(
    row: dict[str, Any],
    times: dict[str, list[float]],
    faults: dict[str, float],
    reasons: dict[str, str],
    floor: int | None,
    copy_gbps: float | None,
    impls: Sequence[str] = IMPLS,
    ratios: Sequence[tuple[str, str, str]] = RATIOS,
) -> None:
    """times_ms, spreads, page faults, ratios (and GB/s, %copy when ``floor`` bytes are given) of one row.

    Every implementation of ``impls`` and ratio of ``ratios`` gets an entry; a missing one is None with its reason
    in ``row["null_reasons"]`` (from ``reasons``, keyed by implementation). Entries already in the row stay: a
    section with more implementations than IMPLS calls it again for the others.
    """
    sections = ["times_ms", "times_ms_spread", "page_faults_per_call", "ratios"]
    if floor is not None:
        sections += ["gbps", "pct_copy_bandwidth"]
    for section in sections:
        row.setdefault(section, {})
    for name in impls:
        stats = spread(times[name]) if name in times else None
        reason = reasons.get(name)
        set_figure(row, "times_ms", name, stats and stats["median"] * 1e3, reason)
        set_figure(
            row, "times_ms_spread", name, stats and {k: v * 1e3 for k, v in stats.items() if k != "median"}, reason
        )
        set_figure(row, "page_faults_per_call", name, faults.get(name), reason)
        if floor is not None:
            set_figure(row, "gbps", name, stats and floor / stats["median"] / 1e9, reason)
    for label, num, den in ratios:
        both = num in times and den in times
        missing = num if num not in times else den
        stats = ratio_stats(times, num, den) if both else None
        set_figure(row, "ratios", label, stats, f"{missing} not measured")
    if floor is not None and "fused" in impls:
        gb = row["gbps"]["fused"]
        set_figure(
            row,
            "pct_copy_bandwidth",
            "fused",
            gb and copy_gbps and 100.0 * gb / copy_gbps,
            reasons.get("fused", "copy bandwidth not measured"),
        )


def set_saved(row: dict[str, Any], saved: dict[str, dict | str], impls: Sequence[str] = IMPLS) -> None:
    """row["saved_bytes"][impl]: the total of saved_per_impl()'s entry, or None with its reason."""
    row["saved_bytes"] = {}
    for name in impls:
        entry = saved[name]
        set_figure(row, "saved_bytes", name, entry["total"] if isinstance(entry, dict) else None, str(entry))


def set_load(row: dict[str, Any], other: dict[str, float] | None) -> None:
    """row["load"]: other processes' and steal CPU % during the row's timing and its wall time."""
    row["load"] = {}
    for key, src in (("other_cpu_pct", "other"), ("steal_cpu_pct", "steal"), ("wall_s", "wall_s")):
        set_figure(row, "load", key, other and other[src], "/proc/stat not readable")


def overall_load(rows: Iterable[dict[str, Any]]) -> dict[str, float] | None:
    """Other processes' CPU share over all rows' timing windows (weighted by their wall time)."""
    timed = [r["load"] for r in rows if r["load"]["wall_s"] is not None]
    if not timed:
        return None
    total = max(sum(t["wall_s"] for t in timed), 1e-9)
    out = {key: sum(t[f"{key}_cpu_pct"] * t["wall_s"] for t in timed) / total for key in ("other", "steal")}
    out["disturbed_rows"] = sum(t["other_cpu_pct"] > 5 or t["steal_cpu_pct"] > 5 for t in timed)
    return out
