"""The classic skip-connection experiments behind ``python -m fusedres experiment NAME`` (its options:
fusedres/cli/experiment.py): EXPERIMENTS maps each name to its module (``configure``, ``run``, ``tables``, ``plot``
and its own ``add_arguments``); :func:`run_experiment` runs one, prints its tables, writes its JSON and plot.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import platform
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from fusedres.experiments import degradation, gradient_flow, highway_gates, identity, variants
from fusedres.experiments._output import write_json
from fusedres.experiments._setup import add_common_arguments, implementations

__all__ = ["EXPERIMENTS", "SCHEMA_VERSION", "add_common_arguments", "run_experiment"]

SCHEMA_VERSION = 1
EXPERIMENTS: dict[str, ModuleType] = {
    module.NAME: module for module in (gradient_flow, degradation, identity, highway_gates, variants)
}


def _finite(value: Any) -> Any:
    """value with every NaN / infinity replaced by None (JSON has no spelling for them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def run_experiment(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the experiment ``args`` names, prints its tables, writes its JSON file and plot.

    Returns:
        The payload written as JSON: experiment, schema_version, seed, implementations, config, results,
        agreement (fused vs reference, or None), timing (variants only, else None), environment, files.
    """
    module = EXPERIMENTS[args.experiment]
    try:
        config = module.configure(args)
    except ValueError as e:
        raise SystemExit(f"python -m fusedres experiment {module.NAME}: {e}") from e
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"--threads must be a positive integer, got {args.threads}")
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _run(module, config, args)
    finally:  # an in-process caller (the tests) keeps its own thread count
        torch.set_num_threads(threads)


def _run(module: ModuleType, config: Any, args: argparse.Namespace) -> dict[str, Any]:
    impls = implementations(args)
    out = Path(args.out)
    files = {"json": str(out / f"{module.NAME}.json"), "png": None if args.no_plot else str(out / f"{module.NAME}.png")}
    print(
        f"fusedres experiment {module.NAME}: {' and '.join(impls)} models, seed {args.seed}, "
        f"torch threads {torch.get_num_threads()}, {', '.join(f'{k} {v}' for k, v in dataclasses.asdict(config).items())}",
        flush=True,
    )
    try:
        measured = module.run(config, impls, args.seed, not args.quiet)
    except (ModuleNotFoundError, ValueError) as e:
        raise SystemExit(f"python -m fusedres experiment {module.NAME}: {e}") from e
    payload: dict[str, Any] = {
        "experiment": module.NAME,
        "schema_version": SCHEMA_VERSION,
        "seed": args.seed,
        "implementations": list(impls),
        "config": dataclasses.asdict(config),
        "results": measured["results"],
        "agreement": measured.get("agreement"),
        "timing": measured.get("timing"),
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(),
            "isa": torch.backends.cpu.get_cpu_capability(),
        },
        "files": files,
    }
    for table in module.tables(payload):
        print()
        print(table.as_markdown() if args.markdown else table.render(), flush=True)
    write_json(Path(files["json"]), _finite(payload))
    print(f"\nwrote {files['json']}", flush=True)
    if files["png"] is not None:
        try:
            module.plot(payload, Path(files["png"]))
        except ModuleNotFoundError as e:
            raise SystemExit(f"python -m fusedres experiment {module.NAME}: {e}") from e
        print(f"wrote {files['png']}", flush=True)
    return payload
