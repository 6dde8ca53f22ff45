"""``python -m rdmaio.testing.guestcheck``: is numpy's sorting right on this CPU?

Run at the start of every Soft-RoCE VM job (``scripts/verbs-in-vm.sh``).  Under
qemu's TCG emulator with ``-cpu max``, numpy 2.x sorted int64/float arrays wrongly
(its AVX2 sorting kernels meet an emulation bug: ``np.unique`` and ``np.argsort``
disagreed in 184 of 300 random arrays), which made flexemr's lookups index out
of range in the guest.  The VM now runs on ``-cpu max,-avx2``
(:data:`rdmaio.testing.softroce.DEFAULT_GUEST_CPU`); this check proves it:
``np.sort``, ``np.argsort`` (quicksort, stable) and ``np.unique`` (with its
inverse) against Python's ``sorted`` on random arrays of every dtype flexemr
sorts, sizes across the SIMD thresholds.  Exit status 1, with one line per
failure, if any result differs.
"""

from __future__ import annotations

import random
import sys

import numpy as np

__all__ = ["check", "main"]

DTYPES = ("int64", "int32", "uint64", "float64", "float32")


def check(arrays: int = 300, seed: int = 0) -> list[str]:
    """Problems found (empty when numpy sorts correctly here)."""
    rng = random.Random(seed)
    problems: list[str] = []
    for i in range(arrays):
        dtype = np.dtype(DTYPES[i % len(DTYPES)])
        n = rng.choice((1, 2, 7, 16, 17, 64, 255, 256, 1000, 4097)) if i % 3 else rng.randint(1, 5000)
        hi = 2**62 if dtype.kind in "iu" and dtype.itemsize == 8 else 2**30 if dtype.kind in "iu" else 10**6
        lo = 0 if dtype.kind == "u" else -hi
        values = [rng.randint(lo, hi) for _ in range(n)]
        if i % 4 == 0:  # many duplicates
            values = [v % 97 for v in values]
        a = np.array(values).astype(dtype)
        ref = sorted(a.tolist())
        what = f"{dtype.name}[{n}]"
        if np.sort(a).tolist() != ref:
            problems.append(f"np.sort wrong on {what}")
        for kind in ("quicksort", "stable"):
            if a[np.argsort(a, kind=kind)].tolist() != ref:
                problems.append(f"np.argsort(kind={kind!r}) wrong on {what}")
        uniq, inv = np.unique(a, return_inverse=True)
        if uniq.tolist() != sorted(set(ref)) or uniq[inv.reshape(-1)].tolist() != a.tolist():
            problems.append(f"np.unique wrong on {what}")
    return problems


def main() -> int:
    problems = check()
    if problems:
        for p in problems[:20]:
            print(f"guestcheck: {p}", file=sys.stderr)
        print(f"guestcheck: numpy sorts wrongly on this CPU ({len(problems)} problems): the guest's CPU model "
              f"advertises an instruction the emulator gets wrong; see rdmaio.testing.guestcheck", file=sys.stderr)
        return 1
    print(f"guestcheck: numpy {np.__version__} sorts correctly here (sort, argsort, unique; {len(DTYPES)} dtypes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
