"""The command line: ``python -m fusedres {bench,train,experiment,info}``, one module per command.

Each command module has ``HELP`` (its line in the command list), its docstring (its ``--help`` description),
``add_arguments(parser)`` and ``main(args) -> exit status``; it parses and checks options only and calls down into
fusedres.bench, fusedres.training or fusedres.experiments.
"""

from __future__ import annotations

import argparse

from fusedres.cli import bench, experiment, info, train

__all__ = ["COMMANDS", "main"]

COMMANDS = {"bench": bench, "train": train, "experiment": experiment, "info": info}


def main(argv: list[str] | None = None) -> int:
    """Parses ``argv`` (default: sys.argv[1:]) and runs the command it names; its exit status."""
    parser = argparse.ArgumentParser(prog="python -m fusedres", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    for name, module in COMMANDS.items():
        module.add_arguments(
            sub.add_parser(
                name,
                help=module.HELP,
                description=module.__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter,
            )
        )
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return COMMANDS[args.command].main(args)
