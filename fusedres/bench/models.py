"""The model rows of ``python -m fusedres bench``: one training step, fused vs reference vs torch.compile, and memory.

Per model of the registry (:func:`fusedres.models.get_model`), one SGD training step (zero_grad(set_to_none),
forward, cross-entropy, backward, step; fusedres.bench.memory.make_train_step) at a fixed batch, float32,
contiguous (NCHW) input:

* ``fused``      ``get_model(name, fused=True)``;
* ``reference``  ``get_model(name, fused=False)`` (the same model on the pure PyTorch references), same weights;
* ``compiled``   ``torch.compile(reference model, dynamic=False, fullgraph=True)`` where its compile time is
  affordable on the machine (MODELS[...].compile); otherwise the row says why it was skipped.

Timing: the first step of each is the untimed warm-up (its losses are recorded: fused and reference start from the
same weights, so they agree), then a fixed number of alternating rounds (fusedres.bench.harness.time_fns): times are
medians, ratios medians of per-round ratios.

Peak memory: one fresh process per (model, fused | reference) configuration, fusedres.bench.memory.MEMORY_METHOD.

A model that is not registered (or fails to build or run) gives a row whose figures are null with the reason.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from fusedres.bench import harness, table
from fusedres.bench import highway as _highway
from fusedres.bench.memory import (
    MEMORY_METHOD,
    TIMM_PREFIX,
    TORCHVISION_PREFIX,
    build_model,
    make_batch,
    make_train_step,
    measure_peak_memory,
)
from fusedres.bench.table import Column

__all__ = ["COLUMNS", "DEFAULT_MODELS", "MODELS", "QUICK_MODELS", "TITLE", "ModelSpec", "measure_model", "notes", "run"]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model row: the builder's keyword arguments (besides ``fused``), the batch and the per-sample input."""

    name: str
    build_kwargs: dict[str, Any]
    batch: int
    input_shape: tuple[int, ...]
    compile: bool  # torch.compile of the reference and of the fused model in the default run
    compile_skip: str = ""  # why not, when compile is False
    memory_format: str = "contiguous"  # or "channels_last": the models and the input batch

    @property
    def key(self) -> str:
        """The row's name: the model, and its layout when not contiguous (``resnet20@channels_last``)."""
        return self.name if self.memory_format == "contiguous" else f"{self.name}@{self.memory_format}"

    def with_(self, **changes: Any) -> ModelSpec:
        return dataclasses.replace(self, **changes)


_MLP = {k: v for k, v in _highway.MLP_STEP.items() if k != "batch"}
_MLP_TINY = {k: v for k, v in _highway.MLP_STEP_TINY.items() if k != "batch"}
_CIFAR = (3, 32, 32)
# torch.compile (Inductor, forward + backward) of resnet20 at batch 128 took 134 s on this 2-core machine while other
# processes loaded it; the deeper models have proportionally larger graphs: not affordable in a run of minutes.
_TOO_LONG = "not measured (skipped: torch.compile of this model takes minutes on {}; run with a GPU or benchmarks/)"

