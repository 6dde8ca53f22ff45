"""Command-line options from a benchmark's config dataclass (one flag per field).

>>> import argparse
>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class Cfg:
...     rows: int = 10
...     naive_ids: int = 5
...     redis: bool = True
>>> p = argparse.ArgumentParser()
>>> add_config_arguments(p, Cfg(), {"rows": "rows per table", "redis": "skip the Redis peer"})
>>> config_from_args(Cfg, p.parse_args(["--rows", "7", "--no-redis"]))
Cfg(rows=7, naive_ids=5, redis=False)
>>> config_from_args(Cfg, p.parse_args(["--rows", "0"]))
Traceback (most recent call last):
    ...
flexemr.core.errors.ConfigError: --rows must be >= 1, got 0
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import fields
from typing import TYPE_CHECKING, Any, TypeVar

from ..apps.cli_support import check_range

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

C = TypeVar("C", bound="DataclassInstance")

#: ``--transport`` choices of every benchmark.
TRANSPORTS = ["auto", "tcp", "verbs"]

#: Help of the fields the benchmarks share (a benchmark may say more with its own ``helps``).
COMMON_HELPS: dict[str, str] = {
    "tables": "embedding tables",
    "rows": "rows per table",
    "dim": "embedding dimension",
    "batch": "samples per batch",
    "pooling": "mean ids per sample and table",
    "warmup": "warm-up batches per path (untimed)",
    "batches": "timed batches per path",
    "naive_ids": "ids timed on the naive path (one read per id), extrapolated",
    "servers": "embedding server processes",
    "transport": "rdmaio transport (auto: verbs when an RDMA device is up, else tcp)",
    "seed": "seed of the tables and the requests",
    "seconds": "how long to run, in seconds",
}

#: Integer fields that may be 0 (every other integer field must be >= 1; floats must be > 0).
ZERO_OK = frozenset({"warmup", "cache_mb", "seed"})


def add_config_arguments(p: argparse.ArgumentParser, defaults: Any, helps: Mapping[str, str] | None = None) -> None:
    """``--field-name VALUE`` per field of the dataclass instance ``defaults`` (its values and types),
    with help from ``helps`` or :data:`COMMON_HELPS` and the default; ``--no-field-name`` for a bool
    field that defaults to true; ``transport`` takes :data:`TRANSPORTS`."""
    helps = {**COMMON_HELPS, **(helps or {})}
    for f in fields(defaults):
        value = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        text = helps.get(f.name)
        if text is None:
            raise ValueError(f"benchmark option {flag} has no help text")
        if isinstance(value, bool):
            p.add_argument("--no-" + flag[2:], dest=f.name, action="store_false", help=text)
        else:
            shown = f"{value:,}" if isinstance(value, int) else f"{value:g}" if isinstance(value, float) else value
            p.add_argument(flag, type=type(value), default=value, help=f"{text} (default {shown})",
                           choices=TRANSPORTS if f.name == "transport" else None)


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    """The dataclass ``cls`` built from the options :func:`add_config_arguments` added; numeric
    options are checked first (:data:`ZERO_OK`; a :class:`~flexemr.ConfigError` names the option)."""
    for f in fields(cls):
        value = getattr(args, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float):
            check_range(flag, value, above=0)
        else:
            check_range(flag, value, 0 if f.name in ZERO_OK else 1)
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})
