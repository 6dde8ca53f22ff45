"""The native parts of :class:`~flexemr.core.cache.RowCache`: its hash index, its LRU order, a pooled lookup's probe.

The C code is ``flexemr/_native/cache.c`` (contract in ``cache.h``); every
array is numpy's, passed by pointer, and the calls release the GIL (cffi).

* :class:`_HashIndex` -- open addressing, linear probing, tombstones, rebuilt
  when half full: ``(table, row)`` key -> slot;
* :class:`_LruLog` -- the LRU order kept incrementally: ``(tick, slot)``
  pairs appended in tick order whenever a slot is used, stale pairs dropped
  lazily; eviction pops the oldest current pairs (O(victims), not a
  selection over every cached row);
* :func:`probe_split` -- a pooled lookup's occurrences deduplicated (hash, no
  sort), probed (each distinct id one use) and split into hits (pooled from
  the cache's arena), admitted misses (read, then cached) and the rest, in
  one pass; it also gives every miss (admitted or not) by bag, for one raw
  read per table.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from .._native._flexemr_cache import ffi as _ffi
from .._native._flexemr_cache import lib as _lib
from .errors import InputError

__all__ = ["NOT_SORTED", "Split", "insert_lru", "probe_split"]

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

_EMPTY = -1
_TOMB = -2
#: LRU log entries beyond 4 per slot before it is compacted (tests make it 0)
_LOG_SLACK = 1024


class Split(NamedTuple):
    """What :meth:`RowCache.probe_split` returns: a pooled lookup's occurrences by what the cache does with them."""

    hit_slots: IntArray                         #: cache slots of the hit occurrences, in order
    hit_offsets: IntArray                       #: their bag offsets
    hit_weights: npt.NDArray[np.float32] | None  #: their weights (with weights)
    admitted: IntArray                          #: positions of the admitted occurrences (read, then cached)
    admitted_offsets: IntArray                  #: their bag offsets
    served: BoolArray                           #: per occurrence: a hit or admitted
    distinct: int                               #: distinct ids
    distinct_hits: int                          #: distinct ids cached
    rest: int                                   #: occurrences neither hit nor admitted
    rest_in_multi: int                          #: of those, the ones in bags holding 2 or more of them
    miss_positions: IntArray                    #: positions of every miss (admitted or not), by bag
    miss_offsets: IntArray                      #: their bag offsets (one raw read per table for all its misses)


def _p64(a: npt.NDArray[Any]) -> Any:
    """``int64_t *`` to a contiguous int64 array (for the native calls; ``from_buffer``: ~0.3 us)."""
    return _ffi.from_buffer("int64_t[]", a)


def _p8(a: npt.NDArray[Any]) -> Any:
    return _ffi.from_buffer("uint8_t[]", a)


def _pf(a: npt.NDArray[Any] | None) -> Any:
    return _ffi.NULL if a is None else _ffi.from_buffer("float[]", a)


class _Ptrs:
    """``int64_t *`` to long-lived arrays (the index, the slots' arrays, the LRU log), by role, kept while the
    role's array is the same object: a probe passes a dozen of them, at ~0.3 us each to make."""

    __slots__ = ("_d",)

    def __init__(self) -> None:
        self._d: dict[str, tuple[npt.NDArray[Any], Any]] = {}

    def __call__(self, role: str, a: npt.NDArray[Any], ctype: str = "int64_t[]") -> Any:
        e = self._d.get(role)
        if e is None or e[0] is not a:
            e = self._d[role] = (a, _ffi.from_buffer(ctype, a))
        return e[1]