_TV_MOBILENET = TORCHVISION_PREFIX + "mobilenet_v2"
MODELS: dict[str, ModelSpec] = {
    "resnet20": ModelSpec("resnet20", {"num_classes": 10}, 128, _CIFAR, True),
    "resnet56": ModelSpec("resnet56", {"num_classes": 10}, 128, _CIFAR, False, _TOO_LONG),
    "resnet50": ModelSpec("resnet50", {}, 16, (3, 224, 224), False, _TOO_LONG),
    # What a timm user gets from fusedres.convert(timm.create_model("resnet50")): fused = the converted model.
    TIMM_PREFIX + "resnet50": ModelSpec(TIMM_PREFIX + "resnet50", {}, 16, (3, 224, 224), False, _TOO_LONG),
    # convert() on a torchvision MobileNetV2: ReLU6 pairs, inverted-residual ends, projection BatchNorms
    _TV_MOBILENET: ModelSpec(_TV_MOBILENET, {}, 16, (3, 224, 224), False, _TOO_LONG),
    "densenet_bc_100": ModelSpec("densenet_bc_100", {"num_classes": 10}, 64, _CIFAR, False, _TOO_LONG),
    "highway_mlp": ModelSpec("highway_mlp", _MLP, _highway.MLP_STEP["batch"], (_MLP["in_features"],), True),
    # The skip-connection variants on the block-end op (docs/design.md section 10).
    "resnet110_sd": ModelSpec("resnet110_sd", {"num_classes": 10}, 64, _CIFAR, False, _TOO_LONG),
    "pyramidnet110_a48": ModelSpec("pyramidnet110_a48", {"num_classes": 10}, 64, _CIFAR, False, _TOO_LONG),
    "shake_shake_26_2x32d": ModelSpec("shake_shake_26_2x32d", {"num_classes": 10}, 64, _CIFAR, False, _TOO_LONG),
}
_NO_ENTRY = "not measured (skipped: a model with no entry in fusedres.bench.models.MODELS is not compiled)"
CL = "@channels_last"  # a model name with this suffix: its row runs models and input in channels_last
# Convolutions on this CPU are ~1.5x faster in channels_last, where training is fast: the ResNets run both layouts.
DEFAULT_MODELS = (
    "resnet20",
    "resnet20" + CL,
    "resnet56",
    "resnet56" + CL,
    "resnet50",
    "resnet50" + CL,
    TIMM_PREFIX + "resnet50" + CL,
    TORCHVISION_PREFIX + "mobilenet_v2" + CL,
    "densenet_bc_100",
    "highway_mlp",
    "resnet110_sd" + CL,
    "pyramidnet110_a48" + CL,
    "shake_shake_26_2x32d" + CL,
)
QUICK_MODELS = ("resnet20", "resnet20" + CL, "highway_mlp")
# The implementations of a model row: torch.compile of the reference and of the fused model (the fused ops are
# registered with fake kernels, so Inductor compiles around them).
IMPLS = ("fused", "reference", "compiled", "compiled_fused")
RATIOS = (
    ("reference/fused", "reference", "fused"),
    ("compiled/fused", "compiled", "fused"),
    ("compiled/compiled_fused", "compiled", "compiled_fused"),
)
# --quick: smaller batches (the default highway MLP step alone is ~0.5 s on 2 cores).
_QUICK_BATCH = {
    "resnet20": 32,
    "resnet56": 32,
    "resnet50": 4,
    TIMM_PREFIX + "resnet50": 4,
    TORCHVISION_PREFIX + "mobilenet_v2": 4,
    "densenet_bc_100": 16,
    "highway_mlp": 64,
    "resnet110_sd": 16,
    "pyramidnet110_a48": 16,
    "shake_shake_26_2x32d": 16,
}
# FUSEDRES_BENCH_TINY=1 (the CLI's own test): tiny batches and images.
_TINY = {
    "resnet20": {"batch": 4, "input_shape": (3, 8, 8)},
    "resnet56": {"batch": 2, "input_shape": (3, 8, 8)},
    "resnet50": {"batch": 2, "input_shape": (3, 32, 32)},
    TIMM_PREFIX + "resnet50": {"batch": 2, "input_shape": (3, 32, 32)},
    TORCHVISION_PREFIX + "mobilenet_v2": {"batch": 2, "input_shape": (3, 32, 32)},
    "densenet_bc_100": {"batch": 2, "input_shape": (3, 8, 8)},
    "highway_mlp": {"batch": _highway.MLP_STEP_TINY["batch"], "input_shape": (_MLP_TINY["in_features"],)},
}

COMPILE_CACHE_NOTE = "Inductor's on-disk cache makes a rerun on the same machine faster than a cold compile"
OPTIMIZER = "SGD(lr=1e-3, no momentum), cross-entropy; step = zero_grad(set_to_none) + forward + backward + step"
LOSS_RTOL = 1e-3  # first-step losses of fused and reference (same weights, same batch) must agree to this


def spec_for(name: str, settings: harness.Settings) -> ModelSpec:
    """The configuration of model ``name`` (``NAME@channels_last``: in that layout) under --quick /
    FUSEDRES_BENCH_TINY (unknown names: CIFAR-sized)."""
    name, _, layout = name.partition("@")
    if layout not in ("", "contiguous", "channels_last"):
        raise ValueError(f"model layout must be @channels_last or @contiguous, got {name}@{layout}")
    spec = MODELS.get(name) or ModelSpec(name, {}, 32, _CIFAR, False, _NO_ENTRY)
    if layout:
        spec = spec.with_(memory_format=layout)
    if settings.tiny:
        tiny = _TINY.get(name, {"batch": 2, "input_shape": (3, 8, 8)})
        spec = spec.with_(**tiny)
        if name == "highway_mlp":
            spec = spec.with_(build_kwargs=_MLP_TINY)
    elif settings.quick and name in _QUICK_BATCH:
        spec = spec.with_(batch=_QUICK_BATCH[name])
    return spec


