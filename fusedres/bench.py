"""``python -m fusedres bench``: the fused ops and models against eager PyTorch and torch.compile, time and memory.

The report: machine facts (CPU/GPU, torch, threads, allocator, measured copy bandwidth, a noise check), then one
table per op section of OP_SECTIONS (bn_act here; highway: fusedres/bench_highway.py; dense concat:
fusedres/bench_dense.py; a section whose module is missing is reported as not available), then the model rows
(fusedres/bench_models.py: training-step time of resnet20/56/50, densenet_bc_100 and the highway MLP, fused vs
reference vs torch.compile, and the peak memory of a step measured in a fresh process per configuration).
``--json PATH`` writes every figure with its configuration (a figure that could not be measured is null, with its
reason in ``null_reasons``); ``--plot PATH`` a PNG (fusedres/bench_plot.py); ``--only ops|models`` and
``--models a,b`` select; progress goes to stderr (a bar on a terminal, one line per step otherwise).

bn_act rows, per shape x layout (NCHW, channels_last) x residual (on, off) x direction:

* ``fwd``      training forward with autograd recording (inputs require grad, as in a training step);
* ``fwd+bwd``  training forward then ``torch.autograd.grad`` of every input (nothing accumulates into ``.grad``);
* ``eval``     eval forward (running statistics) under ``torch.no_grad()``;

for three implementations: ``fused`` (:func:`fusedres.batch_norm_act`), ``reference`` (eager
:func:`fusedres.reference.batch_norm_act`: ``F.batch_norm`` + add + ReLU) and ``compiled``
(``torch.compile(reference, dynamic=False, fullgraph=True)``, compiled once per configuration).

How (CONVENTIONS.md, Benchmarks): every implementation is warmed up, then each round times every implementation
once, rotating which goes first; times are medians over rounds and a ratio is the median of the per-round ratios,
with its inter-quartile range as the spread. A noise check measures two identical functions the same way first
(it should read 1.00x +- 0.1). Achieved GB/s use the minimal bytes of docs/design.md section 1 (fp32, 1-bit mask):

* fwd:     read x (+ read r) + write y + write the mask (numel / 8 bytes);
* fwd+bwd: fwd + read dy + read x + read the mask + write dx (+ write dr);
* eval:    read x (+ read r) + write y.

Page faults decide naive measurements on large tensors (docs/design.md section 6), so ``bench`` re-executes itself with
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000`` unless they are set already or ``--default-allocator``
is given; the setting in force is printed and recorded, with the minor page faults per call of each side.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import importlib.util
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

import fusedres
from fusedres import _native
from fusedres import reference as _reference
from fusedres.ops.bn_act import mask_bytes

__all__ = [
    "ALLOCATOR_ENV",
    "BnActCase",
    "OtherLoad",
    "Settings",
    "add_arguments",
    "compile_reference",
    "copy_bandwidth",
    "floor_bytes",
    "machine_info",
    "main",
    "measure_alternating",
    "noise_check",
    "ratio_stats",
    "saved_bytes",
]

ALLOCATOR_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}
_REEXEC_MARK = "_FUSEDRES_BENCH_REEXEC"
# Set (and taken out of the environment, so that child processes do not inherit it) when bench re-executed itself.
_REEXECUTED = os.environ.pop(_REEXEC_MARK, None) == "1"

# The BatchNorm shapes training really runs and that live in cache (2-13 MB in float32): the other CIFAR ResNet
# stages at batch 128 and ResNet-50's stages at batch 16. torch.compile is not measured for them (one compile per
# shape and layout would take most of the run): eager is the baseline there.
CACHE_SHAPES: tuple[tuple[int, ...], ...] = (
    (128, 32, 16, 16),
    (128, 64, 8, 8),
    (16, 128, 28, 28),
    (16, 512, 28, 28),
    (16, 256, 14, 14),
    (16, 1024, 14, 14),
    (16, 512, 7, 7),
    (16, 2048, 7, 7),
)
SHAPES: tuple[tuple[int, ...], ...] = ((32, 64, 56, 56), (32, 256, 56, 56), (128, 16, 32, 32), *CACHE_SHAPES)
QUICK_SHAPES: tuple[tuple[int, ...], ...] = ((32, 64, 56, 56), (128, 16, 32, 32))
# FUSEDRES_BENCH_TINY=1 (the CLI's own test): tiny tensors, one with an odd channel count.
TINY_SHAPES: tuple[tuple[int, ...], ...] = ((4, 8, 6, 6), (3, 5, 4, 7))
LAYOUTS = ("nchw", "channels_last")
DIRECTIONS = ("fwd", "fwd+bwd", "eval")
IMPLS = ("fused", "reference", "compiled")
RATIOS = (("reference/fused", "reference", "fused"), ("compiled/fused", "compiled", "fused"))

SAVED_BYTES_METHOD = (
    "bytes autograd saves for backward in one training forward: "
    "torch.autograd.graph.saved_tensors_hooks sums untyped_storage().nbytes() over the unique storages packed, "
    "excluding storages the caller owns anyway (input, weight, bias, running_mean, running_var), the same way for all "
    "three implementations. Eager reference: "
    "its output y (saved by ReLU; a following layer may hold it anyway) + 2C floats; torch.compile(reference): what "
    "AOTAutograd's partitioner keeps (a 1-byte bool mask here); fused: the 1-bit mask + save_mean + save_invstd "
    "(fused_formula: mask_bytes(numel) + 2*C*4)."
)
TIMING_METHOD = (
    "warm-up, then per round each implementation is timed once (perf_counter around the call, device synchronised), "
    "the order rotating every round; times are medians over rounds; a ratio is the median of per-round ratios, "
    "spread = inter-quartile range (q25..q75) and min..max of those per-round ratios"
)
GBPS_METHOD = (
    "minimal bytes (docs/design.md section 1, 1-bit mask = numel/8 bytes) / median time; fwd: read x (+r), write y, "
    "write mask; fwd+bwd: fwd + read dy, x, mask, write dx (+dr); eval: read x (+r), write y"
)


# --------------------------------------------------------------------------------------------------------------
# Machine facts


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


def _sync(device: str) -> None:
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
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
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
    _sync(device)
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
                _sync(device)
                t0 = time.perf_counter()
                fns[name]()
                _sync(device)
                t1 = time.perf_counter()
                faults[name] += _minflt() - f0
                times[name].append(t1 - t0)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times, {name: faults[name] / max(rounds, 1) for name in names}


def _spread(values: Sequence[float]) -> dict[str, float]:
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
    return _spread([a / b for a, b in zip(times[num], times[den], strict=True)])


def noise_check(case: BnActCase, rounds: int, device: str) -> dict[str, Any]:
    """Two identical functions measured like the benchmark: their ratio should read 1.00 (+- 0.1).

    The function is the fused eval forward, or the reference's where the device has no native kernel.
    """
    native = _native.has_kernel(device)
    fn = fusedres.batch_norm_act if native else _reference.batch_norm_act
    times, _ = measure_alternating({"A": case.eval_call(fn), "B": case.eval_call(fn)}, rounds, warmup=2, device=device)
    stats = ratio_stats(times, "A", "B")
    return {
        **stats,
        "rounds": rounds,
        "function": f"{'fusedres' if native else 'fusedres.reference'}.batch_norm_act eval forward, shape "
        f"{list(case.shape)}, {case.layout}, residual={case.residual}, timed as two separate functions",
        "ok": abs(stats["median"] - 1.0) <= 0.1,
    }


# --------------------------------------------------------------------------------------------------------------
# The bn_act cases (shared with benchmarks/bench_bn_act.py)


def floor_bytes(numel: int, residual: bool, direction: str, elem_size: int = 4) -> int:
    """Minimal bytes of one call (docs/design.md section 1) with a 1-bit mask; ``direction`` in DIRECTIONS."""
    t = numel * elem_size
    mask = numel // 8
    io = t * (2 + int(residual))  # read x (+ r), write y
    if direction == "eval":
        return io
    fwd = io + mask
    if direction == "fwd":
        return fwd
    if direction == "fwd+bwd":
        return fwd + 3 * t + mask + t * int(residual)  # read dy, x, mask; write dx (+ dr)
    raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


def _reference_train(x: Tensor, rm: Tensor, rv: Tensor, w: Tensor, b: Tensor, r: Tensor | None) -> Tensor:
    return _reference.batch_norm_act(x, rm, rv, w, b, True, 0.1, 1e-5, residual=r)


def _reference_eval(x: Tensor, rm: Tensor, rv: Tensor, w: Tensor, b: Tensor, r: Tensor | None) -> Tensor:
    return _reference.batch_norm_act(x, rm, rv, w, b, False, 0.1, 1e-5, residual=r)


def compile_reference(training: bool) -> Callable[..., Tensor]:
    """``torch.compile`` of the reference with signature (x, running_mean, running_var, weight, bias, residual).

    ``dynamic=False`` so every shape gets its own static kernel, ``fullgraph=True`` so that a graph break or a hit
    recompile limit fails loudly instead of silently running eager code.
    """
    return torch.compile(_reference_train if training else _reference_eval, dynamic=False, fullgraph=True)


class BnActCase:
    """Inputs of one configuration and the calls that benchmark it.

    Args:
        shape: (N, C, H, W) of input (and residual, grad_out).
        layout: "nchw" or "channels_last".
        residual: whether a residual is added.
    """

    def __init__(
        self,
        shape: Sequence[int],
        layout: str,
        residual: bool,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.shape, self.layout, self.residual, self.device, self.dtype = tuple(shape), layout, residual, device, dtype
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        gen = torch.Generator().manual_seed(seed)
        C = self.shape[1]

        def full() -> Tensor:
            return torch.randn(self.shape, generator=gen, dtype=dtype).to(device=device, memory_format=fmt)

        def channel(lo: float, hi: float) -> Tensor:
            return (torch.rand(C, generator=gen) * (hi - lo) + lo).to(device=device, dtype=dtype)

        self.x = full().requires_grad_()
        self.r = full().requires_grad_() if residual else None
        self.dy = full()
        self.w = channel(0.5, 1.5).requires_grad_()
        self.b = channel(-0.5, 0.5).requires_grad_()
        self.rm = channel(-0.1, 0.1)
        self.rv = channel(0.8, 1.2)
        self.numel = self.x.numel()

    @property
    def grad_inputs(self) -> tuple[Tensor, ...]:
        return tuple(t for t in (self.x, self.r, self.w, self.b) if t is not None)

    def owned_storages(self) -> list[Tensor]:
        """Tensors the caller holds anyway, whose storages do not count as saved for backward."""
        return [self.x, self.w, self.b, self.rm, self.rv]

    def train_call(self, fn: Callable[..., Tensor], compiled: bool = False) -> Callable[[], Tensor]:
        """Training forward with autograd recording; ``compiled`` fns take (x, rm, rv, w, b, r)."""
        x, r, w, b, rm, rv = self.x, self.r, self.w, self.b, self.rm, self.rv
        if compiled:
            return lambda: fn(x, rm, rv, w, b, r)
        return lambda: fn(x, rm, rv, w, b, True, 0.1, 1e-5, residual=r)

    def train_step_call(self, fn: Callable[..., Tensor], compiled: bool = False) -> Callable[[], tuple[Tensor, ...]]:
        """Training forward + backward: gradients of input, residual, weight and bias (returned, not accumulated)."""
        forward, dy, inputs = self.train_call(fn, compiled), self.dy, self.grad_inputs

        def step() -> tuple[Tensor, ...]:
            return torch.autograd.grad(forward(), inputs, dy)

        return step

    def eval_call(self, fn: Callable[..., Tensor], compiled: bool = False) -> Callable[[], Tensor]:
        """Eval forward (running statistics) under torch.no_grad()."""
        x, w, b = self.x.detach(), self.w.detach(), self.b.detach()
        r = self.r.detach() if self.r is not None else None
        rm, rv = self.rm, self.rv

        def run() -> Tensor:
            with torch.no_grad():
                if compiled:
                    return fn(x, rm, rv, w, b, r)
                return fn(x, rm, rv, w, b, False, 0.1, 1e-5, residual=r)

        return run

    def call(self, direction: str, fn: Callable[..., Tensor], compiled: bool = False) -> Callable[[], object]:
        if direction == "fwd":
            return self.train_call(fn, compiled)
        if direction == "fwd+bwd":
            return self.train_step_call(fn, compiled)
        if direction == "eval":
            return self.eval_call(fn, compiled)
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")

    def floor_bytes(self, direction: str) -> int:
        return floor_bytes(self.numel, self.residual, direction, self.x.element_size())


def saved_bytes(forward: Callable[[], Tensor], owned: Iterable[Tensor]) -> dict[str, Any]:
    """Bytes autograd saves for backward when ``forward()`` runs (see SAVED_BYTES_METHOD).

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


