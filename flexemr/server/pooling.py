"""The server side of the pooling RPC: :class:`PoolService` on the ``"flexemr/pool"`` channel.

A ranker sends the ids of a batch's rows this server holds, grouped by bag
(wire format: :mod:`flexemr.core.poolwire`); the service gathers the rows
from the shard arrays and answers with one partial sum (or max) per bag
(:func:`~flexemr.core.pooling.server_partial_pool`), which the ranker merges
(hierarchical pooling, ``docs/locality.md``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import rdmaio

from ..core.errors import InputError, TransportError
from ..core.plan import Shard, ShardingPlan
from ..core.pooling import accumulation_dtype, server_partial_pool
from ..core.poolwire import Buffer, FrameAssembler, decode_request, encode_error, encode_response, frames

__all__ = ["PoolService"]

log = logging.getLogger(__name__)

IntArray = npt.NDArray[np.int64]


class PoolService:
    """Server side: answers pooling requests from the shard arrays a server holds.

    Only full-width shards (all columns) take part; a request naming a table
    whose rows this server does not hold in full width is an error response.

    >>> from flexemr.core.spec import TableSpec
    >>> from flexemr.core.poolwire import decode_response, encode_request
    >>> plan = ShardingPlan.row_wise([TableSpec("t", 4, 2)], ["s0", "s1"])
    >>> sh = plan.shards["t"][1]                         # rows 2..3 on s1
    >>> svc = PoolService(plan, [sh], {sh.region_name: np.array([[1., 2.], [3., 4.]], np.float32)})
    >>> req = encode_request("t", np.array([2, 3, 3]), np.array([2, 1]), None, "sum", num_rows=4)
    >>> decode_response(b"".join(bytes(p) for p in svc.handle(b"".join(bytes(p) for p in req)))).tolist()
    [[4.0, 6.0], [3.0, 4.0]]
    """

    def __init__(self, plan: ShardingPlan, shards: Sequence[Shard], arrays: dict[str, npt.NDArray[Any]]) -> None:
        by_table: dict[str, list[Shard]] = {}
        for sh in shards:
            if sh.col_start == 0 and sh.col_end == plan.spec(sh.table).dim:
                by_table.setdefault(sh.table, []).append(sh)
        self._plan = plan
        self._tables: dict[str, tuple[IntArray, IntArray, list[npt.NDArray[Any]]]] = {}
        for table, lst in by_table.items():
            lst.sort(key=lambda s: s.row_start)
            self._tables[table] = (np.array([s.row_start for s in lst], dtype=np.int64),
                                   np.array([s.row_end for s in lst], dtype=np.int64),
                                   [arrays[s.region_name] for s in lst])
        self.requests = 0

    def _gather(self, table: str, ids: IntArray) -> npt.NDArray[Any]:
        entry = self._tables.get(table)
        if entry is None:
            raise InputError(f"this server holds no full-width rows of table {table!r}")
        starts, ends, arrays = entry
        if len(arrays) == 1:
            local = ids - starts[0]
            if ids.size and (int(local.min()) < 0 or int(ids.max()) >= int(ends[0])):
                raise InputError(f"table {table!r}: ids outside this server's rows")
            return arrays[0][local]
        band = np.searchsorted(starts, ids, side="right") - 1
        if ids.size and (int(band.min()) < 0 or bool((ids >= ends[np.maximum(band, 0)]).any())):
            raise InputError(f"table {table!r}: ids outside this server's rows")
        spec = self._plan.spec(table)
        out = np.empty((ids.size, spec.dim), dtype=spec.np_dtype)
        for i, arr in enumerate(arrays):  # bands of this server: a handful
            m = band == i
            out[m] = arr[ids[m] - starts[i]]
        return out

    def handle(self, data: Buffer) -> list[Buffer]:
        """Answer one request (error responses for bad requests)."""
        self.requests += 1
        try:
            req = decode_request(data)
            spec = self._plan.spec(req.table)
            rows = self._gather(req.table, req.ids)
            k = req.lengths.size
            bags = np.repeat(np.arange(k, dtype=np.int64), req.lengths)
            part = server_partial_pool(rows, bags, k, req.weights, with_max=req.op == "max",
                                       dtype=accumulation_dtype(spec.np_dtype))
            values = part.max if req.op == "max" else part.sum
            assert values is not None
            return encode_response(values)
        except Exception as exc:  # a bad request must not kill the channel
            return encode_error(f"{type(exc).__name__}: {exc}")

    async def serve(self, ch: rdmaio.Channel) -> None:
        """The channel handler: requests in, responses out, until the peer closes."""
        asm = FrameAssembler()
        try:
            async for frame in ch:
                msg = asm.add(frame)
                if msg is not None:
                    for head, pieces in frames(msg[0], self.handle(msg[1]), ch.max_message):
                        await ch.send([head, *pieces])
        except (rdmaio.RdmaioError, TransportError) as exc:
            log.debug("pooling channel ended: %s", exc)
