"""Which rows are hot: a count-min frequency sketch with aging, and a bounded set of candidates.

:class:`FrequencySketch` estimates how often a key was seen in ``depth``
rows of ``width`` counters (count-min: every key adds one to one counter per
row; its estimate is the smallest of those counters, never below the true
count).  Every ``width * 8`` additions all counters are halved (aging, as in
TinyLFU), so the estimates follow a drifting popularity.

:class:`HotRows` keeps, per table, the ``limit`` keys with the highest
estimates seen so far, each with the batch (tick) it was last seen in, and
ranks them:

* :meth:`HotRows.hottest` -- by frequency alone (what a cache that just grew
  should read in first: :mod:`flexemr.client.swapin`);
* :meth:`HotRows.predict` -- by frequency x recency,
  ``estimate * 0.5 ** (age / half_life)`` with ``age`` in batches (what the
  next batches are likely to need: predictive prefetch).

Everything is vectorised per batch of ids.

>>> hot = HotRows(limit=4, width=1 << 10)
>>> for _ in range(3):
...     hot.observe("t", np.array([7, 7, 9])); hot.advance()
>>> hot.observe("t", np.array([1]))
>>> hot.hottest("t", 2).tolist(), hot.predict("t", 1, half_life=0.5).tolist()
([7, 9], [1])
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .errors import ConfigError

__all__ = ["FrequencySketch", "HotRows"]

IntArray = npt.NDArray[np.int64]
_SEEDS = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93,
                   0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, 0x94D049BB133111EB, 0xBF58476D1CE4E5B9], dtype=np.uint64)


class FrequencySketch:
    """Count-min sketch of ``depth`` x ``width`` counters (``width`` a power of two) with halving."""

    def __init__(self, width: int = 1 << 16, depth: int = 4) -> None:
        if not isinstance(width, int) or width < 16 or width & (width - 1):
            raise ConfigError(f"width must be a power of two >= 16, got {width!r}")
        if not isinstance(depth, int) or not 1 <= depth <= _SEEDS.size:
            raise ConfigError(f"depth must be in 1..{_SEEDS.size}, got {depth!r}")
        self.width = width
        self.depth = depth
        self.counts = np.zeros((depth, width), dtype=np.uint32)
        self._shift = np.uint64(64 - (width.bit_length() - 1))
        self._added = 0
        self.reset_every = width * 8
        self.halvings = 0

    def _cells(self, keys: IntArray) -> npt.NDArray[np.intp]:
        k = keys.astype(np.uint64)
        k ^= k >> np.uint64(31)
        with np.errstate(over="ignore"):
            h = (k[None, :] * _SEEDS[: self.depth, None]) >> self._shift
        return h.astype(np.intp)

    def add(self, keys: IntArray) -> None:
        """Count every key once (duplicates in ``keys`` count once each occurrence)."""
        if keys.size == 0:
            return
        cells = self._cells(keys)
        for d in range(self.depth):
            np.add.at(self.counts[d], cells[d], 1)
        self._added += int(keys.size)
        if self._added >= self.reset_every:
            self.counts >>= 1
            self._added //= 2
            self.halvings += 1

    def estimate(self, keys: IntArray) -> IntArray:
        """Estimated count of every key (never below its true count since the last halving)."""
        if keys.size == 0:
            return np.zeros(0, dtype=np.int64)
        cells = self._cells(keys)
        est = self.counts[0, cells[0]]
        for d in range(1, self.depth):
            est = np.minimum(est, self.counts[d, cells[d]])
        return est.astype(np.int64)


class _Candidates:
    __slots__ = ("ids", "last")

    def __init__(self) -> None:
        self.ids: IntArray = np.zeros(0, dtype=np.int64)
        self.last: IntArray = np.zeros(0, dtype=np.int64)


class HotRows:
    """Per table, the ``limit`` most frequent rows seen and when each was last seen (module docstring)."""

    def __init__(self, limit: int = 1 << 16, *, width: int = 1 << 16, depth: int = 4) -> None:
        if not isinstance(limit, int) or limit < 1:
            raise ConfigError(f"limit must be a positive int, got {limit!r}")
        self.limit = limit
        self.sketch = FrequencySketch(width, depth)
        self.tick = 0
        self._tables: dict[str, int] = {}
        self._cands: dict[str, _Candidates] = {}

    def _keys(self, table: str, ids: IntArray) -> IntArray:
        t = self._tables.setdefault(table, len(self._tables))
        out: IntArray = (np.int64(t) << np.int64(40)) | ids.astype(np.int64, copy=False)
        return out

    def advance(self) -> None:
        """The next batch begins (ages every candidate's recency by one)."""
        self.tick += 1

    def observe(self, table: str, ids: IntArray) -> None:
        """One batch's ids of ``table`` (each distinct id counts once per batch and table)."""
        uniq = np.unique(np.asarray(ids, dtype=np.int64))
        if uniq.size == 0:
            return
        self.sketch.add(self._keys(table, uniq))
        c = self._cands.setdefault(table, _Candidates())
        ids_all = np.concatenate((c.ids, uniq))
        last_all = np.concatenate((c.last, np.full(uniq.size, self.tick, dtype=np.int64)))
        order = np.lexsort((-last_all, ids_all))  # by id, the latest tick first
        ids_all, last_all = ids_all[order], last_all[order]
        first = np.concatenate(([True], ids_all[1:] != ids_all[:-1]))
        ids_all, last_all = ids_all[first], last_all[first]
        if ids_all.size > self.limit:
            est = self.sketch.estimate(self._keys(table, ids_all))
            keep = np.sort(np.argpartition(-est, self.limit - 1)[: self.limit])
            ids_all, last_all = ids_all[keep], last_all[keep]
        c.ids, c.last = ids_all, last_all

    def estimate(self, table: str, ids: IntArray) -> IntArray:
        """Estimated number of batches in which each of ``ids`` was seen (aged)."""
        return self.sketch.estimate(self._keys(table, np.asarray(ids, dtype=np.int64)))

    def _top(self, table: str, n: int, score: npt.NDArray[np.float64], ids: IntArray) -> IntArray:
        if n <= 0 or ids.size == 0:
            return np.zeros(0, dtype=np.int64)
        if n < ids.size:
            pick = np.argpartition(-score, n - 1)[:n]
        else:
            pick = np.arange(ids.size)
        pick = pick[np.lexsort((ids[pick], -score[pick]))]  # hottest first, ties by id
        out: IntArray = ids[pick]
        return out

    def hottest(self, table: str, n: int, exclude: npt.NDArray[np.bool_] | None = None) -> IntArray:
        """Up to ``n`` candidate rows of ``table``, most frequent first.

        ``exclude``: a mask over :meth:`candidates` of rows to leave out (e.g. already cached).
        """
        c = self._cands.get(table)
        if c is None:
            return np.zeros(0, dtype=np.int64)
        score: npt.NDArray[np.float64] = self.estimate(table, c.ids).astype(np.float64)
        ids = c.ids
        if exclude is not None:
            ids, score = ids[~exclude], score[~exclude]
        return self._top(table, n, score, ids)

    def predict(self, table: str, n: int, *, half_life: float = 4.0,
                exclude: npt.NDArray[np.bool_] | None = None) -> IntArray:
        """Up to ``n`` candidate rows most likely in the next batches: frequency x recency (module docstring)."""
        c = self._cands.get(table)
        if c is None:
            return np.zeros(0, dtype=np.int64)
        age = (self.tick - c.last).astype(np.float64)
        score: npt.NDArray[np.float64] = self.estimate(table, c.ids).astype(np.float64) * np.power(0.5, age / half_life)
        ids = c.ids
        if exclude is not None:
            ids, score = ids[~exclude], score[~exclude]
        return self._top(table, n, score, ids)

    def candidates(self, table: str) -> IntArray:
        """The candidate rows of ``table`` (sorted)."""
        c = self._cands.get(table)
        return np.zeros(0, dtype=np.int64) if c is None else c.ids

    def tables(self) -> list[str]:
        """Tables observed so far."""
        return list(self._cands)