class _HashIndex:
    """Open-addressing map from non-negative int64 keys to int64 values (native: ``flexemr/_native/cache.c``)."""

    def __init__(self, min_entries: int) -> None:
        self._alloc(min_entries)
        #: pointers to this index's arrays and its cache's (probe_split)
        self.ptrs = _Ptrs()
        self._counts: IntArray = np.zeros(4, dtype=np.int64)
        self._tail = _ffi.new("int64_t *")
        self._cells = _ffi.new("int64_t[3]")  # insert_lru's head, tail, free count
        self._iscratch: IntArray = np.empty(0, dtype=np.int64)

    def _alloc(self, min_entries: int) -> None:
        size = 8
        while size < 2 * max(min_entries, 1):
            size *= 2
        self.size = size
        self.mask = size - 1
        self.shift = 64 - size.bit_length() + 1
        self.keys: IntArray = np.full(size, _EMPTY, dtype=np.int64)
        self.vals: IntArray = np.zeros(size, dtype=np.int64)
        self.live = 0
        self.used = 0  # live + tombstones
        self._scratch: tuple[IntArray, ...] = ()
        self._scratch_ptrs: tuple[Any, ...] = ()

    def scratch(self, n: int) -> tuple[IntArray, IntArray, IntArray, IntArray, IntArray]:
        """:func:`probe_split`'s working arrays for ``n`` occurrences, kept between calls (no allocation per
        lookup): the dedup table's keys and values (a power of two >= ``2 n`` entries) and three of ``n``."""
        size = 8
        while size < 2 * n:
            size *= 2
        if not self._scratch or self._scratch[0].size < size:
            self._scratch = (np.empty(size, np.int64), np.empty(size, np.int64), np.empty(size // 2, np.int64),
                             np.empty(size // 2, np.int64), np.empty(size // 2, np.int64))
            self._scratch_ptrs = tuple(_p64(a) for a in self._scratch)
        d, i, a, b, c = self._scratch
        return d[:size], i[:size], a, b, c

    def positions(self, keys: IntArray) -> IntArray:
        """Table position of every key, ``-1`` when absent."""
        keys = np.ascontiguousarray(keys, dtype=np.int64)
        result = np.empty(keys.size, dtype=np.int64)
        if keys.size == 0 or self.live == 0:
            result.fill(-1)
            return result
        _lib.fxc_find(_p64(self.keys), self.mask, self.shift, _p64(keys), keys.size, _p64(result))
        return result

    def get(self, keys: IntArray) -> IntArray:
        """Value of every key, ``-1`` when absent."""
        p = self.positions(keys)
        out = np.full(keys.size, -1, dtype=np.int64)
        ok = p >= 0
        out[ok] = self.vals[p[ok]]
        return out

    def probe(self, ids: IntArray, key_base: int, tick0: int, last_use: IntArray, freq: IntArray,
              log: _LruLog | None) -> tuple[IntArray, int]:
        """Slots of keys ``key_base | ids`` (``-1``: absent) and the number of hits; every hit is a use
        (last use ``tick0 + i``, one more in its frequency, appended to ``log``)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        out = np.empty(ids.size, dtype=np.int64)
        if ids.size == 0 or self.live == 0:
            out.fill(-1)
            return out, 0
        if log is None:
            nh = _lib.fxc_probe(_p64(self.keys), _p64(self.vals), self.mask, self.shift, _p64(ids), ids.size, key_base,
                                tick0, _p64(last_use), _p64(freq), _p64(out), _ffi.NULL, _ffi.NULL, _ffi.NULL)
        else:
            log.room(ids.size)
            tail = _ffi.new("int64_t *", log.tail)
            nh = _lib.fxc_probe(_p64(self.keys), _p64(self.vals), self.mask, self.shift, _p64(ids), ids.size, key_base,
                                tick0, _p64(last_use), _p64(freq), _p64(out), _p64(log.ticks), _p64(log.slots), tail)
            log.tail = int(tail[0])
        return out, int(nh)

    def put_absent(self, keys: IntArray, vals: IntArray) -> None:
        """Insert distinct keys known to be absent."""
        if keys.size == 0:
            return
        if self.used + keys.size > self.size // 2:
            self._rehash(self.live + keys.size)
        keys = np.ascontiguousarray(keys, dtype=np.int64)
        vals = np.ascontiguousarray(vals, dtype=np.int64)
        self.used += int(_lib.fxc_put(_p64(self.keys), _p64(self.vals), self.mask, self.shift, _p64(keys),
                                      _p64(vals), keys.size))
        self.live += keys.size

    def delete(self, keys: IntArray) -> None:
        """Remove distinct keys (absent ones are ignored)."""
        if keys.size == 0 or self.live == 0:
            return
        keys = np.ascontiguousarray(keys, dtype=np.int64)
        self.live -= int(_lib.fxc_delete(_p64(self.keys), self.mask, self.shift, _p64(keys), keys.size))

    def _rehash(self, min_entries: int) -> None:
        live = self.keys >= 0
        keys, vals = self.keys[live], self.vals[live]
        self._alloc(max(min_entries, 1) * 2)
        self.put_absent(keys, vals)


class _LruLog:
    """The LRU order of a cache's slots, kept incrementally (``cache.h``: "LRU log").

    ``(tick, slot)`` pairs in tick order are appended whenever a slot's last use is set; stale pairs
    (the slot used again later, or freed) are dropped lazily.  Eviction pops the oldest current pairs,
    so it costs O(victims + stale pairs), not a selection over every cached row.
    """

    def __init__(self, capacity: int) -> None:
        self._reset(capacity)

    def _reset(self, capacity: int) -> None:
        self.capacity = capacity
        self.ticks: IntArray = np.zeros(4 * capacity + _LOG_SLACK, dtype=np.int64)
        self.slots: IntArray = np.zeros_like(self.ticks)
        self.head = 0
        self.tail = 0
        self.protect = np.zeros(capacity, dtype=np.uint8)

    def room(self, n: int, slot_key: IntArray | None = None, last_use: IntArray | None = None) -> None:
        """Make room for ``n`` more pairs (compacting, then growing)."""
        if self.tail + n <= self.ticks.size:
            return
        if slot_key is not None and last_use is not None:
            self.compact(slot_key, last_use)
        if self.tail + n > self.ticks.size:
            size = max(2 * self.ticks.size, self.tail + n + self.capacity)
            for name in ("ticks", "slots"):
                old = getattr(self, name)
                new = np.zeros(size, dtype=np.int64)
                new[: self.tail] = old[: self.tail]
                setattr(self, name, new)

    def compact(self, slot_key: IntArray, last_use: IntArray) -> None:
        """Drop the stale pairs, moving the current ones to the front."""
        self.tail = int(_lib.fxc_lru_compact(_p64(self.ticks), _p64(self.slots), self.head, self.tail,
                                             _p64(last_use), _p64(slot_key)))
        self.head = 0

    def append(self, ticks: IntArray, slots: IntArray, slot_key: IntArray, last_use: IntArray) -> None:
        """Append pairs (``ticks`` non-decreasing and newer than every pair logged)."""
        n = int(slots.size)
        self.room(n, slot_key, last_use)
        self.ticks[self.tail : self.tail + n] = ticks
        self.slots[self.tail : self.tail + n] = slots
        self.tail += n

    def sort_from(self, start: int) -> None:
        """Restore tick order of the pairs from ``start`` (appended by one insert in two runs)."""
        lo = max(start, self.head)
        if self.tail - lo > 1:
            seg = slice(lo, self.tail)
            order = np.argsort(self.ticks[seg], kind="stable")
            self.ticks[seg] = self.ticks[seg][order]
            self.slots[seg] = self.slots[seg][order]

    def rebuild(self, slot_key: IntArray, last_use: IntArray) -> None:
        """Relog every occupied slot from its last use (after a resize)."""
        occ = np.flatnonzero(slot_key >= 0)
        occ = occ[np.argsort(last_use[occ], kind="stable")]
        self._reset(slot_key.size)
        self.append(last_use[occ], occ, slot_key, last_use)

    def victims(self, k: int, protect: IntArray, slot_key: IntArray, last_use: IntArray) -> IntArray:
        """Pop the ``k`` least recently used occupied slots not in ``protect`` (fewer if there are not enough)."""
        out = np.empty(max(k, 0), dtype=np.int64)
        if k <= 0:
            return out
        self.protect[protect] = 1
        head = _ffi.new("int64_t *", self.head)
        found = _lib.fxc_lru_victims(_p64(self.ticks), _p64(self.slots), head, self.tail, _p64(last_use),
                                     _p64(slot_key), _p8(self.protect), k, _p64(out))
        self.protect[protect] = 0
        self.head = int(head[0])
        return out[: int(found)]


#: :func:`insert_lru`'s answer when the ids are not sorted unique ``[0, max_id]`` ids (nothing changed)
NOT_SORTED = -2


def insert_lru(index: _HashIndex, lru: _LruLog, key_base: int, ids: IntArray, payload: npt.NDArray[np.uint8],
               arena: npt.NDArray[np.uint8], slot_key: IntArray, last_use: IntArray, freq: IntArray,
               free: IntArray, nfree: int, tick0: int, max_id: int) -> tuple[int, int, int] | int:
    """An LRU cache's insert of contiguous int64 ``ids`` (keys ``key_base | id``; no more than its capacity) in
    one native pass (``fxc_insert``): ``(nfree after it, new keys, evictions)``; :data:`NOT_SORTED` when the ids
    are not strictly increasing within ``[0, max_id]`` (nothing changed: the caller inserts by itself), or ``-1``
    when the log fell short of victims (not expected; the log was consumed: the caller relogs and inserts by
    itself).  The long-lived arrays' pointers and the working space are kept between calls."""
    n = int(ids.size)
    lru.room(n, slot_key, last_use)
    if index.used + n > index.size // 2:
        index._rehash(index.live + n)
    if index._iscratch.size < 3 * n:
        index._iscratch = np.empty(max(3 * n, 2 * index._iscratch.size), dtype=np.int64)
    cells, ptrs, counts = index._cells, index.ptrs, index._counts
    cells[0], cells[1], cells[2] = lru.head, lru.tail, nfree
    rc = _lib.fxc_insert(ptrs("keys", index.keys), ptrs("vals", index.vals), index.mask, index.shift, key_base,
                         _p64(ids), n, _p8(payload), int(payload.shape[1]), ptrs("arena", arena, "uint8_t[]"),
                         int(arena.shape[1]), ptrs("slot_key", slot_key), ptrs("last_use", last_use),
                         ptrs("freq", freq), ptrs("free", free), cells + 2, tick0, ptrs("ticks", lru.ticks),
                         ptrs("slots", lru.slots), cells, cells + 1, ptrs("protect", lru.protect, "uint8_t[]"),
                         max_id, ptrs("iscratch", index._iscratch), ptrs("counts", counts))
    if rc == NOT_SORTED:
        return NOT_SORTED
    lru.head = int(cells[0])
    if rc < 0:
        return -1
    lru.tail = int(cells[1])
    new, evicted, took_empty = counts[:3].tolist()
    index.live += new - evicted
    index.used += took_empty
    return int(cells[2]), new, evicted


def probe_split(index: _HashIndex, lru: _LruLog | None, slot_key: IntArray, last_use: IntArray, freq: IntArray,
                base: int, tick0: int, a64: IntArray, offs: IntArray, w: npt.NDArray[np.float32] | None,
                admit: int, max_id: int) -> Split:
    """:meth:`RowCache.probe_split <flexemr.core.cache.RowCache.probe_split>`'s native pass over contiguous int64
    ids ``a64`` (keys ``base | id``; each checked in ``[0, max_id]`` as it is read), uses from tick ``tick0`` (the
    caller advances its clock by ``distinct``).  One native call; the long-lived arrays' pointers and the working
    arrays are kept between calls, the results share one allocation."""
    n, nb = int(a64.size), int(offs.size) - 1
    dkeys = index.scratch(n)[0]
    pk, pd, pu, pc, pi = index._scratch_ptrs
    out = np.empty(3 * n + 3 * nb + 3, np.int64)  # hit slots, admitted and miss positions; their bag offsets
    po = _p64(out)
    here = np.empty(n, dtype=np.bool_)
    hit_w = None if w is None else np.empty(n, dtype=np.float32)
    counts, ptrs = index._counts, index.ptrs
    if lru is None:
        pt = pls = tail = _ffi.NULL
    else:
        lru.room(n, slot_key, last_use)
        pt, pls, tail = ptrs("ticks", lru.ticks), ptrs("slots", lru.slots), index._tail
        tail[0] = lru.tail
    nh = _lib.fxc_probe_split(
        ptrs("keys", index.keys), ptrs("vals", index.vals), index.mask, index.shift, base, tick0,
        ptrs("last_use", last_use), ptrs("freq", freq), pt, pls, tail, _p64(a64), n, _p64(offs), nb, _pf(w),
        int(admit), max_id, pk, pd, int(dkeys.size) - 1, pu, pc, pi, po, po + 3 * n, _pf(hit_w), po + n,
        po + 3 * n + nb + 1, po + 2 * n, po + 3 * n + 2 * nb + 2, _p8(here), ptrs("counts", counts))
    if nh < 0:
        if nh == -2:
            raise InputError(f"ids must be in [0, {max_id + 1}): ids[{int(counts[0])}] is not")
        raise InputError(f"offsets must be non-decreasing from 0 to {n}")
    if lru is not None:
        lru.tail = int(tail[0])
    nu, uh, na, multi = counts.tolist()
    nr = n - nh - na
    o = 3 * n + nb + 1
    return Split(out[:nh], out[3 * n : o], None if hit_w is None else hit_w[:nh], out[n : n + na], out[o : o + nb + 1],
                 here, nu, uh, nr, multi, out[2 * n : 3 * n - nh], out[o + nb + 1 :])
