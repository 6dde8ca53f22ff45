"""TOML for cluster files: reading (:func:`load_toml`, with errors that name the file) and writing
(:func:`dumps_toml`, the subset cluster files use; the standard library only reads TOML)."""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import ConfigError
from .spec import _is_int

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



_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _toml_str(key)


def _toml_str(s: str) -> str:
    out = ['"']
    for ch in s:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_value(v: object) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if _is_int(v):
        return str(int(v))  # type: ignore[call-overload]
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if math.isnan(f):
            return "nan"
        if math.isinf(f):
            return "inf" if f > 0 else "-inf"
        return repr(f)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise ConfigError(f"cannot write {type(v).__name__} value {v!r} to TOML")


def _is_table_array(v: object) -> bool:
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(x, Mapping) for x in v)


def _emit_table(lines: list[str], path: list[str], d: Mapping[str, Any], header: str | None) -> None:
    scalars = [k for k, v in d.items() if not isinstance(v, Mapping) and not _is_table_array(v)]
    # a plain table holding only sub-tables needs no header of its own
    if header is not None and (header.startswith("[[") or scalars or not d):
        if lines:
            lines.append("")
        lines.append(header)
    for k, v in d.items():
        if not isinstance(v, Mapping) and not _is_table_array(v):
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    for k, v in d.items():
        sub = path + [_toml_key(k)]
        if isinstance(v, Mapping):
            _emit_table(lines, sub, v, "[" + ".".join(sub) + "]")
        elif _is_table_array(v):
            for item in v:
                _emit_table(lines, sub, item, "[[" + ".".join(sub) + "]]")


def dumps_toml(d: Mapping[str, Any]) -> str:
    """Serialise a nested dict of str/int/float/bool/lists/tables to TOML text.

    Only what cluster files need; ``tomllib.loads(dumps_toml(d)) == d`` for such dicts.

    >>> print(dumps_toml({"servers": {"s0": {"host": "h", "port": 1}}}))
    [servers.s0]
    host = "h"
    port = 1
    <BLANKLINE>
    """
    lines: list[str] = []
    _emit_table(lines, [], d, None)
    return "\n".join(lines) + "\n"