def _unavailable(name: str) -> str | None:
    from fusedres.models import list_models

    if name.startswith(TIMM_PREFIX):
        try:
            import timm
        except ImportError:
            return "not available: timm is not installed (pip install timm)"
        if not timm.is_model(name[len(TIMM_PREFIX) :]):
            return f"not available: timm has no model {name[len(TIMM_PREFIX) :]!r}"
        return None
    if name.startswith(TORCHVISION_PREFIX):
        try:
            import torchvision
        except ImportError:
            return "not available: torchvision is not installed"
        if name[len(TORCHVISION_PREFIX) :] not in torchvision.models.list_models():
            return f"not available: torchvision has no model {name[len(TORCHVISION_PREFIX) :]!r}"
        return None

    known = list_models()
    if name not in known:
        return f"not available: model {name!r} is not registered in fusedres.models (registered: {', '.join(known)})"
    return None


def _same_weights(spec: ModelSpec, device: str) -> dict[str, nn.Module]:
    """fused and reference models with the reference's weights, and the copy that torch.compile wraps."""
    torch.manual_seed(0)
    reference = build_model(spec.name, {"fused": False, **spec.build_kwargs})
    fused = build_model(spec.name, {"fused": True, **spec.build_kwargs})
    fused.load_state_dict(reference.state_dict())
    models = {
        "fused": fused,
        "reference": reference,
        "compiled": copy.deepcopy(reference),
        "compiled_fused": copy.deepcopy(fused),
    }
    fmt = torch.channels_last if spec.memory_format == "channels_last" else torch.contiguous_format
    return {k: m.to(device, memory_format=fmt) for k, m in models.items()}


def measure_model(spec: ModelSpec, settings: harness.Settings, memory: bool | str, progress: Any) -> dict[str, Any]:
    """One model row: step times, ratios, first-step losses and peak memory of fused and reference.

    Args:
        memory: True to measure the peak memory, else False or the reason it is skipped.
    """
    device = settings.device
    row: dict[str, Any] = {
        "op": "model_step",
        "model": spec.key,
        "model_name": spec.name,
        "build_kwargs": dict(spec.build_kwargs),
        "batch": spec.batch,
        "input_shape": list(spec.input_shape),
        "dtype": "float32",
        "memory_format": spec.memory_format,
        "optimizer": OPTIMIZER,
        "device": device,
        "rounds": 0,
        "compile_s": {"compiled": None, "compiled_fused": None},
        "null_reasons": {},
    }
    progress.step(f"{spec.name} batch {spec.batch} timing")
    reasons: dict[str, str] = {}
    fns: dict[str, Callable[[], object]] = {}
    losses: dict[str, float] = {}
    unavailable = _unavailable(spec.name)
    row["available"] = unavailable is None
    if unavailable is not None:
        reasons = dict.fromkeys(IMPLS, unavailable)
    else:
        reasons, fns, losses, row["compile_s"] = _prepare(spec, settings, row)
    fixed = 2 if settings.quick else 3
    if fns:
        # The first step (losses recorded, in _prepare) is the warm-up: a model step takes seconds on 2 cores.
        times, faults, rounds, other = harness.time_fns(fns, settings, reasons, fixed_rounds=fixed, untimed=0)
    else:
        times, faults, rounds, other = {}, {}, 0, None
    row["rounds"] = rounds
    for name in ("compiled", "compiled_fused"):
        if row["compile_s"][name] is None:
            row["null_reasons"][f"compile_s.{name}"] = reasons.get(name, "not compiled")
    harness.fill_figures(row, times, faults, reasons, None, None, impls=IMPLS, ratios=RATIOS)
    row["first_loss"] = {}
    for name in IMPLS:
        harness.set_figure(row, "first_loss", name, losses.get(name), reasons.get(name))
    if "fused" in losses and "reference" in losses:
        diff = abs(losses["fused"] - losses["reference"]) / max(abs(losses["reference"]), 1e-12)
        row["loss_rel_diff"] = diff
        row["losses_agree"] = diff <= LOSS_RTOL
    else:
        row["loss_rel_diff"] = row["losses_agree"] = None
        row["null_reasons"]["loss_rel_diff"] = row["null_reasons"]["losses_agree"] = "fused or reference not run"
    harness.set_load(row, other)
    if not fns:
        row["null_reasons"].update({f"load.{k}": "nothing was timed" for k in row["load"]})
    ran = set(fns)
    del fns
    gc.collect()

    row["memory"], row["peak_mb"] = {}, {}
    for name in IMPLS:
        if name in ("compiled", "compiled_fused"):
            reason = (
                "not measured: the memory workers run fused and reference only (compiling again in a fresh process "
                "costs the compile time once more; measure_peak_memory(..., compiled=True) does it)"
            )
            entry = None
        elif memory is not True:
            reason, entry = memory or "not measured (skipped: --no-memory)", None
        elif spec.memory_format != "contiguous":
            reason, entry = "not measured: the memory workers measure the contiguous row of each model", None
        elif name not in ran:
            reason, entry = reasons.get(name, "the training step did not run"), None
        else:
            progress.step(f"{spec.name} peak memory {name} (fresh process)")
            entry = measure_peak_memory(
                spec.name,
                {"fused": name == "fused", **spec.build_kwargs},
                spec.batch,
                spec.input_shape,
                steps=1,
                device=device,
                threads=torch.get_num_threads(),
            )
            reason = entry["null_reasons"].get("peak_mb")
        harness.set_figure(row, "memory", name, entry, reason)
        harness.set_figure(row, "peak_mb", name, entry and entry["peak_mb"], reason)
    row["memory_ratio"] = {}
    f, r = row["peak_mb"]["fused"], row["peak_mb"]["reference"]
    harness.set_figure(
        row,
        "memory_ratio",
        "reference/fused",
        r / f if f and r else None,
        row["null_reasons"].get("peak_mb.fused") or row["null_reasons"].get("peak_mb.reference") or "zero peak",
    )
    return row


