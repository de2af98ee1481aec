"""The bn_act section of ``python -m fusedres bench`` (and the cases of benchmarks/bench_bn_act.py).

Rows per shape x layout (NCHW, channels_last) x residual (on, off) x direction:

* ``fwd``      training forward with autograd recording (inputs require grad, as in a training step);
* ``fwd+bwd``  training forward then ``torch.autograd.grad`` of every input (nothing accumulates into ``.grad``);
* ``eval``     eval forward (running statistics) under ``torch.no_grad()``;

for three implementations: ``fused`` (:func:`fusedres.batch_norm_act`), ``reference`` (eager
:func:`fusedres.reference.batch_norm_act`: ``F.batch_norm`` + add + ReLU) and ``compiled``
(``torch.compile(reference, dynamic=False, fullgraph=True)``, compiled once per configuration).

Achieved GB/s use the minimal bytes of docs/design.md section 1 (fp32, 1-bit mask):

* fwd:     read x (+ read r) + write y + write the mask (numel / 8 bytes);
* fwd+bwd: fwd + read dy + read x + read the mask + write dx (+ write dr);
* eval:    read x (+ read r) + write y.

The noise check of the report times this section's eval forward against itself (:func:`noise_check`).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

import fusedres
from fusedres import _native
from fusedres import reference as _reference
from fusedres.bench import harness, table
from fusedres.bench.table import Column
from fusedres.ops.bn_act import mask_bytes

__all__ = [
    "COLUMNS",
    "DIRECTIONS",
    "LAYOUTS",
    "METHOD",
    "SHAPES",
    "TITLE",
    "BnActCase",
    "compile_reference",
    "configuration",
    "floor_bytes",
    "noise_check",
    "notes",
    "run",
    "shapes_for",
]

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
IMPLS = harness.IMPLS

TITLE = "bn_act: BatchNorm + residual + ReLU, float32: fused vs eager reference vs torch.compile(reference)"
METHOD = {
    "gbps": "minimal bytes (docs/design.md section 1, 1-bit mask = numel/8 bytes) / median time; fwd: read x (+r), "
    "write y, write mask; fwd+bwd: fwd + read dy, x, mask, write dx (+dr); eval: read x (+r), write y",
    "saved_bytes": "bytes autograd saves for backward in one training forward: "
    "torch.autograd.graph.saved_tensors_hooks sums untyped_storage().nbytes() over the unique storages packed, "
    "excluding storages the caller owns anyway (input, weight, bias, running_mean, running_var), the same way for all "
    "three implementations. Eager reference: "
    "its output y (saved by ReLU; a following layer may hold it anyway) + 2C floats; torch.compile(reference): what "
    "AOTAutograd's partitioner keeps (a 1-byte bool mask here); fused: the 1-bit mask + save_mean + save_invstd "
    "(fused_formula: mask_bytes(numel) + 2*C*4)",
}


COLUMNS = (
    table.shape(),
    table.field("layout", "layout"),
    Column("res", lambda row: "yes" if row["residual"] else "no", left=True),
    table.field("dir", "direction"),
    *table.TIMES,
    table.gbps("fused GB/s", "fused"),
    table.PCT_COPY,
    Column("saved MB f/r/c", lambda row: "-" if row["direction"] == "eval" else table.saved_mb().cell(row)),
    Column(
        "faults/call f/r/c",
        lambda row: "/".join("-" if (v := row["page_faults_per_call"][n]) is None else f"{v:.0f}" for n in IMPLS),
    ),
    table.OTHER_CPU,
)


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


def shapes_for(settings: harness.Settings) -> tuple[tuple[int, ...], ...]:
    return TINY_SHAPES if settings.tiny else QUICK_SHAPES if settings.quick else SHAPES


def configuration(settings: harness.Settings) -> dict[str, Any]:
    return {"shapes": shapes_for(settings), "layouts": LAYOUTS, "directions": DIRECTIONS, "dtype": "float32"}


def compile_skip(settings: harness.Settings, shape: tuple[int, ...], residual: bool, layout: str) -> str | None:
    """Why torch.compile is not measured for this configuration, or None when it is: --quick compiles only the
    NCHW configurations with a residual, and no run compiles CACHE_SHAPES (compiling dominates run time)."""
    if tuple(shape) in CACHE_SHAPES:
        return "not measured (skipped: the cache-resident shapes are compared with eager only)"
    if settings.quick and not (residual and layout == "nchw"):
        return "not measured (skipped: --quick)"
    return None


def noise_check(settings: harness.Settings) -> dict[str, Any]:
    """Two identical functions measured like the benchmark: their ratio should read 1.00 (+- 0.1).

    The function is the fused eval forward on the last shape of the run, or the reference's where the device has no
    native kernel.
    """
    case = BnActCase(shapes_for(settings)[-1], "nchw", True, device=settings.device)
    native = _native.has_kernel(settings.device)
    fn = fusedres.batch_norm_act if native else _reference.batch_norm_act
    function = (
        f"{'fusedres' if native else 'fusedres.reference'}.batch_norm_act eval forward, shape "
        f"{list(case.shape)}, {case.layout}, residual={case.residual}, timed as two separate functions"
    )
    rounds = 15 if settings.quick else 25
    return harness.noise_check(lambda: case.eval_call(fn), rounds, settings.device, function)


class _Impl(NamedTuple):
    fn: Callable[..., Tensor]
    compiled: bool  # takes (x, running_mean, running_var, weight, bias, residual), see compile_reference


def _implementations(
    case: BnActCase, skip_reason: str | None
) -> tuple[dict[str, dict[str, _Impl]], dict[str, dict[str, str]], dict[str, float | None]]:
    """Per mode ("train", "eval"): the implementations that run, why the others do not, and compile seconds.

    torch.compile compiles each mode once here (training: forward and backward), outside every timing.
    """
    if skip_reason is None:
        torch._dynamo.reset()  # once for both modes: a reset would drop the graphs of the other mode
    fused_reason = harness.fused_unavailable(case.device)
    runs: dict[str, dict[str, _Impl]] = {}
    missing: dict[str, dict[str, str]] = {}
    compile_s: dict[str, float | None] = {}
    for mode in ("train", "eval"):
        runs[mode], missing[mode], compile_s[mode] = harness.implementations(
            {"fused": _Impl(fusedres.batch_norm_act, False)},
            fused_reason,
            _Impl(_reference.batch_norm_act, False),
            skip_reason,
            lambda training=(mode == "train"): _Impl(compile_reference(training), True),
            lambda impl, training=(mode == "train"): (
                case.train_step_call(impl.fn, True) if training else case.eval_call(impl.fn, True)
            ),
            case.device,
            reset=False,
        )
    return runs, missing, compile_s


def _measure_group(
    group: tuple[tuple[int, ...], str, bool], settings: harness.Settings, copy_gbps: float, progress: harness.Progress
) -> list[dict[str, Any]]:
    """All directions of one (shape, layout, residual) configuration: one row each."""
    shape, layout, residual = group
    device = settings.device
    case = BnActCase(shape, layout, residual, device=device)
    runs, missing, compile_s = _implementations(case, compile_skip(settings, shape, residual, layout))
    forwards = {name: case.train_call(impl.fn, impl.compiled) for name, impl in runs["train"].items()}
    saved = harness.saved_per_impl(forwards, missing["train"], case.owned_storages())

    rows = []
    for direction in DIRECTIONS:
        progress.step(f"{list(shape)} {layout} res={int(residual)} {direction}")
        mode = "eval" if direction == "eval" else "train"
        fns = {name: case.call(direction, impl.fn, impl.compiled) for name, impl in runs[mode].items()}
        row = harness.timed_row(
            "bn_act",
            direction,
            fns,
            missing[mode],
            settings,
            case.floor_bytes(direction),
            copy_gbps,
            compile_s[mode],
            shape=list(shape),
            dtype=str(case.dtype).replace("torch.", ""),
            layout=layout,
            residual=residual,
            activation="relu",
        )
        if direction == "eval":
            harness.set_saved(row, dict.fromkeys(IMPLS, harness.NOTHING_SAVED))
            harness.set_figure(row, "saved_bytes", "fused_formula", None, harness.NOTHING_SAVED)
        else:
            harness.set_saved(row, saved)
            harness.set_figure(row, "saved_bytes", "fused_formula", mask_bytes(case.numel) + 2 * shape[1] * 4, None)
            row["saved_tensors"] = {name: e["tensors"] for name, e in saved.items() if isinstance(e, dict)}
        rows.append(row)
    del case, fns, runs, forwards
    gc.collect()
    return rows


def run(settings: harness.Settings, copy_gbps: float) -> list[dict[str, Any]]:
    """The bn_act rows of every shape x layout x residual x direction."""
    groups = [(s, lay, res) for s in shapes_for(settings) for lay in LAYOUTS for res in (False, True)]
    return harness.run_groups(
        "bn_act", groups, len(DIRECTIONS), lambda group, progress: _measure_group(group, settings, copy_gbps, progress)
    )


def notes(rows: list[dict[str, Any]]) -> list[str]:
    return ["fwd = training forward with autograd recording; fwd+bwd = + autograd.grad of x, r, w, b; eval = no_grad."]
