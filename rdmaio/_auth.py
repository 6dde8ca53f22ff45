"""Mutual authentication of rdmaio connections with a shared secret (sans-I/O).

When an engine has a secret (``Engine(secret=...)``, or ``RDMAIO_SECRET`` in the
environment), every connection — control, queue pair, reverse queue pair — runs
this exchange before anything else is served::

    client                                  listener
      first message (hello / attach ...)  ->
                                          <-  {"t": "challenge", "nonce": Ns}
      {"t": "auth", "nonce": Nc,
       "mac": H(secret, "c" | Ns | Nc | ctx)} ->
                                              verify, else error "auth" + close
                                          <-  welcome / attached,
                                              "proof": H(secret, "s" | Nc | Ns | ctx)
      verify the proof, else abort

``H`` is HMAC-SHA256, ``Ns``/``Nc`` are fresh 32-byte nonces, and ``ctx`` binds the
MAC to what the connection is for (message type, session, queue-pair index), so a
MAC cannot be replayed on another connection or for another purpose.  A listener
without a secret sends no challenge; a client with a secret refuses a listener
that cannot prove it knows the secret.  Nothing here touches a socket.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from typing import Any

from ._errors import UsageError

__all__ = ["NONCE_BYTES", "client_mac", "context", "new_nonce", "resolve_secret", "server_proof", "verify"]

NONCE_BYTES = 32
_LABEL = b"rdmaio-auth-v1"


def resolve_secret(secret: bytes | str | None) -> bytes | None:
    """The engine's secret: the argument, else ``$RDMAIO_SECRET``, else None (no authentication).

    >>> resolve_secret("s3cret")
    b's3cret'
    """
    if secret is None:
        env = os.environ.get("RDMAIO_SECRET")
        secret = env if env else None
    if secret is None:
        return None
    if isinstance(secret, str):
        secret = secret.encode()
    if not isinstance(secret, bytes) or len(secret) < 4:
        raise UsageError("the shared secret must be at least 4 bytes (str or bytes)")
    return secret


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def context(first: dict[str, Any]) -> bytes:
    """What a connection is for, from its first message (type, session, queue pair)."""
    session = first.get("session", b"")
    qp = first.get("qp", -1)
    parts = [str(first.get("t", "")).encode(), session if isinstance(session, bytes) else b"?",
             str(qp if isinstance(qp, int) else "?").encode()]
    return b"|".join(parts)


def _mac(secret: bytes, who: bytes, a: bytes, b: bytes, ctx: bytes) -> bytes:
    return hmac.new(secret, b"|".join([_LABEL, who, a, b, ctx]), hashlib.sha256).digest()


def client_mac(secret: bytes, server_nonce: bytes, client_nonce: bytes, ctx: bytes) -> bytes:
    """The client's answer to a challenge."""
    return _mac(secret, b"c", server_nonce, client_nonce, ctx)


def server_proof(secret: bytes, server_nonce: bytes, client_nonce: bytes, ctx: bytes) -> bytes:
    """The listener's proof that it knows the secret too."""
    return _mac(secret, b"s", client_nonce, server_nonce, ctx)


def verify(expected: bytes, got: object) -> bool:
    """Constant-time comparison that also rejects non-bytes input."""
    return isinstance(got, bytes) and hmac.compare_digest(expected, got)