# --------------------------------------------------------------------------------------------------------------
# The report


class _Progress:
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


def _auto_rounds(fns: dict[str, Callable[[], object]], budget_s: float, lo: int, hi: int, device: str) -> int:
    """Rounds that fit ``budget_s`` after timing one warm call of each function (clamped to [lo, hi])."""
    total = 0.0
    for fn in fns.values():
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        total += time.perf_counter() - t0
    return max(lo, min(hi, int(budget_s / max(total, 1e-9))))


def _err(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first[:300]


class _Impl(NamedTuple):
    fn: Callable[..., Tensor]
    compiled: bool  # takes (x, running_mean, running_var, weight, bias, residual), see compile_reference


def _implementations(
    case: BnActCase, with_compile: bool, skip_reason: str
) -> tuple[dict[str, dict[str, _Impl]], dict[str, dict[str, str]], dict[str, float]]:
    """Per mode ("train", "eval"): the implementations that run, why the others do not, and compile seconds.

    torch.compile compiles each mode once here (training: forward and backward), outside every timing.
    """
    runs: dict[str, dict[str, _Impl]] = {"train": {}, "eval": {}}
    missing: dict[str, dict[str, str]] = {"train": {}, "eval": {}}
    compile_s: dict[str, float] = {}
    if not _native.native_loaded:
        fused_reason = f"not measured: fusedres._C did not load ({_native.native_error})"
    elif not _native.has_kernel(case.device):
        fused_reason = f"not measured: fusedres has no native {case.device} kernel (it would run the reference)"
    else:
        fused_reason = None
    if with_compile:
        torch._dynamo.reset()  # one configuration's graphs at a time: no recompile limit, no stale guards
    for mode, run in runs.items():
        if fused_reason is None:
            run["fused"] = _Impl(fusedres.batch_norm_act, False)
        else:
            missing[mode]["fused"] = fused_reason
        run["reference"] = _Impl(_reference.batch_norm_act, False)
        if not with_compile:
            missing[mode]["compiled"] = skip_reason
            continue
        fn = compile_reference(mode == "train")
        try:
            t0 = time.perf_counter()
            (case.train_step_call(fn, True) if mode == "train" else case.eval_call(fn, True))()
            _sync(case.device)
            compile_s[mode] = time.perf_counter() - t0
            run["compiled"] = _Impl(fn, True)
        except Exception as exc:  # noqa: BLE001 - any compile failure is reported, not raised
            missing[mode]["compiled"] = f"torch.compile failed: {_err(exc)}"
    return runs, missing, compile_s


def _saved_per_impl(case: BnActCase, runs: dict[str, _Impl], missing: dict[str, str]) -> dict[str, dict | str]:
    """saved_bytes() of each training implementation, or the reason it has none."""
    out: dict[str, dict | str] = {}
    for name in IMPLS:
        if name not in runs:
            out[name] = missing[name]
            continue
        try:
            out[name] = saved_bytes(case.train_call(runs[name].fn, runs[name].compiled), case.owned_storages())
        except Exception as exc:  # noqa: BLE001
            out[name] = f"not measured: {_err(exc)}"
    return out


def _set(row: dict[str, Any], section: str, key: str, value: Any, reason: str | None) -> None:
    """row[section][key] = value, recording why in row["null_reasons"] when value is None."""
    row[section][key] = value
    if value is None:
        row["null_reasons"][f"{section}.{key}"] = reason or "not measured"


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
    in ``row["null_reasons"]`` (from ``reasons``, keyed by implementation).
    """
    sections = ["times_ms", "times_ms_spread", "page_faults_per_call", "ratios"]
    if floor is not None:
        sections += ["gbps", "pct_copy_bandwidth"]
    for section in sections:
        row[section] = {}
    for name in impls:
        spread = _spread(times[name]) if name in times else None
        reason = reasons.get(name)
        _set(row, "times_ms", name, spread and spread["median"] * 1e3, reason)
        _set(row, "times_ms_spread", name, spread and {k: v * 1e3 for k, v in spread.items() if k != "median"}, reason)
        _set(row, "page_faults_per_call", name, faults.get(name), reason)
        if floor is not None:
            _set(row, "gbps", name, spread and floor / spread["median"] / 1e9, reason)
    for label, num, den in ratios:
        both = num in times and den in times
        missing = num if num not in times else den
        stats = ratio_stats(times, num, den) if both else None
        _set(row, "ratios", label, stats, f"{missing} not measured")
    if floor is not None:
        gb = row["gbps"]["fused"]
        _set(
            row,
            "pct_copy_bandwidth",
            "fused",
            gb and copy_gbps and 100.0 * gb / copy_gbps,
            reasons.get("fused", "copy bandwidth not measured"),
        )


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
        reasons.update(dict.fromkeys(fns, f"measurement failed: {_err(exc)}"))
    return times, faults, rounds, load.percent()


def set_load(row: dict[str, Any], other: dict[str, float] | None) -> None:
    """row["load"]: other processes' and steal CPU % during the row's timing and its wall time."""
    row["load"] = {}
    for key, src in (("other_cpu_pct", "other"), ("steal_cpu_pct", "steal"), ("wall_s", "wall_s")):
        _set(row, "load", key, other and other[src], "/proc/stat not readable")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What one ``bench`` run measures and how long it may spend on each figure."""

    device: str
    quick: bool
    tiny: bool
    repeat: int | None  # fixed timed rounds per figure, or None: as many as fit budget_s within [min, max]
    budget_s: float
    min_rounds: int
    max_rounds: int
    default_allocator: bool = False  # --default-allocator was given

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        quick = bool(args.quick)
        budget = args.budget if args.budget is not None else (0.3 if quick else 1.0)
        lo, hi = (5, 15) if quick else (7, 30)
        tiny = os.environ.get("FUSEDRES_BENCH_TINY", "0") == "1"
        return cls(args.device, quick, tiny, args.repeat, budget, lo, hi, bool(args.default_allocator))

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return TINY_SHAPES if self.tiny else QUICK_SHAPES if self.quick else SHAPES

    def compile_skip(self, shape: tuple[int, ...], residual: bool, layout: str = "nchw") -> str | None:
        """Why torch.compile is not measured for this configuration, or None when it is: --quick compiles only the
        NCHW configurations with a residual, and no run compiles CACHE_SHAPES (compiling dominates run time)."""
        if tuple(shape) in CACHE_SHAPES:
            return "not measured (skipped: the cache-resident shapes are compared with eager only)"
        if self.quick and not (residual and layout == "nchw"):
            return "not measured (skipped: --quick)"
        return None


def _measure_group(
    shape: tuple[int, ...],
    layout: str,
    residual: bool,
    settings: Settings,
    copy_gbps: float,
    progress: _Progress,
) -> list[dict[str, Any]]:
    """All directions of one (shape, layout, residual) configuration: one row each."""
    device = settings.device
    case = BnActCase(shape, layout, residual, device=device)
    skip = settings.compile_skip(shape, residual, layout)
    runs, missing, compile_s = _implementations(case, skip is None, skip or "")
    saved = _saved_per_impl(case, runs["train"], missing["train"])
    nothing_saved = "eval forward runs under torch.no_grad(): nothing is saved"

    rows = []
    for direction in DIRECTIONS:
        progress.step(f"{list(shape)} {layout} res={int(residual)} {direction}")
        mode = "eval" if direction == "eval" else "train"
        reasons = dict(missing[mode])
        fns = {name: case.call(direction, impl.fn, impl.compiled) for name, impl in runs[mode].items()}
        times: dict[str, list[float]] = {}
        faults: dict[str, float] = {}
        rounds = 0
        load = OtherLoad()
        try:
            for fn in fns.values():  # warm-up
                fn()
            rounds = settings.repeat or _auto_rounds(
                fns, settings.budget_s, settings.min_rounds, settings.max_rounds, device
            )
            times, faults = measure_alternating(fns, rounds=rounds, warmup=1, device=device)
        except Exception as exc:  # noqa: BLE001
            reasons.update(dict.fromkeys(fns, f"measurement failed: {_err(exc)}"))
        other = load.percent()
        fb = case.floor_bytes(direction)
        row: dict[str, Any] = {
            "op": "bn_act",
            "shape": list(shape),
            "dtype": str(case.dtype).replace("torch.", ""),
            "layout": layout,
            "residual": residual,
            "direction": direction,
            "activation": "relu",
            "device": device,
            "rounds": rounds,
            "floor_bytes": fb,
            "compile_s": compile_s.get(mode),
            "null_reasons": {},
        }
        if row["compile_s"] is None:
            row["null_reasons"]["compile_s"] = missing[mode].get("compiled", "not compiled")
        for section in (
            "times_ms",
            "times_ms_spread",
            "gbps",
            "page_faults_per_call",
            "ratios",
            "pct_copy_bandwidth",
            "saved_bytes",
            "load",
        ):
            row[section] = {}
        for name in IMPLS:
            spread = _spread(times[name]) if name in times else None
            reason = reasons.get(name)
            _set(row, "times_ms", name, spread and spread["median"] * 1e3, reason)
            _set(
                row,
                "times_ms_spread",
                name,
                spread and {k: v * 1e3 for k, v in spread.items() if k != "median"},
                reason,
            )
            _set(row, "gbps", name, spread and fb / spread["median"] / 1e9, reason)
            _set(row, "page_faults_per_call", name, faults.get(name), reason)
        for label, num, den in RATIOS:
            both = num in times and den in times
            _set(
                row,
                "ratios",
                label,
                ratio_stats(times, num, den) if both else None,
                f"{num if num not in times else den} not measured",
            )
        fused_gbps = row["gbps"]["fused"]
        _set(
            row,
            "pct_copy_bandwidth",
            "fused",
            fused_gbps and 100.0 * fused_gbps / copy_gbps,
            reasons.get("fused", "copy bandwidth not measured"),
        )
        for name in IMPLS:
            if direction == "eval":
                _set(row, "saved_bytes", name, None, nothing_saved)
            else:
                entry = saved[name]
                _set(row, "saved_bytes", name, entry["total"] if isinstance(entry, dict) else None, str(entry))
        _set(
            row,
            "saved_bytes",
            "fused_formula",
            None if direction == "eval" else mask_bytes(case.numel) + 2 * shape[1] * 4,
            nothing_saved,
        )
        if direction != "eval":
            row["saved_tensors"] = {name: e["tensors"] for name, e in saved.items() if isinstance(e, dict)}
        for key in ("other_cpu_pct", "steal_cpu_pct", "wall_s"):
            value = other and other[{"other_cpu_pct": "other", "steal_cpu_pct": "steal"}.get(key, key)]
            _set(row, "load", key, value, "/proc/stat not readable")
        rows.append(row)
    del case, fns, runs
    gc.collect()
    return rows


def _fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.1f}"


