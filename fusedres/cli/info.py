"""``python -m fusedres info``: what this build of fusedres can do (versions, native module, CUDA, ISA, threads)."""

from __future__ import annotations

import argparse
import json
import platform

import torch

import fusedres

__all__ = ["HELP", "add_arguments", "main"]

HELP = "what this build of fusedres can do"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``info`` takes no options."""


def main(args: argparse.Namespace) -> int:
    """Prints one aligned ``key  value`` line per fact of fusedres.info() and the interpreter."""
    facts = {
        "fusedres_version": getattr(fusedres, "__version__", None),
        **fusedres.info(),
        "python": platform.python_version(),
        "isa": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
    }
    width = max(map(len, facts))
    for key, value in facts.items():
        print(f"{key.ljust(width)}  {json.dumps(value) if not isinstance(value, str) else value}")
    return 0
