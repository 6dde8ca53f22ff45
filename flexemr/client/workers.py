"""Under skew, the client moves its own queue-pair-to-worker mapping.

An :class:`rdmaio.Endpoint` has one queue pair per worker of its engine
(``Engine(workers=N)``, the default ``qp_per_worker``), each owned by one
worker (:attr:`rdmaio.Endpoint.workers`, the home worker first), and
:attr:`rdmaio.Endpoint.qp_choice` says which one carries its operations.
By default every endpoint uses its home queue pair, and homes are balanced
when the endpoints are created -- by count, not by load.  When the load is
skewed, the endpoints of the hot servers may share one worker while another
worker idles.

:class:`WorkerMap` (``ClientOptions(remap_workers=True)``, the default)
watches the load this client's :class:`~flexemr.client.load.LoadTracker`
measures per server -- work completed recently (decayed, half-life
``half_life`` seconds) plus work outstanding -- and, at most once per
``interval`` seconds (checked when a batch is routed), re-assigns the
endpoints to workers with :func:`assign`: heaviest first, each onto the
least-loaded worker that owns one of its queue pairs.  The new mapping is
applied only when it lowers the load of the busiest worker by at least
``threshold`` (25 %): two mappings can never each be that much better than
the other, so the mapping does not flap.  Applying it sets ``qp_choice`` of
every moved endpoint to its queue pair owned by the chosen worker;
operations in flight are not touched (they complete on the queue pair they
were posted on), only the next ones go to the new queue pair.  Every moved
endpoint counts one ``LocalityMetrics.worker_moves``.

Never moved: endpoints with a single queue pair, and endpoints whose
``qp_choice`` is not ``"home"`` and was not set here (a choice configured
through ``engine_options`` or by hand); their load still counts on their
worker.

>>> assign({"a": 10.0, "b": 9.0, "c": 1.0}, {"a": (0, 1), "b": (0, 1), "c": (1, 0)},
...        {"a": 0, "b": 0, "c": 1})
{'b': 1}
>>> assign({"a": 10.0, "b": 9.0}, {"a": (0, 1), "b": (1, 0)}, {"a": 0, "b": 1})   # balanced: no move
{}
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TypeVar

import rdmaio

from ..core.metrics import LocalityMetrics
from .load import LoadTracker
from .peers import Peers

__all__ = ["WorkerMap", "assign"]

K = TypeVar("K", bound=Hashable)

#: The busiest worker's load must drop by at least this fraction for a new mapping to be applied.
THRESHOLD = 0.25


def assign(loads: Mapping[K, float], workers: Mapping[K, Sequence[int]], current: Mapping[K, int], *,
           fixed: Mapping[K, int] | None = None, threshold: float = THRESHOLD,
           min_load: float = 0.0) -> dict[K, int]:
    """The endpoints to move: ``{endpoint: new worker}`` (empty: keep the mapping).

    ``loads``: load of every endpoint; ``workers``: the workers each movable
    endpoint may use (those owning one of its queue pairs); ``current``: the
    worker each movable endpoint uses now; ``fixed``: endpoints that are not
    moved, and their worker (their load counts there).  Greedy: the movable
    endpoints, heaviest first (ties: in ``workers`` order), each go to the
    least-loaded of their workers, the current one on a tie.  The result is
    applied only when the total load is at least ``min_load`` and the
    busiest worker's load drops by at least ``threshold`` (hysteresis).
    """
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold must be in [0, 1), got {threshold!r}")
    fixed = fixed or {}
    before: dict[int, float] = {}
    after: dict[int, float] = {}
    for key, ws in workers.items():
        for w in ws:
            before.setdefault(w, 0.0)
            after.setdefault(w, 0.0)
    for key, w in fixed.items():
        load = float(loads.get(key, 0.0))
        before[w] = before.get(w, 0.0) + load
        after[w] = after.get(w, 0.0) + load
    for key in workers:
        w = current[key]
        before[w] = before.get(w, 0.0) + float(loads.get(key, 0.0))
    total = sum(before.values())
    if not before or total <= 0 or total < min_load:
        return {}
    order = sorted(workers, key=lambda k: -float(loads.get(k, 0.0)))  # stable: ties keep mapping order
    chosen: dict[K, int] = {}
    for key in order:
        cur = current[key]
        best = min(workers[key], key=lambda w: (after[w], w != cur))
        after[best] += float(loads.get(key, 0.0))
        chosen[key] = best
    if max(after.values()) > (1.0 - threshold) * max(before.values()):
        return {}
    return {k: w for k, w in chosen.items() if w != current[k]}


class WorkerMap:
    """Moves a client's bulk endpoints between engine workers under skew (module docstring).

    :meth:`tick` is cheap (a clock read) until ``interval`` seconds have
    passed since the last :meth:`rebalance`.
    """

    def __init__(self, peers: Peers, tracker: LoadTracker, metrics: LocalityMetrics, *,
                 interval: float = 0.1, half_life: float = 0.5, threshold: float = THRESHOLD,
                 min_load: float = 1 << 16, clock: Callable[[], float] = time.monotonic) -> None:
        self.peers = peers
        self.tracker = tracker
        self.metrics = metrics
        self.interval = float(interval)
        self.half_life = float(half_life)
        self.threshold = float(threshold)
        self.min_load = float(min_load)
        self.clock = clock
        self._next = -math.inf
        self._last = -math.inf
        self._seen: dict[str, int] = {}      # server -> tracker work completed at the last rebalance
        self._recent: dict[str, float] = {}  # server -> decayed work completed
        #: endpoints whose qp_choice was set here, and the value set
        self._set: weakref.WeakKeyDictionary[rdmaio.Endpoint, str | int] = weakref.WeakKeyDictionary()

    def tick(self) -> None:
        """Called for every batch: :meth:`rebalance` once ``interval`` seconds have passed."""
        now = self.clock()
        if now >= self._next:
            self._next = now + self.interval
            self.rebalance()

    def loads(self) -> dict[str, float]:
        """Per server: recent completed work (decayed) plus outstanding work, in work units."""
        now = self.clock()
        decay = 0.5 ** (max(now - self._last, 0.0) / self.half_life) if self._last > -math.inf else 0.0
        self._last = now
        out: dict[str, float] = {}
        for name, s in self.tracker.servers.items():
            delta = max(s.work - self._seen.get(name, 0), 0)
            self._seen[name] = s.work
            recent = self._recent[name] = self._recent.get(name, 0.0) * decay + delta
            out[name] = recent + s.outstanding
        return out

    def rebalance(self) -> int:
        """Re-map the endpoints if the load is skewed over the workers; returns the endpoints moved."""
        loads = self.loads()
        movable: dict[str, tuple[int, ...]] = {}
        current: dict[str, int] = {}
        fixed: dict[str, int] = {}
        eps: dict[str, rdmaio.Endpoint] = {}
        for name, peer in self.peers.peers.items():
            ep = peer.ep
            if ep is None or ep.closed or ep.broken:
                continue
            ws = ep.workers
            choice = ep.qp_choice
            if choice == "home":
                qp = 0
            elif isinstance(choice, int) and self._set.get(ep) == choice:
                qp = choice
            else:  # a choice made elsewhere: its load stays where it is
                if isinstance(choice, int) and 0 <= choice < len(ws):
                    fixed[name] = ws[choice]
                continue
            if len(ws) < 2:
                if ws:
                    fixed[name] = ws[0]
                continue
            movable[name] = ws
            current[name] = ws[qp]
            eps[name] = ep
        moves = assign(loads, movable, current, fixed=fixed, threshold=self.threshold, min_load=self.min_load)
        for name, worker in moves.items():
            ep = eps[name]
            qp = movable[name].index(worker)
            new: str | int = "home" if qp == 0 else qp
            ep.qp_choice = new
            self._set[ep] = new
            self.metrics.worker_moves += 1
        return len(moves)