def _fmt_ratio(r: dict[str, float] | None) -> str:
    if r is None:
        return "-"
    return f"{r['median']:.2f}x [{r['q25']:.2f}-{r['q75']:.2f}]"


def _fmt_mb(v: int | None) -> str:
    return "-" if v is None else f"{v / 1e6:.2f}"


def render_table(rows: list[dict[str, Any]]) -> str:
    """The aligned plain-text table of the bn_act rows."""
    head = [
        "shape",
        "layout",
        "res",
        "dir",
        "fused ms",
        "ref ms",
        "compile ms",
        "ref/fused [IQR]",
        "compile/fused [IQR]",
        "fused GB/s",
        "%copy",
        "saved MB f/r/c",
        "faults/call f/r/c",
        "other CPU",
    ]
    body = []
    for row in rows:
        t, sb, pf = row["times_ms"], row["saved_bytes"], row["page_faults_per_call"]
        gb = row["gbps"]["fused"]
        pct = row["pct_copy_bandwidth"]["fused"]
        saved = "-" if row["direction"] == "eval" else "/".join(_fmt_mb(sb[n]) for n in IMPLS)
        faults = "/".join("-" if pf[n] is None else f"{pf[n]:.0f}" for n in IMPLS)
        body.append(
            [
                "x".join(map(str, row["shape"])),
                row["layout"],
                "yes" if row["residual"] else "no",
                row["direction"],
                _fmt_ms(t["fused"]),
                _fmt_ms(t["reference"]),
                _fmt_ms(t["compiled"]),
                _fmt_ratio(row["ratios"]["reference/fused"]),
                _fmt_ratio(row["ratios"]["compiled/fused"]),
                "-" if gb is None else f"{gb:.1f}",
                "-" if pct is None else f"{pct:.0f}%",
                saved,
                faults,
                "-" if row["load"]["other_cpu_pct"] is None else f"{row['load']['other_cpu_pct']:.0f}%",
            ]
        )
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    left = {0, 1, 2, 3}

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(head), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in body]
    return "\n".join(out)


