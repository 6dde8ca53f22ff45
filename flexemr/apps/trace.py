"""Lookup-request traces: a small ``.npz`` format, its writer, reader and a generator.

A trace is a sequence of ranking requests (batches).  Each batch has dense
features ``[b, F]`` (float32, model-ready), per-table jagged ids (a
:class:`~flexemr.JaggedBatch`, KeyedJaggedTensor layout) and optionally
labels.  The file is a NumPy ``.npz`` archive (``docs/trace-format.md``)::

    meta         uint8[]        UTF-8 JSON: {"format": "flexemr-trace", "version": 1,
                                "keys": [...], "num_dense": F, "batches": B,
                                "has_labels": bool, "num_rows": {key: rows} | null, ...}
    batch_sizes  int64[B]       samples per batch
    dense        float32[S, F]  S = sum(batch_sizes), batches back to back
    labels       int8[S]        only when has_labels
    lengths      int64[K * S]   per batch: K * b counts, key-major (key k, sample j at k * b + j)
    values       int64[V]       ids, V = sum(lengths), batch after batch

No pickles (``allow_pickle=False`` on read); every array is checked on read
and an inconsistent file raises :class:`TraceFormatError`.

>>> import tempfile, os
>>> from flexemr.core.spec import TableSpec
>>> specs = [TableSpec("a", 1000, 8), TableSpec("b", 50, 8)]
>>> batches = generate_trace(specs, batches=3, batch_size=16, pooling_factor=4, seed=1)
>>> path = os.path.join(tempfile.mkdtemp(), "t.npz")
>>> _ = write_trace(path, batches, num_rows={s.name: s.num_rows for s in specs})
>>> trace = read_trace(path)
>>> trace.keys, len(trace), trace.batches[0].dense.shape
(('a', 'b'), 3, (16, 13))
>>> all(x.sparse == y.sparse for x, y in zip(trace, batches))
True
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..core.errors import InputError
from ..core.jagged import JaggedBatch
from ..core.spec import TableSpec
from .criteo import synthetic_dense
from .dlrm import NUM_DENSE, dense_transform
from .workload import PROFILE_2022, Profile, generate

__all__ = ["FORMAT", "VERSION", "Trace", "TraceBatch", "TraceFormatError", "generate_trace", "read_trace",
           "write_trace"]

#: ``meta["format"]`` of a trace file.
FORMAT = "flexemr-trace"
#: ``meta["version"]`` this module writes and reads.
VERSION = 1


class TraceFormatError(InputError):
    """A trace file is not a valid flexemr trace."""


@dataclass(frozen=True)
class TraceBatch:
    """One ranking request: dense features, jagged sparse ids, optional labels."""

    dense: npt.NDArray[np.float32]
    sparse: JaggedBatch
    labels: npt.NDArray[np.int8] | None = None

    def __post_init__(self) -> None:
        if self.dense.ndim != 2 or self.dense.shape[0] != self.sparse.batch_size:
            raise InputError(f"dense features {self.dense.shape} do not match batch size {self.sparse.batch_size}")
        if self.labels is not None and self.labels.shape != (self.sparse.batch_size,):
            raise InputError(f"labels {self.labels.shape} do not match batch size {self.sparse.batch_size}")

    @property
    def batch_size(self) -> int:
        """Samples in the batch."""
        return self.sparse.batch_size


@dataclass(frozen=True)
class Trace:
    """A trace read from disk: its batches and the metadata dict."""

    batches: list[TraceBatch]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def keys(self) -> tuple[str, ...]:
        """Table names, in value order."""
        return tuple(self.meta.get("keys", ()))

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[TraceBatch]:
        return iter(self.batches)


def write_trace(path: str | os.PathLike[str], batches: Iterable[TraceBatch], *,
                num_rows: Mapping[str, int] | None = None, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``batches`` (same keys and dense width) to ``path`` (an ``.npz``; returned)."""
    items = list(batches)
    keys = items[0].sparse.keys if items else ()
    num_dense = int(items[0].dense.shape[1]) if items else NUM_DENSE
    has_labels = bool(items) and all(b.labels is not None for b in items)
    for i, b in enumerate(items):
        if b.sparse.keys != keys or b.dense.shape[1] != num_dense:
            raise InputError(f"batch {i}: keys/dense width differ from batch 0")
    meta = {"format": FORMAT, "version": VERSION, "keys": list(keys), "num_dense": num_dense,
            "batches": len(items), "has_labels": has_labels,
            "num_rows": dict(num_rows) if num_rows is not None else None, **dict(extra or {})}
    arrays: dict[str, npt.NDArray[Any]] = {
        "meta": np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8),
        "batch_sizes": np.array([b.batch_size for b in items], dtype=np.int64),
        "dense": (np.concatenate([b.dense for b in items]).astype(np.float32, copy=False) if items
                  else np.zeros((0, num_dense), np.float32)),
        "lengths": np.concatenate([b.sparse.lengths for b in items]) if items else np.zeros(0, np.int64),
        "values": np.concatenate([b.sparse.values for b in items]) if items else np.zeros(0, np.int64),
    }
    if has_labels:
        arrays["labels"] = np.concatenate([b.labels for b in items if b.labels is not None]).astype(np.int8)
    out = Path(path)
    with open(out, "wb") as f:  # a file object: numpy would otherwise append ".npz" to other names
        np.savez_compressed(f, **arrays)  # type: ignore[arg-type]
    return out


