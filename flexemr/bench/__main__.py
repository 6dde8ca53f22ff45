"""``python -m flexemr.bench <command> [options]`` — see :mod:`flexemr.bench`.

Subcommands are a table (:data:`COMMANDS`): name -> :class:`BenchCommand`
(help text, argument set-up, runner returning the exit code).  Add one with::

    COMMANDS["locality"] = BenchCommand("...", _locality.configure, _locality.main)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import _compare, _kernel, _locality, _lookup

__all__ = ["COMMANDS", "BenchCommand", "main"]


@dataclass(frozen=True)
class BenchCommand:
    """One benchmark: help text, argument set-up, runner (returns the exit code)."""

    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


#: Benchmarks: name -> :class:`BenchCommand`.
COMMANDS: dict[str, BenchCommand] = {
    "lookup": BenchCommand(_lookup.HELP, _lookup.configure, _lookup.main),
    "locality": BenchCommand(_locality.HELP, _locality.configure, _locality.main),
    "compare": BenchCommand(_compare.HELP, _compare.configure, _compare.main),
    "kernel": BenchCommand(_kernel.HELP, _kernel.configure, _kernel.main),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen benchmark."""
    parser = argparse.ArgumentParser(prog="python -m flexemr.bench", description="FlexEMR benchmarks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cmd in COMMANDS.items():
        cmd.configure(sub.add_parser(name, help=cmd.help, description=cmd.help))
    args = parser.parse_args(argv)
    return COMMANDS[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