def _null_footnotes(rows: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, int] = {}
    for row in rows:
        for key, reason in row["null_reasons"].items():
            if key.startswith(("times_ms.", "saved_bytes.")) and not reason.startswith("eval forward"):
                seen[f"{key.split('.', 1)[1]}: {reason}"] = seen.get(f"{key.split('.', 1)[1]}: {reason}", 0) + 1
    return [f"  {text} ({n} rows)" for text, n in seen.items()]


def _reexec_with_allocator(args: argparse.Namespace) -> None:
    """Re-executes this process with ALLOCATOR_ENV set, unless they are set already or --default-allocator."""
    if args.default_allocator or all(k in os.environ for k in ALLOCATOR_ENV):
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m fusedres bench``."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help="shapes (32,64,56,56) and (128,16,32,32) only, shorter timing, torch.compile only for the op "
        "configurations with a residual in NCHW (and one of each other op); models: resnet20 and the highway MLP "
        "at smaller batches, 2 rounds",
    )
    parser.add_argument("--json", metavar="PATH", help="write every figure with its configuration to PATH")
    parser.add_argument(
        "--plot",
        metavar="PATH",
        help="write a PNG of the speedup per op row and the time and peak memory per model (needs matplotlib: "
        "pip install 'fusedres[cli]')",
    )
    parser.add_argument(
        "--only",
        choices=("ops", "models"),
        default=None,
        help="run only the op rows or only the model rows (default: both)",
    )
    parser.add_argument(
        "--models",
        metavar="NAMES",
        default=None,
        help="comma-separated model names for the model rows (default: resnet20,resnet56,resnet50,densenet_bc_100,"
        "highway_mlp; --quick: resnet20,highway_mlp)",
    )
    parser.add_argument(
        "--no-memory",
        action="store_true",
        help="skip the peak-memory measurement of the models (one fresh subprocess per model and configuration)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--repeat",
        type=int,
        metavar="N",
        default=None,
        help="timed rounds per figure (default: as many as fit --budget, within [min, max] rounds; models: 2 "
        "rounds with --quick, else 3)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        metavar="S",
        help="seconds of timed rounds per op figure when --repeat is not given (default 1.0, quick 0.3)",
    )
    parser.add_argument(
        "--default-allocator",
        action="store_true",
        help=f"do not re-execute with {' '.join(f'{k}={v}' for k, v in ALLOCATOR_ENV.items())} "
        "(figures then include first-touch page faults of fresh outputs)",
    )