def _array(z: Any, name: str, dtype: type, ndim: int) -> npt.NDArray[Any]:
    if name not in z.files:
        raise TraceFormatError(f"trace lacks the array {name!r}")
    arr = z[name]
    if arr.dtype != np.dtype(dtype) or arr.ndim != ndim:
        raise TraceFormatError(f"trace array {name!r} is {arr.dtype}[{arr.ndim}-D], expected {np.dtype(dtype)}[{ndim}-D]")
    return np.asarray(arr)


def read_trace(path: str | os.PathLike[str]) -> Trace:
    """Read and validate a trace written by :func:`write_trace`."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise TraceFormatError(f"cannot read trace file {name}: {exc.strerror or exc}") from exc
    if magic != b"PK\x03\x04":
        raise TraceFormatError(f"{name}: not a trace file (an .npz archive, docs/trace-format.md; "
                               f"`flexemr gen trace` writes one); for Criteo TSV use --criteo")
    try:
        z = np.load(name, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise TraceFormatError(f"{name}: not a trace file: {exc}") from exc
    with z:
        if not hasattr(z, "files"):
            raise TraceFormatError(f"{os.fspath(path)}: not an .npz archive")
        try:
            meta = json.loads(bytes(_array(z, "meta", np.uint8, 1)).decode())
        except ValueError as exc:
            raise TraceFormatError(f"trace metadata is not JSON: {exc}") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise TraceFormatError(f"not a {FORMAT} file")
        if meta.get("version") != VERSION:
            raise TraceFormatError(f"trace version {meta.get('version')!r}; this reader knows {VERSION}")
        keys = meta.get("keys")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise TraceFormatError("trace metadata 'keys' must be a list of strings")
        sizes = _array(z, "batch_sizes", np.int64, 1)
        dense = _array(z, "dense", np.float32, 2)
        lengths = _array(z, "lengths", np.int64, 1)
        values = _array(z, "values", np.int64, 1)
        labels = _array(z, "labels", np.int8, 1) if meta.get("has_labels") else None
    total = int(sizes.sum())
    k = len(keys)
    if (sizes < 0).any() or dense.shape[0] != total or lengths.size != k * total:
        raise TraceFormatError(f"inconsistent sizes: {sizes.size} batches of {total} samples, dense {dense.shape}, "
                               f"{lengths.size} lengths for {k} keys")
    if (lengths < 0).any() or int(lengths.sum()) != values.size or (values.size and values.min() < 0):
        raise TraceFormatError("lengths must be >= 0 and sum to the number of values, ids >= 0")
    if labels is not None and labels.size != total:
        raise TraceFormatError(f"{labels.size} labels for {total} samples")
    num_rows = meta.get("num_rows")
    if isinstance(num_rows, dict) and values.size:
        counts = lengths.reshape(-1)
        # the table of every value: per batch, key-major blocks of b lengths
        key_of_len = np.concatenate([np.repeat(np.arange(k), int(b)) for b in sizes]) if k else np.zeros(0, np.int64)
        key_of_val = np.repeat(key_of_len, counts)
        limits = np.array([int(num_rows.get(key, np.iinfo(np.int64).max)) for key in keys], dtype=np.int64)
        if (values >= limits[key_of_val]).any():
            raise TraceFormatError("an id is >= num_rows of its table")
    out: list[TraceBatch] = []
    s0 = l0 = v0 = 0
    for b in sizes.tolist():
        lens = lengths[l0 : l0 + k * b]
        nv = int(lens.sum())
        out.append(TraceBatch(dense[s0 : s0 + b], JaggedBatch(keys, values[v0 : v0 + nv], lengths=lens, batch_size=b),
                              None if labels is None else labels[s0 : s0 + b]))
        s0, l0, v0 = s0 + b, l0 + k * b, v0 + nv
    return Trace(out, meta)


def generate_trace(specs: Sequence[TableSpec], batches: int, batch_size: int, pooling_factor: float = 8.0, *,
                   seed: int = 0, profile: Profile = PROFILE_2022, layout_seed: int = 0,
                   progress: Callable[[int, int], None] | None = None) -> list[TraceBatch]:
    """``batches`` synthetic requests over ``specs``: ids from the calibrated workload generator
    (batches share one hot-row layout, like a stream), dense features from
    :func:`flexemr.apps.criteo.synthetic_dense` through DLRM's log transform.
    ``progress(batches made, batches)`` is called after each batch."""
    out = []
    for i in range(int(batches)):
        rng = np.random.default_rng([int(seed), i, 0x7ACE])
        ints, _ = synthetic_dense(rng, batch_size)
        labels = (rng.random(batch_size) < 0.256).astype(np.int8)
        sparse = generate(specs, batch_size, pooling_factor, profile, seed=int(seed) * 1_000_003 + i,
                          layout_seed=layout_seed)
        out.append(TraceBatch(dense_transform(ints), sparse, labels))
        if progress is not None:
            progress(i + 1, int(batches))
    return out
