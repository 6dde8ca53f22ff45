"""Ranker-side embedding row cache with LRU/LFU eviction and load-adaptive capacity.

:class:`RowCache` keeps recently fetched rows keyed by ``(table, row)`` so a
ranker can skip the remote read for hot rows.  Every operation takes a whole
batch of ids and is vectorised: the index is a numpy open-addressing hash
table (linear probing, tombstones, rebuilt when half full), row payloads live
in one ``[capacity, slot_bytes]`` byte arena, and the per-slot metadata
(key, last use, frequency) are numpy arrays.  No per-id Python code runs.

>>> cache = RowCache(capacity_rows=2, policy="lru")
>>> rows = np.arange(6, dtype=np.float32).reshape(3, 2)
>>> cache.insert("t", [5, 7, 9], rows)      # only the 2 most recent fit
>>> hit, got = cache.lookup("t", [7, 5, 9])
>>> hit.tolist(), got.tolist()
([True, False, True], [[2.0, 3.0], [4.0, 5.0]])
>>> cache.update("t", [9], np.full((1, 2), -1, np.float32))   # write-through
1
>>> cache.lookup("t", [9])[1].tolist()
[[-1.0, -1.0]]
>>> cache.stats.hits, cache.stats.misses, cache.stats.evictions
(3, 1, 0)

Semantics (what the tests' model checks):

* **use** -- every id occurrence in :meth:`RowCache.lookup` (hits) and
  :meth:`RowCache.insert` is one use, in array order: it sets the entry's
  last-use tick (a logical clock advanced by one per id) and adds one to its
  frequency.  :meth:`RowCache.update`, :meth:`RowCache.invalidate` and
  :meth:`RowCache.contains` are not uses.
* **eviction** -- LRU evicts the smallest last-use tick first; LFU the
  smallest frequency first, ties broken by LRU.  Entries used by the insert
  in progress are never its victims -- unless the insert touches more than
  ``capacity`` distinct ids: then only its ``capacity`` most recently used
  ids are protected, and older new ids of the batch are not inserted.
* **coherence** -- :meth:`RowCache.update` overwrites cached copies
  (write-through: absent ids are ignored, the servers hold the truth) and
  :meth:`RowCache.invalidate` drops them, so a lookup never returns a row
  older than the last update/invalidation of that id.
* **threads** -- none: a cache belongs to one event loop (one ranker) and
  its methods are synchronous, so no locking is needed; do not share one
  across threads.

:class:`AdaptiveCapacity` turns recent batch sizes into a cache capacity
(shrink under load, grow when idle); see its docstring for the formula.
:class:`~flexemr.core.cachechoice.CacheChoice` (re-exported here) decides,
by measured time, whether lookups use the cache at all.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Literal, TypeGuard

import numpy as np
import numpy.typing as npt

from . import kernel
from .cachechoice import CacheChoice
from .cacheindex import NOT_SORTED, Split, _HashIndex, _LruLog, insert_lru, probe_split
from .errors import ConfigError, InputError
from .spec import _is_int

__all__ = ["AdaptiveCapacity", "CacheChoice", "CachePolicy", "CacheStats", "RowCache", "Split"]

CachePolicy = Literal["lru", "lfu"]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

_ROW_BITS = 40  # key = table_index << 40 | row
_MAX_ROW = (1 << _ROW_BITS) - 1
_I64 = np.dtype(np.int64)


def _is_i64(a: object) -> TypeGuard[IntArray]:
    """Whether ``a`` is a 1-D contiguous int64 array (passed to the native code as it is)."""
    return type(a) is np.ndarray and a.dtype == _I64 and a.ndim == 1 and a.flags.c_contiguous


@dataclass
class CacheStats:
    """Counters of a :class:`RowCache` (ids, duplicates included, for hits/misses)."""

    hits: int = 0
    misses: int = 0
    inserts: int = 0
    evictions: int = 0
    invalidations: int = 0
    updates: int = 0

    @property
    def hit_rate(self) -> float:
        """``hits / (hits + misses)`` (0 before any lookup)."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class RowCache:
    """Batch-vectorised ``(table, row) -> row`` cache with LRU or LFU eviction.

    Give ``capacity_rows`` or ``memory_budget_bytes`` together with
    ``row_bytes`` (capacity ``memory_budget_bytes // row_bytes``; payload
    only, the ~40 B/slot of metadata and index are not counted).  With
    ``row_bytes`` every slot holds ``row_bytes`` bytes and larger rows raise
    :class:`~flexemr.core.errors.InputError`; without it slots widen to the largest
    row seen.  A table's row shape and dtype are fixed by its first insert.
    Row ids must be in ``[0, 2**40)``.  See the module docstring for the exact
    use/eviction/coherence semantics.
    """

    def __init__(
        self,
        capacity_rows: int | None = None,
        *,
        memory_budget_bytes: int | None = None,
        row_bytes: int | None = None,
        policy: CachePolicy = "lru",
    ) -> None:
        if policy not in ("lru", "lfu"):
            raise ConfigError(f"policy must be 'lru' or 'lfu', got {policy!r}")
        if row_bytes is not None and (not _is_int(row_bytes) or row_bytes < 1):
            raise ConfigError(f"row_bytes must be a positive integer, got {row_bytes!r}")
        if (capacity_rows is None) == (memory_budget_bytes is None):
            raise ConfigError("give exactly one of capacity_rows or memory_budget_bytes")
        if memory_budget_bytes is not None:
            if not _is_int(memory_budget_bytes) or memory_budget_bytes < 0:
                raise ConfigError(f"memory_budget_bytes must be a non-negative integer, got {memory_budget_bytes!r}")
            if row_bytes is None:
                raise ConfigError("memory_budget_bytes needs row_bytes")
            capacity_rows = int(memory_budget_bytes) // int(row_bytes)
        if not _is_int(capacity_rows) or capacity_rows is None or capacity_rows < 0:
            raise ConfigError(f"capacity_rows must be a non-negative integer, got {capacity_rows!r}")
        self._policy: CachePolicy = policy
        self._capacity = int(capacity_rows)
        self._fixed_width = row_bytes is not None
        self._slot_bytes = int(row_bytes) if row_bytes is not None else 0
        self._tables: dict[str, int] = {}
        self._layout: list[tuple[tuple[int, ...], np.dtype[Any], int]] = []  # row shape, dtype, bytes
        self._clock = 0
        self.stats = CacheStats()
        self._alloc_slots(self._capacity)
        self._index = _HashIndex(self._capacity)
        #: LRU order kept incrementally (LFU evicts by a selection over the cached rows)
        self._lru = _LruLog(self._capacity) if policy == "lru" else None

    # ----------------------------------------------------------- storage

    def _alloc_slots(self, capacity: int) -> None:
        self._arena = np.zeros((capacity, self._slot_bytes), dtype=np.uint8)
        self._slot_key: IntArray = np.full(capacity, -1, dtype=np.int64)
        self._last_use: IntArray = np.zeros(capacity, dtype=np.int64)
        self._freq: IntArray = np.zeros(capacity, dtype=np.int64)
        self._free: IntArray = np.arange(capacity - 1, -1, -1, dtype=np.int64)  # stack, pop from end
        self._nfree = capacity

    def _widen(self, nbytes: int) -> None:
        arena = np.zeros((self._arena.shape[0], nbytes), dtype=np.uint8)
        arena[:, : self._slot_bytes] = self._arena
        self._arena = arena
        self._slot_bytes = nbytes

    # ------------------------------------------------------------ props

    @property
    def policy(self) -> CachePolicy:
        """``"lru"`` or ``"lfu"``."""
        return self._policy

    @property
    def capacity(self) -> int:
        """Maximum number of cached rows."""
        return self._capacity

    @property
    def slot_bytes(self) -> int:
        """Payload bytes per slot."""
        return self._slot_bytes

    def __len__(self) -> int:
        return self._capacity - self._nfree

    def __repr__(self) -> str:
        return f"RowCache(policy={self._policy!r}, size={len(self)}, capacity={self._capacity})"

    # ---------------------------------------------------------- helpers

    def _table_index(self, table: str, create: bool) -> int:
        if not isinstance(table, str) or not table:
            raise InputError(f"table must be a non-empty string, got {table!r}")
        idx = self._tables.get(table)
        if idx is None and create:
            idx = len(self._tables)
            self._tables[table] = idx
            self._layout.append(((), np.dtype(np.uint8), 0))
        return -1 if idx is None else idx

    def _keys(self, tidx: int, ids: object) -> IntArray:
        out: IntArray = (np.int64(max(tidx, 0)) << np.int64(_ROW_BITS)) | self._ids(ids)
        return out

    @staticmethod
    def _ids(ids: object) -> IntArray:
        arr = np.asarray(ids)
        if arr.size == 0 and arr.dtype.kind == "f":
            arr = arr.astype(np.int64)
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise InputError(f"ids must be a 1-D integer array, got shape {arr.shape} dtype {arr.dtype}")
        a64 = arr.astype(np.int64, copy=False)
        if a64.size and (a64.min() < 0 or (arr.dtype.kind == "u" and arr.max() > _MAX_ROW) or a64.max() > _MAX_ROW):
            raise InputError(f"ids must be in [0, 2**{_ROW_BITS})")
        return a64

    def _rows_in(self, tidx: int, table: str, rows: object, n: int) -> npt.NDArray[np.uint8]:
        arr = np.asarray(rows)
        if arr.ndim != 2 or arr.shape[0] != n:
            raise InputError(f"table {table!r}: need {n} rows, got array of shape {arr.shape}")
        shape, dtype, nbytes = self._layout[tidx]
        if nbytes == 0:  # first rows of this table fix its layout
            shape, dtype = tuple(arr.shape[1:]), arr.dtype
            nbytes = int(arr.shape[1]) * dtype.itemsize
            if nbytes == 0:
                raise InputError(f"table {table!r}: rows must not be empty")
            if nbytes > self._slot_bytes:
                if self._fixed_width:
                    raise InputError(f"table {table!r}: rows of {nbytes} bytes exceed row_bytes={self._slot_bytes}")
                self._widen(nbytes)
            self._layout[tidx] = (shape, dtype, nbytes)
        elif tuple(arr.shape[1:]) != shape or arr.dtype != dtype:
            raise InputError(
                f"table {table!r}: rows must have shape [n, {shape[0]}] and dtype {dtype}, "
                f"got {arr.shape} {arr.dtype}"
            )
        out: npt.NDArray[np.uint8] = np.ascontiguousarray(arr).view(np.uint8).reshape(n, nbytes)
        return out

    def _rows_out(self, tidx: int, slots: IntArray) -> npt.NDArray[Any]:
        shape, dtype, nbytes = self._layout[tidx]
        raw = kernel.gather(self._arena[:, :nbytes], slots)  # one pass, prefetched
        return raw.view(dtype).reshape((slots.size, *shape))

    def rows_view(self, table: str) -> npt.NDArray[Any]:
        """Every slot as a row of ``table``: a ``[capacity, dim]`` view of the arena (valid until the next
        insert, update, invalidate or resize), to read hits in place (:meth:`lookup_slots`)."""
        tidx = self._table_index(table, create=False)
        shape, dtype, nbytes = self._layout[tidx] if tidx >= 0 else ((0,), np.dtype(np.uint8), 0)
        if nbytes == 0:
            return np.zeros((self._arena.shape[0], 0), dtype=np.uint8)
        view: npt.NDArray[Any] = self._arena[:, :nbytes].view(dtype)
        return view

    def lookup_slots(self, table: str, ids: object) -> tuple[BoolArray, IntArray]:
        """:meth:`lookup` without copying the rows: ``(hit_mask, slots)``, the hits' rows being
        ``rows_view(table)[slots]`` (in the order of ``ids[hit_mask]``).  Uses and counters as :meth:`lookup`.

        >>> c = RowCache(4); c.insert("t", [3], np.array([[1.0, 2.0]], np.float32))
        >>> hit, slots = c.lookup_slots("t", [5, 3]); hit.tolist(), c.rows_view("t")[slots].tolist()
        ([False, True], [[1.0, 2.0]])
        """
        hit, slots, nh = self.probe(table, ids)
        return hit, slots[hit] if nh else np.zeros(0, dtype=np.int64)

    def probe(self, table: str, ids: object) -> tuple[BoolArray, IntArray, int]:
        """:meth:`lookup_slots` with the slot of every id: ``(hit_mask, slot or -1 per id, number of hits)``,
        in one native pass (the uses and counters of :meth:`lookup`).

        >>> c = RowCache(4); c.insert("t", [3], np.array([[1.0, 2.0]], np.float32))
        >>> hit, slots, nh = c.probe("t", [5, 3]); hit.tolist(), slots.tolist(), nh
        ([False, True], [-1, 0], 1)
        """
        tidx = self._table_index(table, create=False)
        a64 = self._ids(ids)
        tick0 = self._clock
        self._clock += int(a64.size)
        if tidx < 0:
            self.stats.misses += int(a64.size)
            return np.zeros(a64.size, dtype=bool), np.full(a64.size, -1, dtype=np.int64), 0
        if self._lru is not None:
            self._lru.room(a64.size, self._slot_key, self._last_use)
        slots, nh = self._index.probe(a64, tidx << _ROW_BITS, tick0, self._last_use, self._freq, self._lru)
        self.stats.hits += nh
        self.stats.misses += int(a64.size) - nh
        hit: BoolArray = slots >= 0
        return hit, slots, nh

    def probe_split(self, table: str, ids: object, offsets: object, weights: npt.NDArray[np.float32] | None,
                    admit: int) -> Split:
        """A pooled lookup's occurrences ``ids`` (bags by ``offsets``) probed and split in one native pass,
        with no sort: :meth:`probe` of the distinct ids, in order of first occurrence (each one use), then
        the occurrences split into hits (their slots, to pool from :meth:`rows_view`), admitted misses (those
        occurring ``admit`` times or more: read, then cached) and the rest (:class:`Split`).

        >>> c = RowCache(4); c.insert("t", [3], np.array([[1.0, 2.0]], np.float32))
        >>> r = c.probe_split("t", [5, 3, 5, 9], [0, 2, 4], None, 2)
        >>> r.hit_slots.tolist(), r.hit_offsets.tolist(), r.admitted.tolist(), r.served.tolist(), r.distinct
        ([0], [0, 1, 1], [0, 2], [True, True, True, False], 3)
        >>> c.stats.hits, c.stats.misses
        (1, 2)
        """
        tidx = self._table_index(table, create=False)
        # contiguous int64 ids (the client's) go as they are: the native pass checks each id as it reads it
        a64 = ids if _is_i64(ids) else np.ascontiguousarray(self._ids(ids))
        offs = offsets if _is_i64(offsets) else np.ascontiguousarray(offsets, dtype=np.int64)
        n, nb = int(a64.size), int(offs.size) - 1
        w = None if weights is None else np.ascontiguousarray(weights, dtype=np.float32)
        if nb < 0 or offs.ndim != 1 or (w is not None and (w.ndim != 1 or w.size != n)):
            raise InputError(f"offsets must have at least one entry and weights one per id ({n})")
        r = probe_split(self._index, self._lru, self._slot_key, self._last_use, self._freq,
                        (tidx if tidx >= 0 else len(self._tables)) << _ROW_BITS,  # an unknown table matches no key
                        self._clock, a64, offs, w, admit, _MAX_ROW)
        self._clock += r.distinct
        self.stats.hits += r.distinct_hits
        self.stats.misses += r.distinct - r.distinct_hits
        return r

    def _ticks(self, n: int) -> IntArray:
        t = np.arange(self._clock, self._clock + n, dtype=np.int64)
        self._clock += n
        return t

    def _evict(self, k: int, protect: IntArray) -> None:
        """Free ``k`` occupied slots chosen by the policy, never one of ``protect``."""
        if k <= 0:
            return
        if self._lru is not None:
            victims = self._lru.victims(k, protect, self._slot_key, self._last_use)
            if victims.size == k:
                self._index.delete(self._slot_key[victims])
                self._release(victims)
                self.stats.evictions += k
                return
            # not expected (the log holds every occupied slot): relog and select as LFU does
            self._index.delete(self._slot_key[victims])
            self._release(victims)
            self.stats.evictions += int(victims.size)
            k -= int(victims.size)
            self._lru.rebuild(self._slot_key, self._last_use)
        occ = self._slot_key >= 0
        occ[protect] = False
        cand = np.flatnonzero(occ)
        if k < cand.size:
            lu = self._last_use[cand]
            if self._policy == "lru":
                victims = cand[np.argpartition(lu, k - 1)[:k]]
            else:
                fr = self._freq[cand]
                fk = fr[np.argpartition(fr, k - 1)[k - 1]]  # k-th smallest frequency
                below = cand[fr < fk]
                tied = cand[fr == fk]
                need = k - below.size
                if need < tied.size:
                    tied = tied[np.argpartition(self._last_use[tied], need - 1)[:need]]
                victims = np.concatenate((below, tied))
        else:
            victims = cand
        self._index.delete(self._slot_key[victims])
        self._release(victims)
        self.stats.evictions += int(victims.size)

    def _release(self, slots: IntArray) -> None:
        self._slot_key[slots] = -1
        self._freq[slots] = 0
        self._free[self._nfree : self._nfree + slots.size] = slots
        self._nfree += int(slots.size)

    @staticmethod
    def _last_occurrence(keys: IntArray) -> tuple[IntArray, IntArray, IntArray]:
        """Distinct keys ordered by their last occurrence: (keys, last index, occurrences)."""
        n = keys.size
        if n < 2 or bool(np.all(keys[1:] > keys[:-1])):  # sorted unique (what the client inserts): no sort
            return keys, np.arange(n, dtype=np.int64), np.ones(n, dtype=np.int64)
        uk, first_rev, counts = np.unique(keys[::-1], return_index=True, return_counts=True)
        last = (n - 1 - first_rev).astype(np.int64)
        order = np.argsort(last, kind="stable")
        return uk[order], last[order], counts[order].astype(np.int64)

    # ------------------------------------------------------------- API

    def register(self, table: str, dim: int, dtype: npt.DTypeLike = np.float32) -> None:
        """Fix ``table``'s row layout up front (otherwise its first insert does), so that
        lookups before any insert return correctly shaped empty ``[0, dim]`` rows.

        >>> c = RowCache(4); c.register("t", 8, "float16"); c.lookup("t", [1])[1].shape
        (0, 8)
        """
        tidx = self._table_index(table, create=True)
        if not _is_int(dim) or dim < 1:
            raise InputError(f"dim must be a positive integer, got {dim!r}")
        self._rows_in(tidx, table, np.zeros((0, int(dim)), dtype=np.dtype(dtype)), 0)

    def contains(self, table: str, ids: object) -> BoolArray:
        """Mask of cached ids (not a use: recency, frequency and counters are untouched)."""
        tidx = self._table_index(table, create=False)
        keys = self._keys(tidx, ids)
        if tidx < 0:
            return np.zeros(keys.size, dtype=bool)
        out: BoolArray = self._index.positions(keys) >= 0
        return out

    def peek(self, table: str, ids: object) -> tuple[BoolArray, npt.NDArray[Any]]:
        """Like :meth:`lookup` but not a use: recency, frequency and counters are untouched."""
        tidx = self._table_index(table, create=False)
        keys = self._keys(tidx, ids)
        if tidx < 0:
            return np.zeros(keys.size, dtype=bool), np.zeros((0, 0), dtype=np.uint8)
        slots = self._index.get(keys)
        hit = slots >= 0
        return hit, self._rows_out(tidx, slots[hit])

    def lookup(self, table: str, ids: object) -> tuple[BoolArray, npt.NDArray[Any]]:
        """``(hit_mask, rows_for_hits)``: rows of the cached ids, in the order of ``ids[hit_mask]``.

        Every hit is a use (module docstring); hits and misses are counted per
        id occurrence.  An unknown table misses everywhere (and its rows come
        back as an empty ``uint8`` array of shape ``[0, 0]``).
        """
        tidx = self._table_index(table, create=False)
        hit, hs = self.lookup_slots(table, ids)
        if tidx < 0:
            return hit, np.zeros((0, 0), dtype=np.uint8)
        return hit, self._rows_out(tidx, hs)

    def insert(self, table: str, ids: object, rows: object) -> None:
        """Cache ``rows[i]`` as ``(table, ids[i])`` (duplicates: the last occurrence wins).

        Cached ids are overwritten and count as used; new ids take free slots,
        evicting per policy when full (module docstring).
        """
        tidx = self._table_index(table, create=True)
        lru = self._lru
        if lru is not None and _is_i64(ids) and 0 < ids.size <= self._capacity:
            # contiguous int64 ids (what the client inserts, sorted unique) in one native pass that checks them
            n = int(ids.size)
            payload = self._rows_in(tidx, table, rows, n)
            done = insert_lru(self._index, lru, tidx << _ROW_BITS, ids, payload, self._arena, self._slot_key,
                              self._last_use, self._freq, self._free, self._nfree, self._clock, _MAX_ROW)
            if isinstance(done, tuple):  # uses from tick self._clock on, one per id
                self._clock += n
                self._nfree, added, evicted = done
                self.stats.inserts += added
                self.stats.evictions += evicted
                return
            if done != NOT_SORTED:
                lru.rebuild(self._slot_key, self._last_use)
        keys = self._keys(tidx, ids)
        n = keys.size
        payload = self._rows_in(tidx, table, rows, n)
        tick0 = self._clock
        if n == 0 or self._capacity == 0:
            self._clock += n
            return
        ticks = self._ticks(n)
        ukeys, last, occ = self._last_occurrence(keys)
        # only the `capacity` most recently used distinct ids of the batch are sure to stay
        in_win = np.arange(ukeys.size) >= ukeys.size - self._capacity
        pos = self._index.positions(ukeys)
        present = pos >= 0
        # cached ids: overwrite and touch
        old_slots = self._index.vals[pos[present]]
        if old_slots.size:
            self._arena[old_slots, : payload.shape[1]] = payload[last[present]]
            self._last_use[old_slots] = ticks[last[present]]
            self._freq[old_slots] += occ[present]
        protect = self._index.vals[pos[present & in_win]]
        new = ~present & in_win
        new_keys, new_last, new_occ = ukeys[new], last[new], occ[new]
        m = int(new_keys.size)
        log_start = 0
        if lru is not None:  # room for both runs first: no compaction moves the first before it is sorted
            lru.room(int(ukeys.size), self._slot_key, self._last_use)
            log_start = lru.tail
        if lru is not None and old_slots.size:  # before the eviction: those not protected may be its victims
            lru.append(ticks[last[present]], old_slots, self._slot_key, self._last_use)
        if m == 0:
            return
        self._evict(m - self._nfree, protect)
        slots = self._free[self._nfree - m : self._nfree][::-1].copy()
        self._nfree -= m
        self._slot_key[slots] = new_keys
        self._last_use[slots] = ticks[new_last]
        self._freq[slots] = new_occ
        self._arena[slots, : payload.shape[1]] = payload[new_last]
        self._index.put_absent(new_keys, slots)
        self.stats.inserts += m
        if lru is not None:
            lru.append(ticks[new_last], slots, self._slot_key, self._last_use)
            if old_slots.size:
                lru.sort_from(log_start)

    def update(self, table: str, ids: object, rows: object) -> int:
        """Write-through: overwrite the cached copies of ``ids`` (absent ids are ignored).

        Not a use.  Returns the number of distinct cached ids updated.
        """
        tidx = self._table_index(table, create=False)
        keys = self._keys(tidx, ids)
        if tidx < 0 or self._layout[tidx][2] == 0:
            return 0
        payload = self._rows_in(tidx, table, rows, keys.size)
        if keys.size == 0:
            return 0
        ukeys, last, _ = self._last_occurrence(keys)
        slots = self._index.get(ukeys)
        ok = slots >= 0
        self._arena[slots[ok], : payload.shape[1]] = payload[last[ok]]
        nup = int(ok.sum())
        self.stats.updates += nup
        return nup

    def invalidate(self, table: str, ids: object) -> int:
        """Drop the cached copies of ``ids``; returns how many distinct ids were cached."""
        tidx = self._table_index(table, create=False)
        keys = self._keys(tidx, ids)
        if tidx < 0 or keys.size == 0:
            return 0
        ukeys = np.unique(keys)
        slots = self._index.get(ukeys)
        ok = slots >= 0
        self._index.delete(ukeys[ok])
        self._release(slots[ok])
        n = int(ok.sum())
        self.stats.invalidations += n
        return n

    def clear(self) -> None:
        """Drop every entry (counters are kept; not counted as invalidations)."""
        occ = np.flatnonzero(self._slot_key >= 0)
        self._index = _HashIndex(self._capacity)
        self._release(occ)
        if self._lru is not None:
            self._lru = _LruLog(self._capacity)

    def resize(self, capacity: int) -> None:
        """Change the capacity; shrinking evicts per policy (counted in ``evictions``)."""
        if not _is_int(capacity) or capacity < 0:
            raise ConfigError(f"capacity must be a non-negative integer, got {capacity!r}")
        capacity = int(capacity)
        if capacity == self._capacity:
            return
        self._evict(len(self) - capacity, np.zeros(0, dtype=np.int64))
        occ = np.flatnonzero(self._slot_key >= 0)
        keys, last_use, freq = self._slot_key[occ], self._last_use[occ], self._freq[occ]
        payload = self._arena[occ]
        self._capacity = capacity
        self._alloc_slots(capacity)
        k = occ.size
        new_slots = np.arange(k, dtype=np.int64)
        self._slot_key[:k], self._last_use[:k], self._freq[:k] = keys, last_use, freq
        self._arena[:k] = payload
        self._free = np.arange(capacity - 1, k - 1, -1, dtype=np.int64)
        self._free = np.concatenate((self._free, np.zeros(k, dtype=np.int64)))
        self._nfree = capacity - k
        self._index = _HashIndex(capacity)
        self._index.put_absent(keys, new_slots)
        if self._lru is not None:
            self._lru.rebuild(self._slot_key, self._last_use)

    def coldest(self, n: int) -> dict[str, IntArray]:
        """The (up to) ``n`` cached rows the policy would evict next, per table (no use, nothing evicted).

        >>> c = RowCache(3, row_bytes=4)
        >>> c.insert("t", [1, 2, 3], np.zeros((3, 1), np.float32)); _ = c.lookup("t", [1])
        >>> {t: v.tolist() for t, v in c.coldest(2).items()}
        {'t': [2, 3]}
        """
        occ = np.flatnonzero(self._slot_key >= 0)
        if n <= 0 or occ.size == 0:
            return {}
        if self._policy == "lru":
            order = np.argsort(self._last_use[occ], kind="stable")
        else:
            order = np.lexsort((self._last_use[occ], self._freq[occ]))
        keys = self._slot_key[occ[order[:n]]]
        names = {i: t for t, i in self._tables.items()}
        tidx = keys >> _ROW_BITS
        return {names[int(i)]: np.sort(keys[tidx == i] & _MAX_ROW) for i in np.unique(tidx).tolist()}

    def entries(self, table: str) -> tuple[IntArray, IntArray, IntArray]:
        """``(ids, last_use, frequency)`` of the cached rows of ``table``, sorted by id (for inspection)."""
        tidx = self._table_index(table, create=False)
        if tidx < 0:
            z = np.zeros(0, dtype=np.int64)
            return z, z, z
        occ = np.flatnonzero((self._slot_key >= 0) & ((self._slot_key >> _ROW_BITS) == tidx))
        ids = self._slot_key[occ] & _MAX_ROW
        order = np.argsort(ids)
        occ = occ[order]
        return ids[order], self._last_use[occ].copy(), self._freq[occ].copy()


