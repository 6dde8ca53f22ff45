"""The control plane as sans-I/O state machines: one object per connection end.

Every rdmaio connection opens on the control protocol (framing:
:class:`rdmaio._wire.ControlCodec`).  Its first message says what the
connection is for — ``hello`` (a control session), ``attach`` (a queue pair's
data connection) or ``attach_reverse`` (channels' reverse queue pair).  When the
listener has a secret, it answers with a ``challenge`` and the client proves
it knows the secret (``auth``, see :mod:`rdmaio._auth`) before anything is
served.  The listener then answers ``welcome`` (the session is READY: requests
and replies follow) or ``attached`` (the socket now carries data frames and
leaves the control protocol).

Theory of operation (as in h11).  Bytes received go in with
:meth:`receive_data`; :meth:`next_event` returns the next message the
application must act on, or None when more bytes are needed; :meth:`send`
returns the bytes of a message the application sends.  What the protocol
answers by itself — the challenge, the client's ``auth``, ``pong`` — is queued
and comes out of :meth:`data_to_send`, which the glue sends after every
:meth:`next_event`.  Nothing here touches a socket or a clock.

Each end's lifecycle is two tables, ``{state: {message type: next state}}``:
messages it may receive and messages it may send in each state.  A message
with no entry raises :class:`~rdmaio.ProtocolError` ("can't handle X in
state Y") and the connection is CLOSED: every later call raises the same
error.  So are malformed messages, and failed authentication raises
:class:`~rdmaio.AuthenticationError`.

Invariants:

* with a secret, nothing but the challenge, the answer and an ``error`` passes
  before the peer proved it knows the secret; ``welcome``/``attached`` carry
  the listener's proof and the client refuses them without it;
* a message arrives in the application only if the table allows it in the
  current state, with the fields :data:`~rdmaio._wire.CONTROL_TYPES` requires;
* any input either yields messages or raises ProtocolError / AuthenticationError,
  never anything else.
"""

from __future__ import annotations

import enum
from typing import Any

from . import _auth as auth
from ._errors import AuthenticationError, ProtocolError
from ._wire import ControlCodec

__all__ = ["CLIENT_RECEIVES", "CLIENT_SENDS", "SERVER_RECEIVES", "SERVER_SENDS", "ClientProtocol",
           "ServerProtocol", "State"]

PROTOCOL = 1
MAX_QUEUE_PAIRS = 64


class State(enum.Enum):
    IDLE = "IDLE"  # nothing exchanged yet
    CHALLENGED = "CHALLENGED"  # server: challenged the client, waiting for its answer
    WAITING = "WAITING"  # client: first message sent, waiting for the answer
    AUTHENTICATING = "AUTHENTICATING"  # client: answered a challenge, waiting for the answer
    OPENING = "OPENING"  # server: the first message is the application's to answer
    READY = "READY"  # control session: requests and replies
    ATTACHED = "ATTACHED"  # data connection: the socket now carries data frames
    CLOSED = "CLOSED"


IDLE, CHALLENGED, WAITING, AUTHENTICATING = State.IDLE, State.CHALLENGED, State.WAITING, State.AUTHENTICATING
OPENING, READY, ATTACHED, CLOSED = State.OPENING, State.READY, State.ATTACHED, State.CLOSED

#: what a connection's first message is answered with
REPLY_TO_FIRST = {"hello": "welcome", "attach": "attached", "attach_reverse": "attached"}

# Control-session traffic once READY: requests one way, replies (and bye) the other.
_REQUESTS = {"get_key": READY, "channel_open": READY, "qp_reset": READY, "ping": READY, "bye": CLOSED}
_REPLIES = {"key": READY, "channel": READY, "qp_reset_ok": READY, "error": READY, "pong": READY, "bye": CLOSED}


def _table(**rows: dict[str, State]) -> dict[State, dict[str, State]]:
    """A complete table: states not named accept nothing."""
    return {s: rows.get(s.name, {}) for s in State}


#: messages the listener's end accepts from the client, per state (in CHALLENGED, anything but a
#: valid ``auth`` fails authentication)
SERVER_RECEIVES = _table(
    IDLE={"hello": OPENING, "attach": OPENING, "attach_reverse": OPENING},  # -> CHALLENGED with a secret
    CHALLENGED={"auth": OPENING},
    READY=_REQUESTS,
)
#: messages the listener's end may send, per state (the challenge and pong are the protocol's)
SERVER_SENDS = _table(
    IDLE={"error": CLOSED},
    CHALLENGED={"error": CLOSED},
    OPENING={"welcome": READY, "attached": ATTACHED, "error": CLOSED},  # whichever answers the first message
    READY=_REPLIES,
)
#: messages the client's end may send, per state (the answer to a challenge is the protocol's)
CLIENT_SENDS = _table(
    IDLE={"hello": WAITING, "attach": WAITING, "attach_reverse": WAITING},
    READY=_REQUESTS,
)
#: messages the client's end accepts from the listener, per state
CLIENT_RECEIVES = _table(
    WAITING={"challenge": AUTHENTICATING, "welcome": READY, "attached": ATTACHED, "error": CLOSED},
    AUTHENTICATING={"welcome": READY, "attached": ATTACHED, "error": CLOSED},
    READY=_REPLIES,
)


