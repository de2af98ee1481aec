"""The report of ``python -m fusedres bench``: runs the op sections of the registry and the model rows, prints every
table through the one renderer with its method text, and writes the same figures and method text to --json.

Layers: this module calls the sections (fusedres.bench.sections.OP_SECTIONS, imported by name) and the model rows
(fusedres.bench.models); they call the harness (fusedres.bench.harness) and the renderer (fusedres.bench.table).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import sys
import textwrap
import time
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch

from fusedres.bench import bn_act, harness
from fusedres.bench.sections import OP_SECTIONS, OpSection
from fusedres.bench.table import render_table

__all__ = [
    "SCHEMA",
    "describe_sections",
    "load_section",
    "not_measured",
    "print_header",
    "print_section",
    "run_op_sections",
    "run_report",
]

# 3: every op section's method text under method.<section>, its configuration under settings.op_sections.<section>,
# other_load_pct over the rows of every op section.
SCHEMA = "fusedres-bench/3"
LEGEND = (
    "Times: medians in ms. Ratios: median of per-round ratios [inter-quartile range]; >1 means fused is faster. "
    "f/r/c = fused/reference/compiled. faults/call: minor page faults per call. other CPU: CPU time of other "
    "processes during the row's timing (/proc/stat busy minus this process), in % of all cores; it should read ~0%: "
    "a competing process makes the two OpenMP threads wait for each other across scheduler quanta."
)


def print_header(machine: dict[str, Any], copy: dict[str, Any], noise: dict[str, Any]) -> None:
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
    print(f"  allocator  {harness.describe_allocator(machine['allocator'])}")
    print(
        f"  copy       {copy['gbps']:.1f} GB/s (dst.copy_(src), 256 MB float32, 2*bytes/median of {copy['samples']}; "
        f"range {copy['gbps_min']:.1f}-{copy['gbps_max']:.1f})"
    )
    flag = "" if noise["ok"] else "  WARNING: outside 1.00 +- 0.1, the machine is noisy: distrust small ratios"
    print(
        f"  noise      noise check: {noise['median']:.2f}x [IQR {noise['q25']:.2f}-{noise['q75']:.2f}, "
        f"range {noise['min']:.2f}-{noise['max']:.2f}] identical functions, {noise['rounds']} rounds{flag}"
    )
    print(textwrap.fill(LEGEND, width=118, initial_indent="  legend     ", subsequent_indent=" " * 13))
    sys.stdout.flush()


def not_measured(rows: Sequence[dict[str, Any]], prefixes: tuple[str, ...], label: str | None = None) -> list[str]:
    """One line per distinct (figure, reason) of the rows' null figures under ``prefixes``, with the number of rows
    (or, given ``label``, the rows' ``row[label]``) it holds for; nulls by design (NOTHING_SAVED) are left out."""
    seen: dict[str, list[str]] = {}
    for row in rows:
        for key, reason in row["null_reasons"].items():
            if key.startswith(prefixes) and reason != harness.NOTHING_SAVED:
                figure = key if label else key.split(".", 1)[1]
                seen.setdefault(f"{figure}: {reason}", []).append(str(row[label]) if label else "")
    if not seen:
        return []
    return ["Not measured:"] + [
        f"  {text} ({', '.join(who) if label else f'{len(who)} rows'})" for text, who in seen.items()
    ]


def print_section(title: str, table: str, lines: Sequence[str]) -> None:
    """A section of the report: its title, its table, then its lines (notes, method, load, what is missing)."""
    print(title)
    print(table)
    for line in lines:
        print(line)
    sys.stdout.flush()


def _load_line(load: dict[str, float] | None) -> list[str]:
    if load is None:
        return []
    return [
        f"Other processes used {load['other']:.0f}% of the CPUs while rows were timed (steal "
        f"{load['steal']:.0f}%); rows above 5%: {load['disturbed_rows']}"
        + ("  WARNING: those figures are disturbed; rerun on a quiet machine." if load["disturbed_rows"] else ".")
    ]


def _method_line(key: str, text: str, copy_gbps: float) -> str:
    """One entry of a section's METHOD under its table (GB/s also says what %copy divides by)."""
    if key == "gbps":
        return f"GB/s: {text}; %copy = fused GB/s / measured copy bandwidth ({copy_gbps:.1f} GB/s)."
    return f"{'saved MB' if key == 'saved_bytes' else key}: {text}."


def _print_op_section(module: ModuleType, rows: list[dict[str, Any]], settings: harness.Settings, copy_gbps: float):
    lines = [
        *module.notes(rows),
        *(_method_line(key, text, copy_gbps) for key, text in module.METHOD.items()),
        *_load_line(harness.overall_load(rows)),
        *not_measured(rows, ("times_ms.", "saved_bytes.")),
    ]
    if settings.tiny:
        lines.append("(FUSEDRES_BENCH_TINY=1: tiny shapes)")
    print_section(module.TITLE, render_table(module.COLUMNS, rows), lines)


def load_section(section: OpSection) -> ModuleType:
    """The module of ``section``; ModuleNotFoundError naming it when this build has no such module."""
    if importlib.util.find_spec(section.module) is None:
        raise ModuleNotFoundError(f"{section.module} does not exist in this build")
    return importlib.import_module(section.module)


def describe_sections(
    settings: harness.Settings, sections: Sequence[OpSection] = OP_SECTIONS
) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, Any]]]:
    """(each section's METHOD, each section's configuration under ``settings``), of the sections that load."""
    methods: dict[str, dict[str, str]] = {}
    configurations: dict[str, dict[str, Any]] = {}
    for section in sections:
        try:
            module = load_section(section)
        except Exception:  # noqa: BLE001 - run_op_sections reports why the section is not available
            module = None
        if module is not None:
            methods[section.name] = dict(module.METHOD)
            configurations[section.name] = module.configuration(settings)
    return methods, configurations


