"""TOML for cluster files: reading (:func:`load_toml`: the standard library's ``tomllib``, with errors
that name the file) and writing (:func:`dumps_toml`: ``tomli_w``, the writer that matches ``tomllib``)."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from typing import Any

import numpy as np
import tomli_w

from .errors import ConfigError

__all__ = ["dumps_toml", "load_toml"]


def load_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The dict of a TOML file; :class:`ConfigError` (naming the file) when unreadable or invalid."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{os.fspath(path)}: invalid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read cluster file {os.fspath(path)}: {exc}") from exc


def _plain(v: Any) -> Any:
    """``v`` with numpy scalars made Python scalars and tuples lists (what ``tomli_w`` takes)."""
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


def dumps_toml(d: Mapping[str, Any]) -> str:
    """TOML text of a nested dict of str/int/float/bool/lists/tables (numpy scalars accepted).

    ``tomllib.loads(dumps_toml(d)) == d``; a value TOML cannot hold is a :class:`ConfigError`.

    >>> print(dumps_toml({"servers": {"s0": {"host": "h", "port": 1}}}))
    [servers.s0]
    host = "h"
    port = 1
    <BLANKLINE>
    >>> dumps_toml({"x": None})
    Traceback (most recent call last):
        ...
    flexemr.core.errors.ConfigError: cannot write TOML: Object of type 'NoneType' is not TOML serializable
    """
    try:
        return tomli_w.dumps(_plain(d))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"cannot write TOML: {exc}") from None
