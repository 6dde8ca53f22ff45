"""``flexemr`` command line (the ``flexemr`` script, ``python -m flexemr``): the entry point.

The commands are the applications' (:data:`flexemr.apps.cli.COMMANDS`: serve,
health, demo, rank, gen), the benchmarks' (:data:`flexemr.bench.__main__.CLI_COMMANDS`:
bench, soak) and Ray's (``flexemr ray``: :mod:`flexemr.ray._cli`, which imports Ray
only when it runs); parsing, signals and error lines are :mod:`flexemr.apps.cli`'s.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .apps import cli
from .bench.__main__ import CLI_COMMANDS
from .ray._cli import CLI_COMMANDS as RAY_COMMANDS

__all__ = ["COMMANDS", "build_parser", "main"]

#: Every subcommand of ``flexemr``: name -> :class:`flexemr.apps.cli.Command`.
COMMANDS: dict[str, cli.Command] = {**cli.COMMANDS, **CLI_COMMANDS, **RAY_COMMANDS}


def build_parser() -> argparse.ArgumentParser:
    """The ``flexemr`` argument parser (one sub-parser per entry of :data:`COMMANDS`)."""
    return cli.build_parser(COMMANDS)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``flexemr`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code (:func:`flexemr.apps.cli.main`)."""
    return cli.main(argv, COMMANDS)


if __name__ == "__main__":
    sys.exit(main())