def run_op_sections(
    settings: harness.Settings, copy_gbps: float, sections: Sequence[OpSection] = OP_SECTIONS
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Runs and prints every op section in turn.

    Returns:
        (the rows of each section (None where it did not run), per section: available, reason (None when it ran),
        wall_s).
    """
    entries: dict[str, Any] = {}
    status: dict[str, dict[str, Any]] = {}
    for section in sections:
        t0 = time.perf_counter()
        reason = None
        try:
            module = load_section(section)
        except Exception as exc:  # noqa: BLE001 - a missing or broken section is reported, the others still run
            reason = f"not available: {harness.error_text(exc)}"
        if reason is None:
            try:
                rows = module.run(settings, copy_gbps)
            except Exception as exc:  # noqa: BLE001
                reason = f"failed: {harness.error_text(exc)}"
        print()
        if reason is not None:
            entries[section.name] = None
            print(f"{section.name}: {reason}")
        else:
            entries[section.name] = rows
            _print_op_section(module, rows, settings, copy_gbps)
        sys.stdout.flush()
        status[section.name] = {"available": reason is None, "reason": reason, "wall_s": time.perf_counter() - t0}
    return entries, status


def run_report(
    settings: harness.Settings,
    *,
    only: str | None = None,
    model_names: Sequence[str] | None = None,
    memory: bool = True,
    json_path: str | None = None,
    plot_path: str | None = None,
) -> dict[str, Any]:
    """Measures what ``only`` selects ("ops", "models" or None: both), prints the report, writes --json / --plot.

    First re-executes the process with harness.ALLOCATOR_ENV unless ``settings.default_allocator`` (or it is set).

    Returns:
        The report (what --json writes).
    """
    plot = None
    if plot_path:
        # Fails now, not after minutes of measuring, when matplotlib is missing.
        from fusedres.bench import plot as _plot

        plot = _plot.require_matplotlib()
    harness.reexec_with_allocator(settings.default_allocator)
    t_start = time.perf_counter()
    torch.manual_seed(0)

    machine = harness.machine_info(settings.device, settings.default_allocator)
    copy = harness.copy_bandwidth(settings.device)
    noise = bn_act.noise_check(settings)
    print_header(machine, copy, noise)

    entries: dict[str, Any] = {}
    null_reasons: dict[str, str] = {}
    sections: dict[str, dict[str, Any]] = {}
    methods, configurations = describe_sections(settings)
    other_load = None
    if only in (None, "ops"):
        entries, sections = run_op_sections(settings, copy["gbps"])
        null_reasons.update({name: s["reason"] for name, s in sections.items() if not s["available"]})
        other_load = harness.overall_load(row for rows in entries.values() if rows for row in rows)
        if other_load is None:
            null_reasons["other_load_pct"] = "/proc/stat not readable"
    else:
        null_reasons.update(dict.fromkeys((s.name for s in OP_SECTIONS), "not measured (skipped: --only models)"))
        null_reasons["other_load_pct"] = "not measured (skipped: --only models)"
    if only in (None, "models"):
        from fusedres.bench import models as _models

        models = _models.run(settings, names=model_names, memory=memory)
        print()
        lines = [*_models.notes(models), *not_measured(models["rows"], ("times_ms.", "peak_mb."), label="model")]
        print_section(_models.TITLE, render_table(_models.COLUMNS, models["rows"]), lines)
    else:
        models = None
        null_reasons["models"] = "not measured (skipped: --only ops)"
    wall = time.perf_counter() - t_start
    print(f"wall time {wall:.0f} s")
    sys.stdout.flush()

    report = {
        "schema": SCHEMA,
        "argv": list(getattr(sys, "orig_argv", sys.argv)),
        "settings": {
            **dataclasses.asdict(settings),
            "dtype": "float32",
            "only": only,
            "memory": memory,
            "op_sections": configurations,
        },
        "machine": machine,
        "copy_bandwidth": copy,
        "noise_check": noise,
        "method": {"timing": harness.TIMING_METHOD, **methods},
        "sections": sections,
        **entries,
        "other_load_pct": other_load,
        "models": models,
        "null_reasons": null_reasons,
        "wall_s": wall,
    }
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {json_path}")
    if plot is not None:
        plot(report, plot_path)
        print(f"wrote {plot_path}")
    return report
