"""The control plane's state machines, byte by byte: no sockets, no event loop.

A client and a server end talk over a fake link (h11's helpers do the same):
whole messages, then byte by byte, then several at once.  Every message in a
state its table has no entry for is refused with the uniform "can't handle X
in state Y"; the listener fuzz and security cases of test_listener_fuzz.py and
test_security.py are repeated here on bytes alone.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rdmaio
from rdmaio import _auth as auth
from rdmaio._control import (
    CLIENT_RECEIVES,
    CLIENT_SENDS,
    SERVER_RECEIVES,
    SERVER_SENDS,
    ClientProtocol,
    ServerProtocol,
    State,
)
from rdmaio._wire import CONTROL_TYPES, PREAMBLE, ControlCodec

SECRET = b"cluster-secret-1"
HELLO = {"t": "hello", "v": 1, "transport": "tcp", "nqp": 2, "hb": 1.0}

# a valid example of every message type (the fields CONTROL_TYPES requires)
EXAMPLES: dict[str, dict[str, Any]] = {
    "hello": HELLO, "welcome": {"t": "welcome", "v": 1, "session": b"s" * 16, "nqp": 2},
    "attach": {"t": "attach", "session": b"s" * 16, "qp": 0}, "attached": {"t": "attached", "qp": 0},
    "get_key": {"t": "get_key", "id": 1, "name": "x"}, "key": {"t": "key", "id": 1, "key": b"k" * 40},
    "error": {"t": "error", "code": "c", "message": "m"}, "qp_reset": {"t": "qp_reset", "id": 1, "qp": 0, "psn": 1},
    "qp_reset_ok": {"t": "qp_reset_ok", "id": 1, "psn": 1}, "bye": {"t": "bye"},
    "challenge": {"t": "challenge", "nonce": b"n" * 32}, "auth": {"t": "auth", "nonce": b"n" * 32, "mac": b"m" * 32},
    "ping": {"t": "ping"}, "pong": {"t": "pong"}, "attach_reverse": {"t": "attach_reverse", "session": b"s" * 16},
    "channel_open": {"t": "channel_open", "id": 1, "name": "c", "slots": 4, "slot_size": 64, "ring": b"r" * 40},
    "channel": {"t": "channel", "id": 1, "chan": 0, "ring": b"r" * 40},
}


def test_examples_cover_every_message_type() -> None:
    assert set(EXAMPLES) == set(CONTROL_TYPES)


def frames(*msgs: dict[str, Any]) -> bytes:
    """Messages as a peer sends them (the first frame carries the preamble)."""
    codec = ControlCodec()
    return b"".join(codec.encode(m) for m in msgs)


def events(end: ClientProtocol | ServerProtocol, data: bytes, split: int = 0) -> list[dict[str, Any]]:
    """Feed ``data`` (in pieces of ``split`` bytes; 0: at once) and collect every event."""
    out = []
    pieces = [data] if not split else [data[i:i + split] for i in range(0, len(data), split)]
    for piece in pieces:
        end.receive_data(piece)
        while (ev := end.next_event()) is not None:
            out.append(ev)
    return out


def decode(data: bytes) -> list[dict[str, Any]]:
    codec = ControlCodec()
    codec.receive_data(data)
    return codec.next_events()


class Link:
    """A client and a server end wired back to back."""

    def __init__(self, client_secret: bytes | None = None, server_secret: bytes | None = None) -> None:
        self.client = ClientProtocol(client_secret)
        self.server = ServerProtocol("tcp", server_secret)
        self._to_server = b""

    def client_sends(self, msg: dict[str, Any]) -> list[dict[str, Any]]:
        """The client sends ``msg``; what the server's application sees (the ends' own answers flow)."""
        return self._deliver(self.client.send(msg))

    def _deliver(self, data: bytes) -> list[dict[str, Any]]:
        got = events(self.server, data)
        reply = self.server.data_to_send()
        if reply:
            assert events(self.client, reply) == []  # a challenge: answered by the client end itself
            return got + self._deliver(self.client.data_to_send())
        return got

    def server_sends(self, msg: dict[str, Any]) -> list[dict[str, Any]]:
        got = events(self.client, self.server.send(msg))
        assert self.client.data_to_send() == b""
        return got


@pytest.mark.parametrize("secret", [None, SECRET], ids=["open", "secret"])
def test_control_session_round_trip(secret: bytes | None) -> None:
    link = Link(secret, secret)
    assert link.client_sends(HELLO) == [HELLO]  # with a secret, only after the challenge was answered
    assert link.server.state is State.OPENING
    (welcome,) = link.server_sends(EXAMPLES["welcome"])
    assert welcome["session"] == b"s" * 16 and ("proof" in welcome) == (secret is not None)
    assert link.client.state is link.server.state is State.READY
    assert link.client_sends(EXAMPLES["get_key"]) == [EXAMPLES["get_key"]]
    assert link.server_sends(EXAMPLES["key"]) == [EXAMPLES["key"]]
    assert link.client_sends({"t": "ping"}) == []  # answered by the server end: pong
    assert events(link.client, link.server.data_to_send() or b"") == []
    assert link.client_sends({"t": "bye"}) == [{"t": "bye"}]
    assert link.client.state is link.server.state is State.CLOSED


@pytest.mark.parametrize("secret", [None, SECRET], ids=["open", "secret"])
def test_data_connection_is_attached_and_leaves_the_protocol(secret: bytes | None) -> None:
    link = Link(secret, secret)
    assert link.client_sends(EXAMPLES["attach"]) == [EXAMPLES["attach"]]
    link.server_sends(EXAMPLES["attached"])
    assert link.client.state is link.server.state is State.ATTACHED
    # data frames follow on the socket: the protocol takes nothing more
    with pytest.raises(rdmaio.ProtocolError, match="can't handle 'ping' in state ATTACHED"):
        link.client.send({"t": "ping"})


def test_byte_by_byte_and_several_messages_at_once() -> None:
    stream = frames(HELLO)
    for split in (1, 3, len(stream)):
        server = ServerProtocol("tcp")
        assert events(server, stream, split) == [HELLO]
    server = ServerProtocol("tcp")
    assert events(server, frames(HELLO)) == [HELLO]
    server.send(EXAMPLES["welcome"])
    both = frames(EXAMPLES["get_key"], {"t": "ping"}, EXAMPLES["channel_open"])[len(PREAMBLE):]
    assert events(server, both, 5) == [EXAMPLES["get_key"], EXAMPLES["channel_open"]]
    assert decode(PREAMBLE + server.data_to_send()) == [{"t": "pong"}]


def test_the_first_message_gets_its_own_answer() -> None:
    server = ServerProtocol("tcp")
    events(server, frames(EXAMPLES["attach"]))
    with pytest.raises(rdmaio.ProtocolError, match="can't answer 'attach' with 'welcome'"):
        server.send(EXAMPLES["welcome"])
    server = ServerProtocol("tcp")
    events(server, frames(HELLO))
    with pytest.raises(rdmaio.ProtocolError, match="can't answer 'hello' with 'attached'"):
        server.send(EXAMPLES["attached"])
    server = ServerProtocol("tcp")
    events(server, frames(HELLO))
    with pytest.raises(rdmaio.ProtocolError, match="can't handle 'get_key' in state OPENING"):
        events(server, frames(EXAMPLES["get_key"])[len(PREAMBLE):])  # the client must wait for the answer


def test_bytes_after_attach_stay_buffered_for_the_data_layer() -> None:
    server = ServerProtocol("tcp")
    assert events(server, frames(EXAMPLES["attach"]) + b"\x01\x02") == [EXAMPLES["attach"]]
    assert server.buffered() == b"\x01\x02"


# -- the tables: every message without an entry is refused the same way ------------------------------

def _in_state(end: ClientProtocol | ServerProtocol, state: State) -> None:
    end.state = state
    end.first = HELLO


@pytest.mark.parametrize("state", [s for s in State if s is not State.CHALLENGED])
def test_server_refuses_what_its_table_does_not_allow(state: State) -> None:
    for t, msg in EXAMPLES.items():
        server = ServerProtocol("tcp")
        _in_state(server, state)
        allowed = t in SERVER_RECEIVES[state]
        if allowed:
            continue
        with pytest.raises(rdmaio.ProtocolError, match=f"can't handle '{t}' in state {state.name}"):
            events(server, frames(msg))
        assert server.state is State.CLOSED
        with pytest.raises(rdmaio.ProtocolError):  # and stays refused
            server.receive_data(b"")


@pytest.mark.parametrize("state", list(State))
def test_client_refuses_what_its_table_does_not_allow(state: State) -> None:
    for t, msg in EXAMPLES.items():
        if t in CLIENT_RECEIVES[state]:
            continue
        client = ClientProtocol()
        _in_state(client, state)
        with pytest.raises(rdmaio.ProtocolError, match=f"can't handle '{t}' in state {state.name}"):
            events(client, frames(msg))


@pytest.mark.parametrize("end", ["client", "server"])
def test_sending_outside_the_table_is_refused(end: str) -> None:
    table = CLIENT_SENDS if end == "client" else SERVER_SENDS
    for state in State:
        for t, msg in EXAMPLES.items():
            if t in table[state]:
                continue
            proto: ClientProtocol | ServerProtocol = ClientProtocol() if end == "client" else ServerProtocol("tcp")
            _in_state(proto, state)
            with pytest.raises(rdmaio.ProtocolError, match="can't"):
                proto.send(msg)


# -- the listener's checks of a hello ---------------------------------------------------------------

@pytest.mark.parametrize(("hello", "words"), [
    ({**HELLO, "nqp": 100000}, "nqp"), ({**HELLO, "nqp": 0}, "nqp"), ({**HELLO, "nqp": True}, "nqp"),
    ({**HELLO, "v": 2}, "protocol"), ({**HELLO, "transport": "verbs"}, "'verbs'"),
])
def test_bad_hello_is_a_protocol_error_with_an_error_frame(hello: dict[str, Any], words: str) -> None:
    server = ServerProtocol("tcp")
    with pytest.raises(rdmaio.ProtocolError, match=words) as info:
        events(server, frames(hello))
    (err,) = decode(server.fail(info.value))
    assert err["t"] == "error" and err["code"] == "protocol" and words in err["message"]


def test_oversized_frame_and_bad_preamble() -> None:
    server = ServerProtocol("tcp")
    with pytest.raises(rdmaio.ProtocolError, match="exceeds") as info:  # not a 4 GiB allocation
        events(server, PREAMBLE + struct.pack("<I", 0xFFFFFFF0) + b"x" * 64)
    assert "exceeds" in decode(server.fail(info.value))[0]["message"]
    server = ServerProtocol("tcp")
    with pytest.raises(rdmaio.ProtocolError, match="protocol 77") as info:
        events(server, b"RDMAIO" + struct.pack("<H", 77))
    assert decode(server.fail(info.value))[0]["code"] == "protocol"
    with pytest.raises(rdmaio.ProtocolError, match="protocol 77"):  # a failed end stays failed
        server.next_event()


# -- authentication ---------------------------------------------------------------------------------

def test_nothing_is_served_before_authentication() -> None:
    server = ServerProtocol("tcp", SECRET)
    # the client skips the answer and asks for a key straight away
    with pytest.raises(rdmaio.AuthenticationError):
        events(server, frames(HELLO, EXAMPLES["get_key"]))
    assert [m["t"] for m in decode(server.data_to_send())] == ["challenge", "error"]
    # a forged answer
    server = ServerProtocol("tcp", SECRET)
    with pytest.raises(rdmaio.AuthenticationError):
        events(server, frames(EXAMPLES["attach"], EXAMPLES["auth"]))
    sent = decode(server.data_to_send())
    assert [m["t"] for m in sent] == ["challenge", "error"] and sent[1]["code"] == "auth"
    assert server.state is State.CLOSED


def test_a_mac_for_another_connection_is_refused() -> None:
    server = ServerProtocol("tcp", SECRET, nonce=b"s" * 32)
    events(server, frames(EXAMPLES["attach"]))
    other = auth.context({"t": "attach", "session": b"s" * 16, "qp": 1})  # another queue pair's MAC
    mac = auth.client_mac(SECRET, b"s" * 32, b"c" * 32, other)
    with pytest.raises(rdmaio.AuthenticationError):
        events(server, frames({"t": "auth", "nonce": b"c" * 32, "mac": mac})[len(PREAMBLE):])


def test_secrets_must_match_both_ways() -> None:
    link = Link(None, SECRET)  # the client cannot answer the challenge
    with pytest.raises(rdmaio.AuthenticationError, match="requires authentication"):
        link.client_sends(HELLO)
    link = Link(SECRET, None)  # the listener cannot prove it knows the secret
    assert link.client_sends(HELLO) == [HELLO]
    with pytest.raises(rdmaio.AuthenticationError, match="did not authenticate itself"):
        link.server_sends(EXAMPLES["welcome"])
    link = Link(b"wrong-secret", SECRET)  # the listener refuses the answer and says so
    with pytest.raises(rdmaio.AuthenticationError, match="authentication failed for a hello connection"):
        link.client_sends(HELLO)
    with pytest.raises(rdmaio.AuthenticationError, match="peer refused authentication"):
        events(link.client, link.server.data_to_send())


def test_client_refuses_a_wrong_proof_and_a_wrong_answer() -> None:
    client = ClientProtocol(SECRET)
    client.send(HELLO)
    events(client, frames(EXAMPLES["challenge"]))
    with pytest.raises(rdmaio.AuthenticationError, match="could not prove"):
        events(client, frames({**EXAMPLES["welcome"], "proof": b"p" * 32})[len(PREAMBLE):])
    client = ClientProtocol()
    client.send(HELLO)
    with pytest.raises(rdmaio.ProtocolError, match="expected 'welcome'"):
        events(client, frames(EXAMPLES["attached"]))
    client = ClientProtocol()
    client.send(HELLO)
    with pytest.raises(rdmaio.ProtocolError, match="peer refused: busy"):
        events(client, frames({"t": "error", "code": "protocol", "message": "busy"}))


# -- fuzz: any input yields messages or the protocol's errors, never anything else -----------------

@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.booleans())
def test_random_bytes(data: bytes, with_preamble: bool) -> None:
    for secret in (None, SECRET):
        server = ServerProtocol("tcp", secret)
        try:
            events(server, (PREAMBLE if with_preamble else b"") + data)
        except (rdmaio.ProtocolError, rdmaio.AuthenticationError) as exc:
            assert decode(server.fail(exc)) is not None


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=6), st.one_of(st.integers(-2**63, 2**64 - 1), st.text(max_size=8),
                                                      st.binary(max_size=8), st.none()), max_size=5),
       st.sampled_from([*CONTROL_TYPES, "nonsense", None]), st.booleans())
def test_malformed_messages(fields: dict[str, object], kind: str | None, secret: bool) -> None:
    msg = dict(fields)
    if kind is not None:
        msg["t"] = kind
    body = msgpack.packb(msg)
    data = PREAMBLE + struct.pack("<I", len(body)) + body
    for proto in (ServerProtocol("tcp", SECRET if secret else None), ClientProtocol(SECRET if secret else None)):
        if isinstance(proto, ClientProtocol):
            proto.send(HELLO)
        try:
            got = events(proto, data)
        except (rdmaio.ProtocolError, rdmaio.AuthenticationError):
            continue
        assert all(isinstance(m, dict) and isinstance(m["t"], str) for m in got)
