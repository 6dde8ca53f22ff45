"""The transports the flexemr end-to-end tests run on.

The same tests run on tcp everywhere and on verbs where an RDMA device is
active (inside the Soft-RoCE VM in CI: ``scripts/verbs-in-vm.sh`` runs
``pytest -m verbs`` on them); elsewhere the verbs cases skip with the reason.
"""

from __future__ import annotations

import pytest

import rdmaio


def _verbs_marks() -> list[pytest.MarkDecorator]:
    reason = rdmaio.available_transports().get("verbs")
    marks = [pytest.mark.verbs]
    if reason is not None:
        marks.append(pytest.mark.skip(reason=f"verbs transport unavailable: {reason}"))
    return marks


#: ``@pytest.mark.parametrize("transport", TRANSPORTS)``: tcp, and verbs (marked ``verbs``)
TRANSPORTS = [pytest.param("tcp", id="tcp"), pytest.param("verbs", id="verbs", marks=_verbs_marks())]