class _End:
    """What both ends share: the codec, the state, the outbox and the tables."""

    _receives: dict[State, dict[str, State]]
    _sends: dict[State, dict[str, State]]

    def __init__(self, secret: bytes | None) -> None:
        self._codec = ControlCodec()
        self._secret = secret
        self.state = IDLE
        self._outbox = bytearray()
        self._error: ProtocolError | AuthenticationError | None = None
        #: the connection's first message (hello / attach / attach_reverse), once known
        self.first: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.state.name}>"

    def _fail(self, exc: ProtocolError | AuthenticationError) -> ProtocolError | AuthenticationError:
        self.state = CLOSED
        self._error = exc
        return exc

    def _check_open(self) -> None:
        if self._error is not None:
            raise self._error

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes from the peer (any split: a message may span calls, a call may hold several)."""
        self._check_open()
        self._codec.receive_data(data)

    def data_to_send(self) -> bytes:
        """What the protocol answered by itself since the last call (send it before anything else)."""
        out = bytes(self._outbox)
        self._outbox.clear()
        return out

    def buffered(self) -> bytes:
        """Bytes received past the last message: on an attached connection, data sent too early."""
        return self._codec.buffered()

    def _transition(self, table: dict[State, dict[str, State]], t: str) -> State:
        nxt = table[self.state].get(t)
        if nxt is None:
            raise self._fail(ProtocolError(f"can't handle {t!r} in state {self.state.name}"))
        return nxt

    def _next_message(self) -> dict[str, Any] | None:
        self._check_open()
        try:
            return self._codec.next_event()
        except ProtocolError as exc:
            raise self._fail(exc) from None

    def send(self, msg: dict[str, Any]) -> bytes:
        """The bytes of ``msg``; raises ProtocolError if this end may not send it now."""
        self._check_open()
        t = msg["t"]
        nxt = self._transition(self._sends, t)
        data = self._encode(msg)
        self.state = nxt
        return data

    def _encode(self, msg: dict[str, Any]) -> bytes:
        try:
            return self._codec.encode(msg)
        except ProtocolError as exc:
            raise self._fail(exc) from None


class ServerProtocol(_End):
    """The listener's end of one accepted connection.

    ``transport`` is the listener's (a ``hello`` for another one is refused).
    Events: the first message (``hello``, ``attach``, ``attach_reverse``) in
    OPENING, to be answered with :meth:`send` (``welcome``/``attached``, which
    get the proof added, or ``error``); then, on a control session, the
    client's requests (``get_key``, ``channel_open``, ``qp_reset``, ``bye``).
    ``ping`` is answered by the protocol.
    """

    _receives = SERVER_RECEIVES
    _sends = SERVER_SENDS

    def __init__(self, transport: str, secret: bytes | None = None, nonce: bytes | None = None) -> None:
        super().__init__(secret)
        self._transport = transport
        self._nonce = nonce if nonce is not None else auth.new_nonce()
        self._proof: bytes | None = None

    def next_event(self) -> dict[str, Any] | None:
        while (msg := self._next_message()) is not None:
            t = msg["t"]
            if self.state is CHALLENGED:
                self._authenticate(msg)
                return self._opened()
            nxt = self._transition(self._receives, t)
            if self.state is IDLE:
                self.first = msg
                if self._secret is not None:  # nothing is served before the client proved the secret
                    self.state = CHALLENGED
                    self._outbox += self._encode({"t": "challenge", "nonce": self._nonce})
                    continue
                return self._opened()
            self.state = nxt
            if t == "ping":
                self._outbox += self._encode({"t": "pong"})
                continue
            return msg
        return None

    def _authenticate(self, msg: dict[str, Any]) -> None:
        assert self._secret is not None and self.first is not None
        ctx = auth.context(self.first)
        nc = msg.get("nonce")
        if (msg["t"] != "auth" or not isinstance(nc, bytes) or len(nc) != auth.NONCE_BYTES
                or not auth.verify(auth.client_mac(self._secret, self._nonce, nc, ctx), msg.get("mac"))):
            self._outbox += self._encode({"t": "error", "code": "auth", "message": "authentication failed"})
            raise self._fail(AuthenticationError(f"authentication failed for a {self.first['t']} connection"))
        self._proof = auth.server_proof(self._secret, self._nonce, nc, ctx)

    def _opened(self) -> dict[str, Any]:
        first = self.first
        assert first is not None
        self.state = OPENING
        if first["t"] == "hello":
            if first["v"] != PROTOCOL or first["transport"] != self._transport:
                raise self._fail(ProtocolError(
                    f"peer wants protocol {first['v']!r} on {first['transport']!r}; "
                    f"this listener speaks {PROTOCOL} on {self._transport!r}"))
            nqp = first["nqp"]
            if not isinstance(nqp, int) or isinstance(nqp, bool) or not 1 <= nqp <= MAX_QUEUE_PAIRS:
                raise self._fail(ProtocolError(f"nqp must be an int in 1..{MAX_QUEUE_PAIRS}"))
        return first

    def send(self, msg: dict[str, Any]) -> bytes:
        if self.state is OPENING and msg["t"] != "error":
            assert self.first is not None
            if msg["t"] != REPLY_TO_FIRST[self.first["t"]]:
                raise self._fail(ProtocolError(f"can't answer {self.first['t']!r} with {msg['t']!r}"))
            if self._proof is not None:
                msg = {**msg, "proof": self._proof}
        return super().send(msg)

    def fail(self, exc: BaseException) -> bytes:
        """The connection ends because of ``exc``: the error frame to send (if any), then CLOSED."""
        out = self.data_to_send()
        if self.state is not CLOSED or isinstance(self._error, ProtocolError):
            try:
                out += self._codec.encode({"t": "error", "code": "protocol", "message": str(exc)})
            except ProtocolError:
                pass
        self.state = CLOSED
        if self._error is None:
            self._error = ProtocolError(f"connection closed: {exc}")
        return out


class ClientProtocol(_End):
    """The client's end of one connection: :meth:`send` its first message, then events.

    During the handshake :meth:`next_event` answers a challenge by itself and
    returns the listener's ``welcome``/``attached``; a refusal raises
    (:class:`~rdmaio.AuthenticationError` or :class:`~rdmaio.ProtocolError`).
    Once READY, the events are the listener's replies.
    """

    _receives = CLIENT_RECEIVES
    _sends = CLIENT_SENDS

    def __init__(self, secret: bytes | None = None, nonce: bytes | None = None) -> None:
        super().__init__(secret)
        self._nonce = nonce if nonce is not None else auth.new_nonce()
        self._challenge: bytes | None = None

    def send(self, msg: dict[str, Any]) -> bytes:
        if self.state is IDLE:
            self.first = msg
        return super().send(msg)

    def next_event(self) -> dict[str, Any] | None:
        while (msg := self._next_message()) is not None:
            t = msg["t"]
            handshake = self.state in (WAITING, AUTHENTICATING)
            nxt = self._transition(self._receives, t)
            if handshake and t == "error":
                code, text = msg.get("code"), msg.get("message")
                if code == "auth":
                    raise self._fail(AuthenticationError(f"peer refused authentication: {text}"))
                raise self._fail(ProtocolError(f"peer refused: {text}"))
            if t == "challenge":
                self._answer(msg)
                self.state = nxt
                continue
            if handshake:
                self._check_answer(msg)
            self.state = nxt
            if t == "pong":
                continue
            return msg
        return None

    def _answer(self, msg: dict[str, Any]) -> None:
        assert self.first is not None
        if self._secret is None:
            raise self._fail(AuthenticationError("the peer requires authentication: give the engine the cluster's "
                                                 "secret (Engine(secret=...) or RDMAIO_SECRET)"))
        ns = msg["nonce"]
        if not isinstance(ns, bytes) or len(ns) != auth.NONCE_BYTES:
            raise self._fail(ProtocolError("malformed authentication challenge"))
        self._challenge = ns
        mac = auth.client_mac(self._secret, ns, self._nonce, auth.context(self.first))
        self._outbox += self._encode({"t": "auth", "nonce": self._nonce, "mac": mac})

    def _check_answer(self, msg: dict[str, Any]) -> None:
        assert self.first is not None
        expect = REPLY_TO_FIRST[self.first["t"]]
        if self._secret is not None:
            if self._challenge is None:
                raise self._fail(AuthenticationError(
                    "the peer did not authenticate itself (does it have the shared secret?)"))
            proof = auth.server_proof(self._secret, self._challenge, self._nonce, auth.context(self.first))
            if not auth.verify(proof, msg.get("proof")):
                raise self._fail(AuthenticationError("the peer could not prove it knows the shared secret"))
        if msg["t"] != expect:
            raise self._fail(ProtocolError(f"expected {expect!r} from the peer, got {msg['t']!r}"))