def _print_header(machine: dict[str, Any], copy: dict[str, Any], noise: dict[str, Any]) -> None:
    print("fusedres bench: fused ops and models vs eager PyTorch and torch.compile, float32")
    print(
        f"  cpu        {machine['cpu_model']}, {machine['cpus_usable']} usable cores "
        f"(os.cpu_count {machine['cpu_count']}), torch threads {machine['torch_threads']}, ISA {machine['isa']}"
    )
    print(
        f"  torch      {machine['torch_version']}, python {machine['python']}, fusedres {machine['fusedres_version']}, "
        f"native loaded {machine['native_loaded']}, CUDA kernels compiled {machine['cuda_compiled']}"
    )
    if machine["device"] == "cuda":
        print(f"  gpu        {machine['gpu']}")
    print(f"  allocator  {describe_allocator(machine['allocator'])}")
    print(
        f"  copy       {copy['gbps']:.1f} GB/s (dst.copy_(src), 256 MB float32, 2*bytes/median of {copy['samples']}; "
        f"range {copy['gbps_min']:.1f}-{copy['gbps_max']:.1f})"
    )
    flag = "" if noise["ok"] else "  WARNING: outside 1.00 +- 0.1, the machine is noisy: distrust small ratios"
    print(
        f"  noise      noise check: {noise['median']:.2f}x [IQR {noise['q25']:.2f}-{noise['q75']:.2f}, "
        f"range {noise['min']:.2f}-{noise['max']:.2f}] identical functions, {noise['rounds']} rounds{flag}"
    )
    sys.stdout.flush()


