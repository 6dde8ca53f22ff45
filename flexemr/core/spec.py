"""Embedding table specification.

A :class:`TableSpec` names a table and gives its shape and element type::

    >>> from flexemr.core.spec import TableSpec
    >>> spec = TableSpec("user", num_rows=1000, dim=64, dtype="f2")
    >>> spec.dtype, spec.row_bytes, spec.nbytes
    ('float16', 128, 128000)
    >>> TableSpec.from_dict(spec.to_dict()) == spec
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ConfigError

__all__ = ["SUPPORTED_DTYPES", "TableSpec"]

#: Element types an embedding table may use (numpy dtype names).
SUPPORTED_DTYPES: frozenset[str] = frozenset({"float16", "float32", "float64", "int8", "uint8"})


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


@dataclass(frozen=True)
class TableSpec:
    """Shape and element type of one embedding table.

    ``dtype`` accepts anything :func:`numpy.dtype` understands (``"f4"``,
    ``np.float16``...) and is normalised to the numpy name (``"float32"``).
    The row-major table is ``num_rows x dim`` elements of ``dtype``.
    """

    name: str
    num_rows: int
    dim: int
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"table name must be a non-empty string, got {self.name!r}")
        if not _is_int(self.num_rows) or int(self.num_rows) < 1:
            raise ConfigError(f"table {self.name!r}: num_rows must be an integer >= 1, got {self.num_rows!r}")
        if not _is_int(self.dim) or int(self.dim) < 1:
            raise ConfigError(f"table {self.name!r}: dim must be an integer >= 1, got {self.dim!r}")
        try:
            name = np.dtype(self.dtype).name
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"table {self.name!r}: invalid dtype {self.dtype!r}; "
                              f"expected one of {sorted(SUPPORTED_DTYPES)}") from exc
        if name not in SUPPORTED_DTYPES:
            raise ConfigError(
                f"table {self.name!r}: unsupported dtype {self.dtype!r}; "
                f"expected one of {sorted(SUPPORTED_DTYPES)}"
            )
        object.__setattr__(self, "num_rows", int(self.num_rows))
        object.__setattr__(self, "dim", int(self.dim))
        object.__setattr__(self, "dtype", name)

    @property
    def np_dtype(self) -> np.dtype[Any]:
        """The numpy dtype of the table's elements."""
        return np.dtype(self.dtype)

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return int(self.np_dtype.itemsize)

    @property
    def row_bytes(self) -> int:
        """Bytes per full row (``dim * itemsize``)."""
        return self.dim * self.itemsize

    @property
    def nbytes(self) -> int:
        """Bytes of the whole table."""
        return self.num_rows * self.row_bytes

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (as written in a cluster file's ``[[tables]]``)."""
        return {"name": self.name, "num_rows": self.num_rows, "dim": self.dim, "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TableSpec:
        """Inverse of :meth:`to_dict`; unknown or missing keys raise :class:`ConfigError`."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"table entry must be a table/mapping, got {type(d).__name__}")
        unknown = set(d) - {"name", "num_rows", "dim", "dtype"}
        if unknown:
            raise ConfigError(f"table {d.get('name')!r}: unknown keys {sorted(unknown)}")
        missing = {"name", "num_rows", "dim"} - set(d)
        if missing:
            raise ConfigError(f"table {d.get('name')!r}: missing keys {sorted(missing)}")
        return cls(name=d["name"], num_rows=d["num_rows"], dim=d["dim"], dtype=d.get("dtype", "float32"))
