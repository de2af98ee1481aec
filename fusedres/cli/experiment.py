"""``python -m fusedres experiment NAME``: the classic skip-connection experiments on the fused models.

    python -m fusedres experiment gradient-flow            # plain vs residual gradient norms, depths 5-100
    python -m fusedres experiment degradation               # He et al.'s Figure 1: plain-20/56 vs ResNet-20/56
    python -m fusedres experiment identity                  # how fast plain / residual stacks learn f(x) = x
    python -m fusedres experiment highway-gates             # transform-gate activity of a trained highway MLP
    python -m fusedres experiment variants                  # residual / dense / highway blocks; every model
    python -m fusedres experiment NAME --reference          # the same on the pure-PyTorch reference models
    python -m fusedres experiment NAME --compare --out DIR  # both, same weights and data; files in DIR

Each prints its table(s) and writes ``DIR/NAME.json`` (configuration, every measured number) and
``DIR/NAME.png`` (the plot). Data: scikit-learn's digits (offline) or synthetic; nothing is downloaded.
Deterministic: the same ``--seed`` gives the same numbers (timings aside), fused and reference start from the
same weights. ``python -m fusedres experiment NAME --help`` lists an experiment's sizes and their defaults.
"""

from __future__ import annotations

import argparse

from fusedres.experiments import EXPERIMENTS, add_common_arguments, run_experiment

__all__ = ["HELP", "add_arguments", "main"]

HELP = "the classic skip-connection experiments on the fused models: tables, JSON and plots"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One sub-command per experiment, each with the common options and its own sizes."""
    sub = parser.add_subparsers(dest="experiment", metavar="{" + ",".join(EXPERIMENTS) + "}", required=True)
    for name, module in EXPERIMENTS.items():
        p = sub.add_parser(
            name,
            help=module.SUMMARY,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        add_common_arguments(p, module.DEFAULT_IMPLEMENTATIONS)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``python -m fusedres experiment`` (parsed options of :func:`add_arguments`)."""
    run_experiment(args)
    return 0
