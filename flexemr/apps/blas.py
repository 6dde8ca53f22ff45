"""How many threads the ranker's BLAS (numpy's OpenBLAS) may start.

OpenBLAS starts one thread per CPU and lets idle ones spin for a while after
each call.  A ranker shares its cores with its event loop, rdmaio's workers
and, in the demo, the embedding servers on loopback; on the project's two
cores the spinning threads took ``flexemr demo``'s coalescing configuration
from 5,494 to 921 samples/s in a paired run.  The DLRM's matmuls are small
(one batch of a few hundred samples), so one BLAS thread loses little.

:func:`limit_threads` sets the count at run time through OpenBLAS's own entry
point, found among the libraries this process has loaded (numpy's wheels
bundle OpenBLAS under a prefixed name).  Setting ``OPENBLAS_NUM_THREADS``
works only before numpy is imported, which is too late for a CLI command.

>>> limit_threads(1) in (None, 1)   # None: no OpenBLAS in this process
True
"""

from __future__ import annotations

import argparse
import ctypes
from pathlib import Path

__all__ = ["add_option", "limit_threads"]

#: OpenBLAS's setter and getter, plain and as numpy's (scipy-openblas) wheels prefix them
_NAMES = (("openblas_set_num_threads", "openblas_get_num_threads"),
          ("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
          ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"))


def _loaded_openblas() -> list[str]:
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:                       # not Linux: leave BLAS as it is
        return []
    libs = {line.split()[-1] for line in maps.splitlines() if "openblas" in line.rsplit("/", 1)[-1].lower()}
    return sorted(p for p in libs if p.startswith("/"))


def limit_threads(n: int) -> int | None:
    """Let every loaded OpenBLAS use ``n`` threads; returns the count it reports after, or ``None`` if none is loaded.

    Imports numpy first (which loads its BLAS).  Other BLAS builds (MKL,
    BLIS, Accelerate) are left alone.
    """
    if n < 1:
        raise ValueError(f"BLAS threads must be >= 1, got {n}")
    import numpy  # noqa: F401  (loads numpy's OpenBLAS)

    after = None
    for path in _loaded_openblas():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for set_name, get_name in _NAMES:
            setter = getattr(lib, set_name, None)
            if setter is None:
                continue
            setter.argtypes, setter.restype = [ctypes.c_int], None
            setter(n)
            getter = getattr(lib, get_name, None)
            if getter is not None:
                getter.argtypes, getter.restype = [], ctypes.c_int
                after = int(getter())
            else:
                after = n
            break
    return after


def add_option(p: argparse.ArgumentParser) -> None:
    """``--blas-threads N`` (default 1; 0 leaves OpenBLAS's own count) for the commands that run the DLRM."""
    p.add_argument("--blas-threads", type=int, default=1, metavar="N",
                   help="threads of numpy's OpenBLAS for the DLRM (0: OpenBLAS's default, one per CPU, whose "
                        "idle threads spin on cores the ranker shares; default 1)")
