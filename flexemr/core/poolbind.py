"""Pooling requests bound to native kernel jobs in place: no Python per job of a request.

A ranker sends the same kind of pooling request batch after batch: the same
tables, shards, bag counts, id widths and weights; only the ids and offsets
(and so the ids' count) change.  :func:`~flexemr.core.poolwire.request_key`
names that kind: the request's head with the ids' counts zeroed.  A
:class:`RequestTemplate` holds the native jobs of one kind (tables, modes,
fills, where each job's values go in the response), built once from a decoded
request with every check :func:`flexemr.core.kernel.pool_many` makes.  A
:class:`BoundCall` binds each new request of that kind to a copy of those jobs
in one native call (``fxk_bind_request``: the request's layout is checked
there, its arrays are read where they lie) and pools every request bound to
it in one kernel call; ids and offsets are checked by the kernel, as always.

>>> from flexemr.core.poolwire import RequestJob, decode_request, encode_request
>>> rows = np.arange(8, dtype=np.float32).reshape(4, 2)
>>> data = b"".join(bytes(p) for p in encode_request(
...     [RequestJob("t", 0, np.array([0, 2, 3]), np.array([0, 3, 1], np.int32), None)], "sum"))
>>> req = decode_request(data)
>>> tmpl = RequestTemplate([kernel.PoolJob(rows, j.ids, j.offsets, out=np.empty((2, 2), np.float32))
...                         for j in req.jobs], [0])
>>> out = np.zeros(16, np.uint8)
>>> call = BoundCall(tmpl.n_jobs)
>>> call.bind(tmpl, data, out)
>>> call.run()
[None]
>>> out.view(np.float32).reshape(2, 2).tolist()
[[6.0, 8.0], [2.0, 3.0]]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from .._native._flexemr_kernel import ffi, lib
from . import kernel
from .errors import InputError
from .poolwire import Buffer, decode_request

__all__ = ["BoundCall", "RequestTemplate"]


class RequestTemplate:
    """The native jobs of every pooling request of one kind (module docstring).

    ``jobs``: the :class:`~flexemr.core.kernel.PoolJob` s of one request of
    that kind (checked here as :func:`~flexemr.core.kernel.pool_many` checks
    them; their ids, offsets and weights are replaced by each bound request's);
    ``out_offsets``: where job ``i``'s output starts in the buffer a request is
    bound with (:meth:`BoundCall.bind`), which must have the layout of each
    job's ``out`` (same strides, blocks, alignment) from there.  A job's offsets
    that own their memory (:func:`~flexemr.core.poolwire.decode_request` makes
    ``0 .. B`` for a job sent with one id per bag) are kept: requests of the kind
    sent that way are bound with them.
    """

    __slots__ = ("n_jobs", "_jobs", "_out_off", "_keep")

    def __init__(self, jobs: Sequence[kernel.PoolJob], out_offsets: Sequence[int]) -> None:
        if len(out_offsets) != len(jobs):
            raise InputError("a request template needs one output offset per job")
        call = kernel._Call(len(jobs))
        for i, job in enumerate(jobs):
            call.add_pool(i, job)
        self.n_jobs = len(jobs)
        self._jobs = call.jobs
        self._out_off = ffi.new("int64_t[]", [int(o) for o in out_offsets])
        # the tables the jobs point into, and the arrays of theirs that are not views of a request (e.g. the
        # offsets of one id per bag, which every request of the kind is bound with)
        self._keep = [job.rows for job in jobs] + [job.offsets for job in jobs if
                                                   isinstance(job.offsets, np.ndarray) and job.offsets.flags.owndata]


class BoundCall:
    """Requests bound to one native job array (room for ``n_jobs`` jobs), pooled by one kernel call."""

    __slots__ = ("_jobs", "_used", "_spans", "_keep")

    def __init__(self, n_jobs: int) -> None:
        self._jobs = ffi.new("fxk_job[]", max(n_jobs, 1))
        self._used = 0
        self._spans: list[tuple[int, int]] = []  # per request: (first job, jobs)
        self._keep: list[Any] = []

    def bind(self, tmpl: RequestTemplate, data: Buffer, out: npt.NDArray[np.uint8], at: int = 0) -> None:
        """Bind request ``data`` (of ``tmpl``'s kind) to the next ``tmpl.n_jobs`` jobs, its outputs at
        ``out[at + out_offsets[i]:]``; :class:`InputError` (nothing bound) when it does not fit its kind.

        ``data`` and ``out`` must stay alive and unchanged until :meth:`run` returns (they are kept)."""
        if self._used + tmpl.n_jobs > len(self._jobs):
            raise InputError("no room left in this call for the request's jobs")
        req = ffi.from_buffer("uint8_t[]", data)
        if not (out.dtype == np.uint8 and out.ndim == 1 and out.flags.c_contiguous and out.flags.writeable):
            raise InputError("the output of a bound request must be a writable contiguous uint8 array")
        rc = lib.fxk_bind_request(self._jobs + self._used, tmpl._jobs, tmpl.n_jobs, req, len(req), tmpl._out_off,
                                  ffi.from_buffer("char[]", out) + at)
        if rc != lib.FXK_OK:
            decode_request(data)  # raises the precise InputError
            raise InputError("pooling request does not fit the layout of its kind")
        self._spans.append((self._used, tmpl.n_jobs))
        self._used += tmpl.n_jobs
        self._keep += (tmpl, data, req, out)

    def run(self, threads: int | None = None) -> list[InputError | MemoryError | None]:
        """Pool every bound request in one native call (the GIL released); per request, in binding order,
        ``None`` or the error of its first failing job (ids out of range, bad offsets)."""
        rc = lib.fxk_run(self._jobs, self._used, kernel.get_threads() if threads is None else threads)
        out: list[InputError | MemoryError | None] = [None] * len(self._spans)
        if rc == lib.FXK_OK:
            return out
        for r, (first, n) in enumerate(self._spans):
            for i in range(first, first + n):
                if self._jobs[i].status != lib.FXK_OK:
                    out[r] = kernel._job_error(self._jobs[i], f"job {i - first}: ")
                    break
        return out