def _overall_load(rows: list[dict[str, Any]]) -> dict[str, float] | None:
    """Other processes' CPU share over all rows' timing windows (weighted by their wall time)."""
    timed = [r["load"] for r in rows if r["load"]["wall_s"] is not None]
    if not timed:
        return None
    total = max(sum(t["wall_s"] for t in timed), 1e-9)
    out = {key: sum(t[f"{key}_cpu_pct"] * t["wall_s"] for t in timed) / total for key in ("other", "steal")}
    out["disturbed_rows"] = sum(t["other_cpu_pct"] > 5 or t["steal_cpu_pct"] > 5 for t in timed)
    return out


def run_bn_act(settings: Settings, copy_gbps: float) -> dict[str, Any]:
    """The bn_act op section: {"bn_act": rows, "other_load_pct": other load over the rows' timing windows}."""
    groups = [(s, lay, res) for s in settings.shapes for lay in LAYOUTS for res in (False, True)]
    progress = _Progress(total=len(groups) * len(DIRECTIONS), desc="bn_act")
    rows: list[dict[str, Any]] = []
    try:
        for shape, layout, residual in groups:
            rows += _measure_group(shape, layout, residual, settings, copy_gbps, progress)
    finally:
        progress.close()
    return {"bn_act": rows, "other_load_pct": _overall_load(rows)}