class AdaptiveCapacity:
    """Cache capacity that shrinks under load and grows back when the ranker is idle.

    The ranker's cache memory budget ``B`` (bytes) is shared with the staging
    buffers of in-flight lookups.  :meth:`observe` records the rows a batch
    fetched; over the last ``window`` observations::

        load_estimate = inflight * max(window) * row_bytes
        capacity      = clamp((B - load_estimate) // row_bytes, min_capacity, max_capacity)

    with ``max_capacity = B // row_bytes`` (an idle ranker caches with its
    whole budget).  ``max`` rather than a mean makes the cache give memory
    back as soon as a burst arrives and take it again only once the burst has
    left the window (hysteresis of ``window`` batches, no oscillation).
    ``inflight`` is how many batches' staging buffers are live at once (2 with
    one batch of prefetch).  An empty window means idle (``load_estimate = 0``).

    >>> ac = AdaptiveCapacity(memory_budget_bytes=1000, row_bytes=10, window=2)
    >>> ac.capacity, ac.observe(30), ac.observe(5), ac.observe(5)
    (100, 70, 70, 95)
    """

    def __init__(
        self,
        memory_budget_bytes: int,
        row_bytes: int,
        window: int = 16,
        *,
        inflight: int = 1,
        min_capacity: int = 0,
    ) -> None:
        for name, v, lo in (
            ("memory_budget_bytes", memory_budget_bytes, 0),
            ("row_bytes", row_bytes, 1),
            ("window", window, 1),
            ("inflight", inflight, 1),
            ("min_capacity", min_capacity, 0),
        ):
            if not _is_int(v) or v < lo:
                raise ConfigError(f"{name} must be an integer >= {lo}, got {v!r}")
        self.memory_budget_bytes = int(memory_budget_bytes)
        self.row_bytes = int(row_bytes)
        self.inflight = int(inflight)
        self.max_capacity = self.memory_budget_bytes // self.row_bytes
        if min_capacity > self.max_capacity:
            raise ConfigError(f"min_capacity={min_capacity} exceeds the budget's {self.max_capacity} rows")
        self.min_capacity = int(min_capacity)
        self._window: deque[int] = deque(maxlen=int(window))

    @property
    def load_estimate(self) -> int:
        """Bytes reserved for in-flight lookups: ``inflight * max(window) * row_bytes``."""
        peak = max(self._window) if self._window else 0
        return self.inflight * peak * self.row_bytes

    @property
    def capacity(self) -> int:
        """Current target capacity in rows (formula in the class docstring)."""
        free = max(self.memory_budget_bytes - self.load_estimate, 0)
        return min(max(free // self.row_bytes, self.min_capacity), self.max_capacity)

    #: the name :meth:`observe`'s argument has in its error message
    _observed = "batch_rows"

    def observe(self, batch_rows: int) -> int:
        """Record a batch that fetched ``batch_rows`` rows; returns the new :attr:`capacity`."""
        if not _is_int(batch_rows) or batch_rows < 0:
            raise InputError(f"{self._observed} must be a non-negative integer, got {batch_rows!r}")
        self._window.append(int(batch_rows))
        return self.capacity

    def reset(self) -> None:
        """Forget the window (idle): capacity returns to ``max_capacity``."""
        self._window.clear()

    def apply(self, cache: RowCache) -> int:
        """Resize ``cache`` to :attr:`capacity` (evicting per policy when shrinking); returns it."""
        cap = self.capacity
        cache.resize(cap)
        return cap
