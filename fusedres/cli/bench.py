"""``python -m fusedres bench``: the fused ops and models against eager PyTorch and torch.compile, time and memory.

The report: machine facts (CPU/GPU, torch, threads, allocator, measured copy bandwidth, a noise check), then one
table per op section (fusedres/bench/sections.py: bn_act, highway, dense concat, block ends of
the skip-connection variants, per-call overhead; a section whose
module is missing is reported as not available), then the model rows (fusedres/bench/models.py: training-step time
of resnet20/56/50, densenet_bc_100 and the highway MLP, fused vs reference vs torch.compile, and the peak memory of a
step measured in a fresh process per configuration). Each section prints how its figures (GB/s, saved bytes, ...) are
counted.
``--json PATH`` writes every figure with its configuration and method (a figure that could not be measured is null,
with its reason in ``null_reasons``); ``--plot PATH`` a PNG (fusedres/bench/plot.py); ``--only ops|models`` and
``--models a,b`` select; progress goes to stderr (a bar on a terminal, one line per step otherwise).

How (CONVENTIONS.md, Benchmarks; docs/design.md section 9): every implementation is warmed up, then each round times
every implementation once, rotating which goes first; times are medians over rounds and a ratio is the median of the
per-round ratios, with its inter-quartile range as the spread. A noise check measures two identical functions the same
way first (it should read 1.00x +- 0.1).

Page faults decide naive measurements on large tensors (docs/design.md section 6), so ``bench`` re-executes itself with
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000`` unless they are set already or ``--default-allocator``
is given; the setting in force is printed and recorded, with the minor page faults per call of each side.
"""

from __future__ import annotations

import argparse
import os

import torch

from fusedres.bench.harness import ALLOCATOR_ENV, Settings
from fusedres.bench.report import run_report

__all__ = ["HELP", "add_arguments", "main", "settings_from_args"]

HELP = "fused vs eager vs torch.compile timing report"


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


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The Settings of the parsed options (FUSEDRES_BENCH_TINY=1 in the environment: tiny shapes and models)."""
    quick = bool(args.quick)
    budget = args.budget if args.budget is not None else (0.3 if quick else 1.0)
    lo, hi = (5, 15) if quick else (7, 30)
    tiny = os.environ.get("FUSEDRES_BENCH_TINY", "0") == "1"
    return Settings(args.device, quick, tiny, args.repeat, budget, lo, hi, bool(args.default_allocator))


def main(args: argparse.Namespace) -> int:
    """Runs the benchmark and prints (and optionally writes) the report."""
    if args.repeat is not None and args.repeat < 1:
        raise SystemExit(f"--repeat must be a positive integer, got {args.repeat}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    names = None if args.models is None else [n.strip() for n in args.models.split(",") if n.strip()]
    run_report(
        settings_from_args(args),
        only=args.only,
        model_names=names,
        memory=not args.no_memory,
        json_path=args.json,
        plot_path=args.plot,
    )
    return 0