def print_bn_act(result: dict[str, Any], copy_gbps: float) -> None:
    """The bn_act table and its footnotes."""
    rows, load = result["bn_act"], result["other_load_pct"]
    allocator = describe_allocator(allocator_setting())
    print("bn_act: BatchNorm + residual + ReLU, float32: fused vs eager reference vs torch.compile(reference)")
    print(render_table(rows))
    print()
    print("Times: medians in ms. Ratios: median of per-round ratios [inter-quartile range]; >1 means fused is faster.")
    print("fwd = training forward with autograd recording; fwd+bwd = + autograd.grad of x, r, w, b; eval = no_grad.")
    print(f"GB/s: {GBPS_METHOD}; %copy = fused GB/s / measured copy bandwidth ({copy_gbps:.1f} GB/s).")
    print(f"saved MB: {SAVED_BYTES_METHOD}")
    print(f"f/r/c = fused/reference/compiled. faults/call: minor page faults per call, under allocator {allocator}.")
    print(
        "other CPU: CPU time of other processes during the row's timing (/proc/stat busy minus this process), "
        "in % of all cores; it should read ~0%: a competing process makes the two OpenMP threads wait for each "
        "other across scheduler quanta."
    )
    if load is not None:
        print(
            f"Other processes used {load['other']:.0f}% of the CPUs while rows were timed (steal "
            f"{load['steal']:.0f}%); rows above 5%: {load['disturbed_rows']}"
            + ("  WARNING: those figures are disturbed; rerun on a quiet machine." if load["disturbed_rows"] else ".")
        )
    notes = _null_footnotes(rows)
    if notes:
        print("Not measured:")
        print("\n".join(notes))


class OpSection(NamedTuple):
    """One op section of the report: ``module.<run>(settings, copy_gbps) -> dict`` of JSON entries (each key a
    top-level key of the --json report, e.g. {"highway": rows}) and ``module.<report>(result, copy_gbps)``, which
    prints its table. A section whose module does not exist is reported as not available."""

    name: str
    module: str
    run: str = "run"
    report: str = "print_report"


