"""Command-line options from a benchmark's config dataclass (one flag per field).

>>> import argparse
>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class Cfg:
...     rows: int = 10
...     naive_ids: int = 5
...     redis: bool = True
>>> p = argparse.ArgumentParser()
>>> add_config_arguments(p, Cfg(), {"rows": "rows per table"})
>>> config_from_args(Cfg, p.parse_args(["--rows", "7", "--no-redis"]))
Cfg(rows=7, naive_ids=5, redis=False)
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import fields
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

C = TypeVar("C", bound="DataclassInstance")

#: ``--transport`` choices of every benchmark.
TRANSPORTS = ["auto", "tcp", "verbs"]


def add_config_arguments(p: argparse.ArgumentParser, defaults: Any, helps: Mapping[str, str] | None = None) -> None:
    """``--field-name VALUE`` per field of the dataclass instance ``defaults`` (its values and types);
    ``--no-field-name`` for a bool field that defaults to true; ``transport`` takes :data:`TRANSPORTS`."""
    helps = helps or {}
    for f in fields(defaults):
        value = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            p.add_argument("--no-" + flag[2:], dest=f.name, action="store_false", help=helps.get(f.name))
        else:
            p.add_argument(flag, type=type(value), default=value, help=helps.get(f.name),
                           choices=TRANSPORTS if f.name == "transport" else None)


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    """The dataclass ``cls`` built from the options :func:`add_config_arguments` added."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})
