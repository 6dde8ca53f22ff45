"""Load-aware replica reads: measured per-server load, and which replica(s) a shard's reads go to.

With ``ClientOptions(balanced_reads=True)`` (the default) a batch may read a
shard from any in-service replica (``docs/locality.md``, "Load-aware replica
reads").  The choice weighs what this client measures of every server:

* **outstanding work** -- bytes and reads of the requests sent to it and not
  yet completed, as *work units*: ``bytes + READ_COST * reads + REQUEST_COST``
  per request (a read and a request cost the server about as much as that
  many bytes: headers, one lookup of the key, one completion);
* **seconds per unit** -- an EWMA of ``latency / (work ahead + own work)``
  over completed requests: the measured inverse service rate of the path to
  the server (its link, its CPU, queueing in between).  A latency EWMA that
  is normalised by the work it covered compares servers fairly whatever the
  size of the requests they got.

The predicted completion time of ``w`` more units on server ``s`` is
``(outstanding(s) + w) * spu(s)``.  A shard's reads of a batch go to the
replica with the smallest prediction; when they are larger than
``split_bytes`` they are split over the replicas so that every replica used
finishes at the same predicted time (water filling), which spreads one hot
shard over all its replicas.

A request still outstanding is evidence too: a server whose oldest
outstanding request has waited ``age`` seconds behind ``units`` of work
serves at most ``units / age`` per second.  Once that bound exceeds
``STALL_FACTOR`` (4) times the estimate -- the request is late by far, not
by the usual jitter -- the bound is the estimate.  A server that stops
answering (stalled, its link cut) thus loses traffic while nothing
completes on it, not only once its requests complete late.

A server not used for a while keeps an old estimate: the estimate decays,
with half-life ``half_life`` seconds, towards the best estimate of any
server, so it is tried again (and measured anew) once it may have recovered.

Moving reads is live migration of traffic: nothing in flight is touched
(each request completes on the server it was sent to); only the next
requests are routed elsewhere.  Every time the replica set serving a shard
changes from one batch to the next, ``LocalityMetrics.replica_moves`` counts
it; reads sent to a replica other than the shard's primary are counted in
``off_primary_reads``.

Versioned tables keep their guarantees: the candidates of a shard are the
replicas that serve reads (``Peers.serving``), and within a batch only the
replicas its control words show in service (``allowed``,
:meth:`flexemr.client.coherence.Coherence.check_members`); rows from any other
replica are read again.

>>> t = LoadTracker(clock=lambda: 0.0)
>>> t.observe("a", work=1000, ahead=0, seconds=1e-3)     # a: 1 us per unit
>>> t.observe("b", work=1000, ahead=0, seconds=4e-3)     # b: 4 us per unit
>>> t.choose(["a", "b"], 500)
'a'
>>> _ = t.begin("a", 3000); t.choose(["a", "b"], 500)     # a busy: (3000 + 500) * 1 > 500 * 4
'b'
>>> [round(x) for x in t.split(["a", "b"], 5000)]        # water filling: both done at 6.4 ms
[3400, 1600]
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import count

__all__ = ["READ_COST", "REQUEST_COST", "STALL_FACTOR", "LoadTracker", "ServerLoad", "work_of"]

#: Work units (bytes) one read entry costs beyond its payload.
READ_COST = 64
#: Work units (bytes) one request costs beyond its reads.
REQUEST_COST = 2048
#: An outstanding request counts as evidence of a stall once it has waited this many times its prediction.
STALL_FACTOR = 4.0
#: Prior seconds per unit of a server never measured (and no other server measured): ~1 GB/s.
_PRIOR_SPU = 1e-9


def work_of(nbytes: int, reads: int, requests: int = 1) -> int:
    """Work units of ``requests`` requests moving ``nbytes`` bytes in ``reads`` reads.

    >>> work_of(4096, 16)
    7168
    """
    return int(nbytes) + READ_COST * int(reads) + REQUEST_COST * int(requests)


@dataclass
class ServerLoad:
    """What this client measured of one server (a snapshot of :class:`LoadTracker`)."""

    outstanding: int = 0        #: work units sent and not completed
    outstanding_requests: int = 0
    spu: float = 0.0            #: EWMA of seconds per work unit (0: never measured)
    latency: float = 0.0        #: EWMA of request latency, seconds
    updated: float = -math.inf  #: clock of the last measurement
    requests: int = 0           #: requests completed
    work: int = 0               #: work units completed
    #: outstanding requests, oldest first: token -> (start clock, work ahead + own work)
    inflight: dict[int, tuple[float, int]] = field(default_factory=dict)


class LoadTracker:
    """Per-server load as one client sees it, and the replica choice made from it (module docstring).

    ``alpha``: weight of a new sample in the EWMAs; ``half_life``: seconds after
    which an unrefreshed estimate has moved half-way to the best server's;
    ``clock``: a monotonic clock (injectable for tests).
    """

    def __init__(self, *, alpha: float = 0.25, half_life: float = 0.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        if not half_life > 0:
            raise ValueError(f"half_life must be > 0, got {half_life!r}")
        self.alpha = float(alpha)
        self.half_life = float(half_life)
        self.clock = clock
        self.servers: dict[str, ServerLoad] = {}
        self._tokens = count()

    def _get(self, server: str) -> ServerLoad:
        s = self.servers.get(server)
        if s is None:
            s = self.servers[server] = ServerLoad()
        return s

    # ------------------------------------------------------------ accounting

    def begin(self, server: str, work: int) -> tuple[float, int, int]:
        """A request of ``work`` units is sent to ``server``: ``(start clock, work ahead of it, token)``."""
        s = self._get(server)
        ahead = s.outstanding
        s.outstanding += int(work)
        s.outstanding_requests += 1
        t0, token = self.clock(), next(self._tokens)
        s.inflight[token] = (t0, ahead + int(work))
        return t0, ahead, token

    def end(self, server: str, work: int, started: tuple[float, int, int], ok: bool = True) -> None:
        """The request :meth:`begin` returned ``started`` for completed (``ok``) or failed."""
        s = self._get(server)
        s.outstanding = max(0, s.outstanding - int(work))
        s.outstanding_requests = max(0, s.outstanding_requests - 1)
        t0, ahead, token = started
        s.inflight.pop(token, None)
        if ok:
            self.observe(server, work, ahead, self.clock() - t0)

    def observe(self, server: str, work: int, ahead: int, seconds: float) -> None:
        """One completed request: ``work`` units sent behind ``ahead`` units, ``seconds`` latency."""
        s = self._get(server)
        sample = max(seconds, 0.0) / max(int(work) + int(ahead), 1)
        a = self.alpha
        if s.requests == 0:
            s.spu, s.latency = sample, seconds
        else:
            s.spu = self._decayed(s) * (1 - a) + sample * a
            s.latency = s.latency * (1 - a) + seconds * a
        s.requests += 1
        s.work += int(work)
        s.updated = self.clock()

    # ------------------------------------------------------------- estimates

    def _best(self) -> float:
        known = [s.spu for s in self.servers.values() if s.requests]
        return min(known) if known else _PRIOR_SPU

    def _decayed(self, s: ServerLoad, best: float | None = None) -> float:
        ref = self._best() if best is None else best
        if s.requests == 0:
            est = ref
        else:
            age = max(self.clock() - s.updated, 0.0)
            est = ref + (s.spu - ref) * 0.5 ** (age / self.half_life)
        if s.inflight:  # the oldest outstanding request, late by far, bounds the rate (module docstring)
            t0, units = next(iter(s.inflight.values()))
            bound = (self.clock() - t0) / max(units, 1)
            if bound > STALL_FACTOR * est:
                est = bound
        return est

    def spu(self, server: str) -> float:
        """Seconds per work unit now assumed for ``server`` (decayed towards the best server's)."""
        return self._decayed(self._get(server))

    def predict(self, server: str, work: int) -> float:
        """Predicted seconds until ``work`` more units sent to ``server`` now would complete."""
        s = self._get(server)
        return (s.outstanding + int(work)) * self._decayed(s)

    def choose(self, candidates: Sequence[str], work: int) -> str:
        """The candidate with the smallest :meth:`predict` (ties: the first, i.e. replica order)."""
        if not candidates:
            raise ValueError("no candidate server")
        best = self._best()
        return min(candidates, key=lambda c: (self._get(c).outstanding + work) * self._decayed(self._get(c), best))

    def split(self, candidates: Sequence[str], work: int) -> list[float]:
        """Work of each candidate so that all used finish at the same predicted time (water filling).

        Candidates already busier than that level get 0.  The shares add up to ``work``.
        """
        if not candidates:
            raise ValueError("no candidate server")
        best = self._best()
        rate = [1.0 / max(self._decayed(self._get(c), best), 1e-18) for c in candidates]
        queued = [float(self._get(c).outstanding) for c in candidates]
        order = sorted(range(len(candidates)), key=lambda i: queued[i] / rate[i])
        level = 0.0
        active: list[int] = []
        for k, i in enumerate(order):
            active.append(i)
            level = (work + sum(queued[j] for j in active)) / sum(rate[j] for j in active)
            nxt = order[k + 1] if k + 1 < len(order) else None
            if nxt is None or level <= queued[nxt] / rate[nxt]:
                break
        shares = [0.0] * len(candidates)
        for i in active:
            shares[i] = max(level * rate[i] - queued[i], 0.0)
        total = sum(shares)
        return [x * work / total for x in shares] if total > 0 else [float(work)] + [0.0] * (len(candidates) - 1)

    def snapshot(self) -> dict[str, dict[str, float]]:
        """Per server: outstanding work and requests, seconds per unit (decayed), latency EWMA (seconds)."""
        return {name: {"outstanding": s.outstanding, "outstanding_requests": s.outstanding_requests,
                       "spu": self._decayed(s), "latency": s.latency, "requests": s.requests}
                for name, s in self.servers.items()}