def _prepare(
    spec: ModelSpec, settings: harness.Settings, row: dict[str, Any]
) -> tuple[dict[str, str], dict[str, Callable[[], object]], dict[str, float], float | None]:
    """Builds the three models, runs (and records the loss of) each one's first step; compiles where affordable.

    Returns:
        (reasons for what does not run, step functions of what does, first-step losses, compile seconds of
        "compiled" and "compiled_fused").
    """
    device = settings.device
    reasons: dict[str, str] = {}
    fns: dict[str, Callable[[], object]] = {}
    losses: dict[str, float] = {}
    compile_s: dict[str, float | None] = {"compiled": None, "compiled_fused": None}
    try:
        models = _same_weights(spec, device)
    except Exception as exc:  # noqa: BLE001 - reported in the row
        return dict.fromkeys(IMPLS, f"not available: building failed: {harness.error_text(exc)}"), {}, {}, compile_s
    x = make_batch(spec.batch, spec.input_shape, device)
    if spec.memory_format == "channels_last" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    fused_reason = harness.fused_unavailable(device, instead="fused=True would run the reference")
    if settings.quick:
        compile_reason = "not measured (skipped: --quick)"
    elif not spec.compile:
        compile_reason = spec.compile_skip.format(f"{torch.get_num_threads()} CPU threads")
    else:
        compile_reason = None
    for name in IMPLS:
        if name in ("fused", "compiled_fused") and fused_reason is not None:
            reasons[name] = fused_reason
            continue
        if name in ("compiled", "compiled_fused") and compile_reason is not None:
            reasons[name] = compile_reason
            continue
        forward = None
        if name in ("compiled", "compiled_fused"):
            torch._dynamo.reset()
            forward = torch.compile(models[name], dynamic=False, fullgraph=True)
        step = make_train_step(models[name], x, forward=forward)
        try:
            t0 = time.perf_counter()
            losses[name] = float(step())
            harness.sync(device)
            if name in compile_s:
                compile_s[name] = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001
            verb = "torch.compile failed" if name in compile_s else "the training step failed"
            reasons[name] = f"{verb}: {harness.error_text(exc)}"
            continue
        fns[name] = step
    return reasons, fns, losses, compile_s


