"""``python -m fusedres bench [...]`` (fusedres/bench.py), ``train [...]`` (fusedres/train.py), ``experiment NAME
[...]`` (fusedres/experiments/) and ``info``."""

from __future__ import annotations

import argparse
import json
import sys


def _info() -> int:
    import platform

    import torch

    import fusedres

    facts = fusedres.info() if hasattr(fusedres, "info") else {"torch_version": torch.__version__}
    facts = {
        "fusedres_version": getattr(fusedres, "__version__", None),
        **facts,
        "python": platform.python_version(),
        "isa": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
    }
    width = max(map(len, facts))
    for key, value in facts.items():
        print(f"{key.ljust(width)}  {json.dumps(value) if not isinstance(value, str) else value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedres", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="{bench,train,experiment,info}")
    from fusedres import bench

    bench.add_arguments(
        sub.add_parser(
            "bench",
            help="fused vs eager vs torch.compile timing report",
            description=bench.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    from fusedres import train

    train.add_arguments(
        sub.add_parser(
            "train",
            help="train a model (fused, reference or both side by side) on digits or CIFAR-10",
            description=train.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    from fusedres import experiments

    experiments.add_arguments(
        sub.add_parser(
            "experiment",
            help="the classic skip-connection experiments on the fused models: tables, JSON and plots",
            description=experiments.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    sub.add_parser("info", help="what this build of fusedres can do")
    args = parser.parse_args(argv)
    if args.command == "bench":
        return bench.main(args)
    if args.command == "train":
        return train.main(args)
    if args.command == "experiment":
        return experiments.main(args)
    if args.command == "info":
        return _info()
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
