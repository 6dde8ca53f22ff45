"""Soak: lookups and updates while embedding-server processes are SIGKILLed and restarted at random.

The scenario and the model of the truth are :mod:`flexemr.bench._soak` (also
``flexemr soak``).  Duration: ``FLEXEMR_SOAK_SECONDS`` (default 60).  The
summary line is printed to the terminal (also without ``-s``) and asserted:
no wrong row, no stale read, no lost update -- each counted on its own.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from flexemr.bench._soak import SoakConfig, Truth, run_soak

SECONDS = float(os.environ.get("FLEXEMR_SOAK_SECONDS", "60"))


async def test_soak_kill_restart(capsys: pytest.CaptureFixture[str]) -> None:
    res = await run_soak(SoakConfig(seconds=SECONDS))
    with capsys.disabled():
        print("\n" + res.summary())
        for reason, n in res.failure_reasons.items():
            print(f"  failure x{n}: {reason}")
    assert res.wrong_rows == 0
    assert res.stale_reads == 0
    assert res.lost_updates == 0
    assert res.kills >= (1 if SECONDS < 20 else 3)
    assert res.cached_hits > 0 and res.cached_stale_hits_reread > 0
    assert res.updates > 0 and res.lookups > 0


def test_truth_tells_wrong_rows_from_stale_ones() -> None:
    initial = np.zeros((8, 4), dtype=np.float32)
    truth = Truth(initial)
    rows = np.array([2, 3])
    truth.issue(rows, 5)
    truth.ack(rows, 5)
    snap, s0 = truth.current.copy(), truth.seq
    truth.issue(rows, 7)                                    # in flight while the read runs: both are fine
    ids = np.array([2, 3, 4])
    fine = np.vstack([truth.pattern(5, rows[:1]), truth.pattern(7, rows[1:]), initial[:1]])
    assert truth.check(ids, fine, snap, s0, truth.seq) == (0, 0)
    stale = np.vstack([initial[:1], truth.pattern(5, rows[1:]), initial[:1]])   # row 2 lost value 5
    assert truth.check(ids, stale, snap, s0, truth.seq) == (0, 1)
    wrong = np.vstack([truth.pattern(9, rows[:1]), truth.pattern(5, rows[1:]), np.ones((1, 4), np.float32)])
    assert truth.check(ids, wrong, snap, s0, truth.seq) == (2, 0)
    truth.ack(rows, 7)
    assert truth.check(ids, fine, truth.current.copy(), truth.seq, truth.seq) == (0, 1)   # 5 is superseded now
