"""Which transport configurations the conformance suite runs against on this machine.

Every configuration is listed; those that cannot run here skip with the reason
(e.g. verbs without an active RDMA device outside the Soft-RoCE VM).
"""

from __future__ import annotations

import pytest

import rdmaio

CONFIGS = [("tcp", "thread"), ("tcp", "loop"), ("verbs", "thread"), ("verbs", "loop")]


def config_params() -> list[object]:
    avail = rdmaio.available_transports()
    params = []
    for transport, progress in CONFIGS:
        reason = avail.get(transport)
        marks = [pytest.mark.verbs] if transport == "verbs" else []
        if reason is not None:
            marks.append(pytest.mark.skip(reason=f"{transport} transport unavailable: {reason}"))
        params.append(pytest.param((transport, progress), id=f"{transport}-{progress}", marks=marks))
    return params