def run(settings: harness.Settings, names: Sequence[str] | None = None, memory: bool = True) -> dict[str, Any]:
    """All model rows (progress on stderr): {"rows", "method", "wall_s"} (the --json report's "models")."""
    if names is None:
        names = QUICK_MODELS if settings.quick else DEFAULT_MODELS
    specs = [spec_for(n, settings) for n in names]
    # --quick: the memory workers (a fresh process each, seconds of start-up) only for the first model.
    measured = [memory and (i == 0 or not settings.quick) for i in range(len(specs))]
    t0 = time.perf_counter()
    progress = harness.Progress(total=len(specs) + 2 * sum(measured), desc="models")
    rows = []
    quick_skip = f"not measured (skipped: --quick measures the peak memory of {names[0] if names else '-'} only)"
    try:
        for spec, measure in zip(specs, measured):
            rows.append(measure_model(spec, settings, True if measure else memory and quick_skip, progress))
    finally:
        progress.close()
    return {
        "rows": rows,
        "method": {
            "timing": harness.TIMING_METHOD + "; models: the first step of each is the untimed warm-up (its loss "
            "recorded), then 2 (--quick) or 3 rounds unless --repeat",
            "step": OPTIMIZER,
            "compile_s": f"seconds of the first compiled step, compilation included; {COMPILE_CACHE_NOTE}",
            "memory": MEMORY_METHOD,
            "allocator": harness.describe_allocator(harness.allocator_setting(settings.default_allocator)),
        },
        "wall_s": time.perf_counter() - t0,
    }


TITLE = (
    "models: one training step (SGD), float32, fused vs reference vs torch.compile(reference) vs "
    "torch.compile(fused model) (c(fused)); NCHW and channels_last; peak memory"
)
COLUMNS = (
    Column(
        "model",
        lambda row: row["model_name"] if row["available"] else f"{row['model_name']} (not available)",
        left=True,
    ),
    Column("layout", lambda row: "nchw" if row["memory_format"] == "contiguous" else row["memory_format"], left=True),
    Column("batch", lambda row: str(row["batch"])),
    Column("input", lambda row: "x".join(map(str, row["input_shape"])), left=True),
    table.ms("fused ms", "fused"),
    table.ms("ref ms", "reference"),
    table.ms("compile ms", "compiled"),
    table.ms("c(fused) ms", "compiled_fused"),
    table.ratio("ref/fused [IQR]", "reference/fused"),
    table.ratio("compile/fused [IQR]", "compiled/fused"),
    table.ratio("compile/c(fused) [IQR]", "compiled/compiled_fused"),
    Column("peak MB fused", lambda row: table.fmt_mb(row["peak_mb"]["fused"])),
    Column("peak MB ref", lambda row: table.fmt_mb(row["peak_mb"]["reference"])),
    Column("ref/fused mem", lambda row: "-" if (m := row["memory_ratio"]["reference/fused"]) is None else f"{m:.2f}x"),
    Column("rounds", lambda row: str(row["rounds"])),
    table.OTHER_CPU,
)


def notes(result: dict[str, Any]) -> list[str]:
    """How the model rows were measured, and the warnings their figures call for."""
    rows = result["rows"]
    lines = [
        f"step: {OPTIMIZER}; same weights and batch for every implementation.",
        "Times: medians in ms over alternating rounds; ratios: median of per-round ratios [IQR]; >1: fused faster.",
        f"peak MB: {MEMORY_METHOD}.",
        f"Allocator: {result['method']['allocator']}.",
    ]
    disturbed = [r["model"] for r in rows if max(r["load"]["other_cpu_pct"] or 0, r["load"]["steal_cpu_pct"] or 0) > 5]
    if disturbed:
        lines.append(
            f"WARNING: other processes used more than 5% of the CPUs while {', '.join(disturbed)} were timed: "
            "those figures are disturbed; rerun on a quiet machine."
        )
    compiled = [
        f"{r['model']} {name} {r['compile_s'][name]:.1f} s"
        for r in rows
        for name in ("compiled", "compiled_fused")
        if r["compile_s"][name] is not None
    ]
    if compiled:
        note = f"first compiled step (compilation included; {COMPILE_CACHE_NOTE})"
        lines.append(f"torch.compile: {note}: {', '.join(compiled)}.")
    for row in rows:
        if row["losses_agree"] is False:
            lines.append(
                f"WARNING: {row['model']}: first-step losses of fused and reference differ by "
                f"{row['loss_rel_diff']:.2e} (relative; expected <= {LOSS_RTOL:g})"
            )
    return lines
