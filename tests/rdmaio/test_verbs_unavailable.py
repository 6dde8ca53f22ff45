"""The verbs transport on a machine that cannot run it (no RDMA device, or built without libibverbs).

These tests run on every host; the ones that need the device to be missing skip
inside the Soft-RoCE VM (where ``tests/rdmaio/test_conformance.py -k verbs`` runs).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

import rdmaio
from rdmaio.transports import _ibv as _verbs

NO_DEVICE = rdmaio.available_transports()["verbs"]
needs_no_device = pytest.mark.skipif(NO_DEVICE is None, reason="an active RDMA device exists here")


@needs_no_device
def test_explicit_verbs_raises_with_the_reason() -> None:
    with pytest.raises(rdmaio.TransportUnavailableError) as info:
        rdmaio.Engine(transport="verbs")
    msg = str(info.value)
    assert "verbs" in msg
    assert NO_DEVICE is not None and NO_DEVICE in msg
    # the reason says what is missing: a device, the library, or the headers at build time
    assert any(s in msg for s in ("no active RDMA device", "libibverbs")), msg


@needs_no_device
def test_auto_falls_back_to_tcp() -> None:
    engine = rdmaio.Engine(transport="auto")
    assert engine.transport == "tcp"
    engine.abort()


@needs_no_device
async def test_auto_engine_works_end_to_end() -> None:
    async with rdmaio.Engine() as a, rdmaio.Engine() as b:
        data = bytearray(b"0123456789abcdef")
        a.expose("d", a.register(data))
        lst = await a.listen()
        async with await b.connect("127.0.0.1", lst.port) as ep:
            out = bytearray(16)
            await ep.read(b.register(out), 0, await ep.remote_key("d"), 0, 16)
    assert out == data


def test_built_without_headers_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_verbs, "_ext", None)
    monkeypatch.setitem(sys.modules, "rdmaio._native._rdmaio_verbs", None)  # import now fails
    reason = rdmaio.available_transports()["verbs"]
    assert reason is not None and "without libibverbs headers" in reason and "libibverbs-dev" in reason
    with pytest.raises(rdmaio.TransportUnavailableError, match="libibverbs-dev"):
        rdmaio.Engine(transport="verbs")
    engine = rdmaio.Engine(transport="auto")
    assert engine.transport == "tcp"
    engine.abort()


def test_bad_device_arguments_are_usage_errors() -> None:
    for kwargs in ({"device": ""}, {"port": 0}, {"port": "1"}, {"gid_index": -1}, {"device": 7}):
        with pytest.raises(rdmaio.UsageError):
            rdmaio.Engine(transport="verbs", **kwargs)  # type: ignore[arg-type]


def test_importing_rdmaio_loads_no_verbs_library() -> None:
    code = ("import sys, rdmaio\n"
            "assert 'rdmaio._native._rdmaio_verbs' not in sys.modules\n"
            "assert not any('pyverbs' in m for m in sys.modules)\n"
            "print(open('/proc/self/maps').read().count('libibverbs'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"
