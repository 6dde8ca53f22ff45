"""Network namespaces for multi-host tests: :mod:`flexemr.bench._netlab` (shared with the benchmarks),
plus :func:`require`, which skips the calling test with the exact reason when namespaces cannot be
made here, or fails it under CI (``CI=true``), where the capability must exist."""

from __future__ import annotations

import os

import pytest

from flexemr.bench._netlab import (
    HostsLab,
    Netns,
    NetnsError,
    NetnsLab,
    remove_stale,
    remove_stale_hosts,
    shape_link,
    tc_unavailable,
    unavailable,
)

__all__ = ["HostsLab", "Netns", "NetnsError", "NetnsLab", "remove_stale", "remove_stale_hosts", "require",
           "require_tc", "shape_link", "unavailable"]


def _skip_or_fail(reason: str | None, what: str) -> None:
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        print(f"netns: CI must be able to {what}: {reason}")
        pytest.fail(f"{what}: unavailable in CI: {reason}")
    pytest.skip(reason)


def require(bridge: bool = False) -> None:
    """Skip the calling test when namespaces cannot be made here; under ``CI=true`` fail instead."""
    _skip_or_fail(unavailable(bridge), "create network namespaces")


def require_tc() -> None:
    """:func:`require`, and a ``tc`` token-bucket filter on a namespace's veth."""
    _skip_or_fail(tc_unavailable(), "shape veth links with tc")
