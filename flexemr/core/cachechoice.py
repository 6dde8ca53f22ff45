"""Whether lookups use the row cache at all: :class:`CacheChoice`, judged by measured time in runs.

A cache pays when the reads it saves cost more than probing it, pooling its
hits and filling it; on a ranker short of CPU that can turn around.  The
client (:mod:`flexemr.client.pooled`) asks :meth:`CacheChoice.choose` before
every pooled lookup and files what the lookup took with
:meth:`CacheChoice.observe`.  Pure: no clock, no I/O (the caller measures).
"""

from __future__ import annotations

from collections import deque

import numpy as np

from .errors import ConfigError
from .spec import _is_int

__all__ = ["CacheChoice"]

#: A trial's run that got fewer than two timed samples ends after this many times ``run`` lookups past its
#: length (e.g. lookups of several prefetch streams at once, whose cycles were not measured): no verdict.
_PATIENCE = 1


class CacheChoice:
    """Whether lookups probe the row cache or bypass it, by measured time, judged in runs.

    The way in use (the *incumbent*; the cache, at first) serves every
    lookup but during a *trial*: a run of ``run`` lookups the other way (the
    *challenger*), then ``run`` lookups the incumbent way again.  The
    challenger takes over only when the median of its samples is below
    ``(1 - margin)`` times the median of the incumbent's samples that
    bracket it (its last ``run`` before the trial and those of the run after
    it), and every one of its samples below every one of those: a load swing
    of the machine moves both sides of the bracket, and a noisy difference of
    less than ``margin``, or a few lucky samples, change nothing.  A trial
    starts ``explore_every`` lookups after the last one (``warmup`` lookups
    after the first, which fill the cache); each trial the incumbent wins
    doubles that interval, up to ``max_explore_every``, so a way that keeps
    paying is questioned less and less often; a switch resets it.

    A sample (:meth:`observe`) is the time per id of one lookup, or of one
    cycle of the consumer when the lookups overlap (prefetch: the time
    between two lookups' completions); samples come in the order of the
    lookups and are filed under the way their lookup ran, except the first
    after a change of way (it still holds work of the other way).  The class
    reads no clock: the caller measures.

    >>> c = CacheChoice(warmup=3, run=3, margin=0.1, explore_every=4)
    >>> ways = []
    >>> for seconds in [1.0, 1.0, 1.0, 9.9, 0.5, 0.5, 9.9, 1.0, 1.0, 0.5]:
    ...     ways.append(c.choose()); c.observe(ways[-1], 1, seconds)
    >>> "".join("P" if w else "b" for w in ways), c.switches   # bypass measured 2x faster: it takes over
    ('PPPbbbPPPb', 1)
    """

    def __init__(self, *, warmup: int = 32, run: int = 4, margin: float = 0.2, explore_every: int = 32,
                 max_explore_every: int = 512) -> None:
        for name, v, lo in (("warmup", warmup, 0), ("run", run, 3), ("explore_every", explore_every, 1),
                            ("max_explore_every", max_explore_every, 1)):
            if not _is_int(v) or v < lo:
                raise ConfigError(f"{name} must be an integer >= {lo}, got {v!r}")
        if not 0.0 <= margin < 1.0:
            raise ConfigError(f"margin must be in [0, 1), got {margin!r}")
        self.run = int(run)
        self.margin = float(margin)
        self.explore_every = int(explore_every)
        self.max_explore_every = max(int(max_explore_every), self.explore_every)
        #: the incumbent way: True probes the cache, False bypasses it
        self.probe = True
        #: trials held, how many the challenger won, and the lookups that bypassed the cache
        self.trials = 0
        self.switches = 0
        self.bypassed = 0
        self._interval = self.explore_every
        self._next_trial = int(warmup)      # lookup number at which the next trial starts
        self._lookups = 0
        self._phase = 0                     # 0: incumbent; 1: challenger run; 2: incumbent run after it
        self._phase_left = 0
        self._before: deque[float] = deque(maxlen=self.run)
        self._challenger: list[float] = []
        self._after: list[float] = []
        self._last_way: bool | None = None

    @property
    def exploring(self) -> bool:
        """Whether a trial is under way."""
        return self._phase != 0

    def choose(self) -> bool:
        """The way of the next lookup (``True``: probe the cache)."""
        way = self._choose()
        self.bypassed += not way
        return way

    def _choose(self) -> bool:
        self._lookups += 1
        if self._phase == 0 and self._lookups > self._next_trial:
            self._phase, self._phase_left = 1, self.run
            self._challenger, self._after = [], []
        if self._phase == 1:
            if self._phase_left <= 0 and len(self._challenger) >= 2:
                self._phase, self._phase_left = 2, self.run
            elif self._phase_left <= -_PATIENCE * self.run:  # its lookups were not timed: no verdict
                self._end_trial()
            else:
                self._phase_left -= 1
                return not self.probe
        if self._phase == 2:
            if self._phase_left <= 0 and (len(self._after) >= 2 or self._phase_left <= -_PATIENCE * self.run):
                self._decide()
            else:
                self._phase_left -= 1
        return self.probe

    def observe(self, probe: bool, ids: int, seconds: float) -> None:
        """A lookup of ``ids`` ids that ran ``probe``'s way took ``seconds`` (or its consumer cycle did)."""
        changed = self._last_way is not None and self._last_way != probe
        self._last_way = probe
        if changed or ids <= 0:
            return
        v = seconds / ids
        if probe == self.probe:
            (self._after if self._phase == 2 else self._before).append(v)
        elif self._phase == 1:
            self._challenger.append(v)

    def _decide(self) -> None:
        self.trials += 1
        mine = sorted([*self._before, *self._after])
        if self._challenger and mine and max(self._challenger) < mine[0] and \
                float(np.median(self._challenger)) < (1.0 - self.margin) * float(np.median(mine)):
            self.probe = not self.probe
            self.switches += 1
            self._before = deque(self._challenger[-self.run:], maxlen=self.run)
            self._next_in(self.explore_every)
        else:
            if self._after:
                self._before = deque(self._after[-self.run:], maxlen=self.run)
            self._end_trial()

    def _end_trial(self) -> None:
        """End a trial that keeps the current way (the challenger not faster, or its lookups not timed): the next
        one comes later."""
        self._next_in(min(2 * self._interval, self.max_explore_every))

    def _next_in(self, interval: int) -> None:
        """No trial running; the next one ``interval`` lookups from now."""
        self._interval = interval
        self._phase = 0
        self._next_trial = self._lookups + interval
