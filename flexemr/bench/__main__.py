"""``python -m flexemr.bench <command> [options]`` — see :mod:`flexemr.bench`.

Subcommands are a table (:data:`COMMANDS`): name -> :class:`BenchCommand`
(help text, argument set-up, runner returning the exit code).  Add one with::

    COMMANDS["locality"] = BenchCommand("...", _locality.configure, _locality.main)

:data:`CLI_COMMANDS` are the benchmarks' entries of the ``flexemr`` command
line (``flexemr bench ...``, ``flexemr soak ...``; ``flexemr/__main__.py``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..apps.cli import Command
from ..apps.cli import main as flexemr_main
from ..apps.cli_support import ArgumentParser
from ..apps.progress import Bars
from ..apps.progress import add_option as add_progress_option
from . import _compare, _criteo, _kernel, _locality, _lookup, _predict, _priority, _serverpool, _skew, _soak, _swapin

__all__ = ["CLI_COMMANDS", "COMMANDS", "BenchCommand", "main"]


@dataclass(frozen=True)
class BenchCommand:
    """One benchmark: help text, argument set-up, runner (returns the exit code)."""

    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    #: it draws its own progress bars (else: a bar saying how long it has been running)
    own_progress: bool = False


#: Benchmarks: name -> :class:`BenchCommand`.
COMMANDS: dict[str, BenchCommand] = {
    "lookup": BenchCommand(_lookup.HELP, _lookup.configure, _lookup.main),
    "locality": BenchCommand(_locality.HELP, _locality.configure, _locality.main),
    "compare": BenchCommand(_compare.HELP, _compare.configure, _compare.main),
    "soak": BenchCommand(_soak.HELP, _soak.configure, _soak.main),
    "kernel": BenchCommand(_kernel.HELP, _kernel.configure, _kernel.main),
    "serverpool": BenchCommand(_serverpool.HELP, _serverpool.configure, _serverpool.main),
    "skew": BenchCommand(_skew.HELP, _skew.configure, _skew.main),
    "priority": BenchCommand(_priority.HELP, _priority.configure, _priority.main),
    "swapin": BenchCommand(_swapin.HELP, _swapin.configure, _swapin.main),
    "predict": BenchCommand(_predict.HELP, _predict.configure, _predict.main),
    "criteo": BenchCommand(_criteo.HELP, _criteo.configure, _criteo.main, own_progress=True),
}


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m flexemr.bench") -> int:
    """Parse ``argv`` and run the chosen benchmark (errors: one line, exit code 1)."""
    parser = ArgumentParser(prog=prog, description="FlexEMR benchmarks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.configure(p)
        if not cmd.own_progress:
            add_progress_option(p)
    args = parser.parse_args(argv)
    cmd = COMMANDS[args.command]
    if cmd.own_progress:
        return cmd.run(args)
    with Bars.from_args(args).ticker(f"{prog} {args.command}"):
        return cmd.run(args)


# ------------------------------------------------ entries of the flexemr command line


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("argv", nargs=argparse.REMAINDER, help="python -m flexemr.bench arguments (default: compare)")
    p.prefix_chars = "\0"  # hand every argument, options and -h included, to flexemr.bench's own parser


def _bench_main(args: argparse.Namespace) -> int:
    argv = list(args.argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv.insert(0, "compare")  # `flexemr bench --json` is `flexemr bench compare --json`
    return main(argv, prog="flexemr bench")


#: ``flexemr bench`` and ``flexemr soak``: name -> :class:`flexemr.apps.cli.Command`.
CLI_COMMANDS: dict[str, Command] = {
    "bench": Command("benchmarks (python -m flexemr.bench); default: compare, side by side with peers",
                     _bench_args, _bench_main),
    "soak": Command("reliability soak: lookups and updates while servers are killed (= flexemr bench soak)",
                    _soak.configure, _soak.main),
}


def _cli() -> int:
    """``python -m flexemr.bench ...``: ``flexemr bench ...`` (the same parsing and one-line errors)."""
    return flexemr_main(["bench", *sys.argv[1:]], CLI_COMMANDS)


if __name__ == "__main__":
    sys.exit(_cli())
