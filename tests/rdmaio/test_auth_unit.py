"""The authentication exchange, without sockets."""

from __future__ import annotations

import pytest

from rdmaio import UsageError
from rdmaio._auth import client_mac, context, new_nonce, resolve_secret, server_proof, verify


def test_macs_bind_secret_nonces_and_purpose() -> None:
    s, ns, nc = b"secret-1", new_nonce(), new_nonce()
    ctx = context({"t": "attach", "session": b"\1" * 16, "qp": 3})
    mac = client_mac(s, ns, nc, ctx)
    assert verify(client_mac(s, ns, nc, ctx), mac)
    assert not verify(client_mac(b"secret-2", ns, nc, ctx), mac)  # wrong secret
    assert not verify(client_mac(s, new_nonce(), nc, ctx), mac)  # replay against a fresh challenge
    assert not verify(client_mac(s, ns, nc, context({"t": "attach", "session": b"\1" * 16, "qp": 4})), mac)
    assert not verify(server_proof(s, ns, nc, ctx), mac)  # a client MAC is not a server proof
    assert not verify(mac, "not bytes")
    assert new_nonce() != new_nonce()


def test_resolve_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RDMAIO_SECRET", raising=False)
    assert resolve_secret(None) is None
    monkeypatch.setenv("RDMAIO_SECRET", "from-env")
    assert resolve_secret(None) == b"from-env"
    assert resolve_secret(b"explicit") == b"explicit"
    with pytest.raises(UsageError):
        resolve_secret("abc")