# Adding an op to the report is one line here.
OP_SECTIONS: tuple[OpSection, ...] = (
    OpSection("bn_act", __name__, "run_bn_act", "print_bn_act"),
    OpSection("highway", "fusedres.bench_highway"),
    OpSection("dense", "fusedres.bench_dense"),
)


def run_op_sections(
    settings: Settings, copy_gbps: float, sections: Sequence[OpSection] = OP_SECTIONS
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Runs and prints every op section in turn.

    Returns:
        (the JSON entries of all sections, per section: available, reason (None when it ran), wall_s).
    """
    entries: dict[str, Any] = {}
    status: dict[str, dict[str, Any]] = {}
    for section in sections:
        t0 = time.perf_counter()
        reason = None
        try:
            if importlib.util.find_spec(section.module) is None:
                raise ModuleNotFoundError(f"{section.module} does not exist in this build")
            module = importlib.import_module(section.module)
            run, report = getattr(module, section.run), getattr(module, section.report)
        except Exception as exc:  # noqa: BLE001 - a missing or broken section is reported, the others still run
            reason = f"not available: {_err(exc)}"
        if reason is None:
            try:
                result = run(settings, copy_gbps)
            except Exception as exc:  # noqa: BLE001
                reason = f"failed: {_err(exc)}"
        if reason is not None:
            entries[section.name] = None
            print(f"\n{section.name}: {reason}")
        else:
            entries.update(result)
            print()
            report(result, copy_gbps)
        sys.stdout.flush()
        status[section.name] = {"available": reason is None, "reason": reason, "wall_s": time.perf_counter() - t0}
    return entries, status


def main(args: argparse.Namespace) -> int:
    """Runs the benchmark and prints (and optionally writes) the report."""
    if args.repeat is not None and args.repeat < 1:
        raise SystemExit(f"--repeat must be a positive integer, got {args.repeat}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    plot = None
    if args.plot:
        from fusedres import bench_plot  # fails now, not after minutes of measuring, when matplotlib is missing

        plot = bench_plot.require_matplotlib()
    _reexec_with_allocator(args)
    t_start = time.perf_counter()
    settings = Settings.from_args(args)
    torch.manual_seed(0)

    machine = machine_info(settings.device, args.default_allocator)
    copy = copy_bandwidth(settings.device)
    noise_case = BnActCase(settings.shapes[-1], "nchw", True, device=settings.device)
    noise = noise_check(noise_case, rounds=15 if settings.quick else 25, device=settings.device)
    del noise_case
    _print_header(machine, copy, noise)

    entries: dict[str, Any] = {}
    null_reasons: dict[str, str] = {}
    sections: dict[str, dict[str, Any]] = {}
    if args.only in (None, "ops"):
        entries, sections = run_op_sections(settings, copy["gbps"])
        null_reasons.update({name: s["reason"] for name, s in sections.items() if not s["available"]})
        if entries.get("other_load_pct", 0) is None:
            null_reasons["other_load_pct"] = "/proc/stat not readable"
    else:
        null_reasons.update(dict.fromkeys((s.name for s in OP_SECTIONS), "not measured (skipped: --only models)"))
    if args.only in (None, "models"):
        from fusedres import bench_models

        names = None if args.models is None else [n.strip() for n in args.models.split(",") if n.strip()]
        models = bench_models.run(settings, names=names, memory=not args.no_memory)
        print()
        bench_models.print_report(models)
    else:
        models = None
        null_reasons["models"] = "not measured (skipped: --only ops)"
    wall = time.perf_counter() - t_start
    print(f"wall time {wall:.0f} s")
    sys.stdout.flush()

    from fusedres import bench_highway

    report = {
        "schema": "fusedres-bench/2",
        "argv": list(getattr(sys, "orig_argv", sys.argv)),
        "settings": {
            **dataclasses.asdict(settings),
            "dtype": "float32",
            "shapes": settings.shapes,
            "only": args.only,
            "memory": not args.no_memory,
        },
        "machine": machine,
        "copy_bandwidth": copy,
        "noise_check": noise,
        "method": {
            "timing": TIMING_METHOD,
            "gbps": GBPS_METHOD,
            "saved_bytes": SAVED_BYTES_METHOD,
            "highway_gbps": bench_highway.GBPS_METHOD,
            "highway_saved_bytes": bench_highway.SAVED_BYTES_METHOD,
        },
        "sections": sections,
        **entries,
        "models": models,
        "null_reasons": null_reasons,
        "wall_s": wall,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    if plot is not None:
        plot(report, args.plot)
        print(f"wrote {args.plot}")
    return 0
