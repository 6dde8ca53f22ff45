"""The wire protocol: the Python reference codec, and the native data path held to it.

Invariant under test (h11's): any input, whole or split at any point, either
yields events or raises ProtocolError — never another exception, and the native
responder never touches memory outside a registered region.
"""

from __future__ import annotations

import dataclasses
import os
import struct

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rdmaio import ProtocolError
from rdmaio._native._rdmaio_native import ffi, lib
from rdmaio._wire import (
    CONTROL_TYPES,
    MAX_CONTROL_FRAME,
    PREAMBLE,
    ControlCodec,
    Op,
    Request,
    RequestDecoder,
    Response,
    ResponseDecoder,
    Status,
    encode_request,
    encode_response,
)

u64 = st.integers(0, 2**64 - 1)
REGION = 4096
GUARD = 512


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points + [len(data)]:
        out.append(data[last:p])
        last = p
    return out


@st.composite
def requests(draw: st.DrawFn, max_len: int = 64) -> Request:
    op = draw(st.sampled_from(list(Op)))
    wr, key = draw(u64), draw(u64)
    if op in (Op.READ_BATCH, Op.WRITE_BATCH):
        entries = tuple(draw(st.lists(st.tuples(u64, st.integers(0, max_len)), min_size=1, max_size=8)))
        payload = draw(st.binary(min_size=sum(n for _, n in entries), max_size=sum(n for _, n in entries))) \
            if op == Op.WRITE_BATCH else b""
        return Request(op, wr, key, entries=entries, payload=payload)
    if op in (Op.READ, Op.WRITE, Op.WRITE_IMM):
        n = draw(st.integers(0, max_len))
        payload = draw(st.binary(min_size=n, max_size=n)) if op != Op.READ else b""
        imm = draw(st.integers(0, 2**32 - 1)) if op == Op.WRITE_IMM else 0
        if op != Op.READ and draw(st.booleans()):  # pulled: the payload stays at the initiator
            return Request(op, wr, key, draw(u64), n, imm, pull=(draw(u64), draw(u64), draw(u64)))
        return Request(op, wr, key, draw(u64), n, imm, payload=payload)
    return Request(op, wr, key, draw(u64), draw(u64), draw(u64))


@given(st.lists(requests(), min_size=1, max_size=6), st.lists(st.integers(0, 10_000), max_size=8))
def test_requests_round_trip_split_anywhere(reqs: list[Request], cuts: list[int]) -> None:
    data = b"".join(bytes(b) for r in reqs for b in encode_request(r))
    dec = RequestDecoder()
    got: list[Request] = []
    for piece in splits(data, cuts):
        dec.receive_data(piece)
        got += dec.next_events()
    assert got == reqs


@given(st.lists(st.tuples(st.sampled_from(list(Op)), st.sampled_from(list(Status)), st.binary(max_size=40)),
                min_size=1, max_size=6),
       st.lists(st.integers(0, 10_000), max_size=8))
def test_responses_round_trip_split_anywhere(items: list[tuple[Op, Status, bytes]], cuts: list[int]) -> None:
    dec = ResponseDecoder()
    resps = []
    for wr, (op, status, payload) in enumerate(items):
        is_read = op in (Op.READ, Op.READ_BATCH)
        ok_read = is_read and status == Status.OK
        dec.expect(wr, op, len(payload) if is_read else 0)
        value = len(payload) if ok_read else 0
        resps.append(Response(op, status, wr, value, payload if ok_read else b""))
    data = b"".join(bytes(b) for r in resps for b in encode_response(r))
    got: list[Response] = []
    for piece in splits(data, cuts):
        dec.receive_data(piece)
        got += dec.next_events()
    assert got == resps


@pytest.mark.parametrize(("op", "flags"), [(Op.WRITE, 2), (Op.WRITE, 0x81), (Op.READ, 1), (Op.WRITE_BATCH, 1),
                                           (Op.READ_BATCH, 1), (Op.FETCH_ADD, 1)])
def test_unknown_flags_and_pulls_of_other_ops_are_protocol_errors(op: Op, flags: int) -> None:
    """Refused at the header, by a responder that takes pulls: nothing that follows it is read, executed or
    written (a batch with PULL would otherwise copy to its header's unchecked offset)."""
    src = np.full(64, 0xAB, dtype=np.uint8)
    gen = np.zeros(1, dtype=np.uint64)
    batch = op in (Op.READ_BATCH, Op.WRITE_BATCH)
    data = struct.pack("<BBHIQQQQQ", op, flags, 0, 1, 1, NativeResponder.KEY, REGION + 8, 32, 0)
    if batch:
        data += struct.pack("<QQ", 0, 8)  # one valid entry
    data += struct.pack("<QQQ", src.ctypes.data, gen.ctypes.data, 0)  # what a pull would read
    dec = RequestDecoder()
    dec.receive_data(data)
    with pytest.raises(ProtocolError, match="flag"):
        dec.next_events()
    r = NativeResponder(pull_pid=os.getpid())
    try:
        before = r.region.copy()
        assert r.feed(data) < 0
        assert r.output() == b"" and r.w.nrx == 0 and r.c.ops_pulled == 0
        assert np.array_equal(r.region, before) and r.guards_intact()
    finally:
        r.close()


def test_a_pull_whose_generation_moves_during_the_copy_fails_without_its_immediate() -> None:
    """The generation word is read again after the copy: here the copy itself overwrites it (the word lies in
    the region the write lands in), as a close racing the copy would move it.  The write fails (no immediate);
    the bytes that landed are the payload (a failed write's range is undefined, as on a NIC)."""
    r = NativeResponder(pull_pid=os.getpid())
    try:
        word_at = 256
        word = r.region[word_at:word_at + 8].view(np.uint64)
        src = np.arange(64, dtype=np.uint8)  # differs from the word's value at [word_at, word_at + 8)
        expect = int(word[0])
        assert src[:8].view(np.uint64)[0] != expect
        req = Request(Op.WRITE_IMM, 9, NativeResponder.KEY, word_at, 64, 77,
                      pull=(src.ctypes.data, word.ctypes.data, expect))
        got, imms = r.run([req], [])
        assert [e.status for e in got] == [Status.INVALID_REQUEST] and imms == [] and r.c.ops_pulled == 0
        assert np.array_equal(r.region[word_at:word_at + 64], src) and r.guards_intact()
    finally:
        r.close()


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600), st.lists(st.integers(0, 700), max_size=6))
def test_any_bytes_give_requests_or_protocol_error(data: bytes, cuts: list[int]) -> None:
    dec = RequestDecoder()
    try:
        for piece in splits(data, cuts):
            dec.receive_data(piece)
            for ev in dec.next_events():
                assert isinstance(ev, Request)
    except ProtocolError:
        with pytest.raises(ProtocolError):  # and it stays failed
            dec.next_events()


@given(st.binary(max_size=300))
def test_any_bytes_give_responses_or_protocol_error(data: bytes) -> None:
    dec = ResponseDecoder()
    dec.expect(1, Op.READ, 8)
    try:
        dec.receive_data(data)
        dec.next_events()
    except ProtocolError:
        pass


control_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


@given(st.sampled_from(sorted(CONTROL_TYPES)), st.dictionaries(st.text(max_size=8), control_values, max_size=4),
       st.lists(st.integers(0, 500), max_size=6))
def test_control_round_trip(kind: str, extra: dict[str, object], cuts: list[int]) -> None:
    msg = {**extra, **{k: 1 for k in CONTROL_TYPES[kind]}, "t": kind}
    a, b = ControlCodec(), ControlCodec()
    data = a.encode(msg) + a.encode({"t": "bye"})
    got = []
    for piece in splits(data, cuts):
        b.receive_data(piece)
        got += b.next_events()
    assert got == [msg, {"t": "bye"}]


@given(st.binary(max_size=400), st.booleans())
def test_control_any_bytes_give_messages_or_protocol_error(data: bytes, with_preamble: bool) -> None:
    c = ControlCodec()
    try:
        c.receive_data((PREAMBLE if with_preamble else b"") + data)
        for msg in c.next_events():
            assert isinstance(msg, dict) and msg["t"] in CONTROL_TYPES
    except ProtocolError:
        pass


def test_control_rejects_wrong_version_oversized_and_unknown() -> None:
    c = ControlCodec()
    c.receive_data(b"RDMAIO" + struct.pack("<H", 99))
    with pytest.raises(ProtocolError, match="protocol 99"):
        c.next_event()
    c = ControlCodec()
    c.receive_data(PREAMBLE + struct.pack("<I", MAX_CONTROL_FRAME + 1))
    with pytest.raises(ProtocolError, match="exceeds"):
        c.next_event()
    c = ControlCodec()
    body = msgpack.packb({"t": "launch_missiles"})
    c.receive_data(PREAMBLE + struct.pack("<I", len(body)) + body)
    with pytest.raises(ProtocolError, match="unknown control message"):
        c.next_event()
    c = ControlCodec()
    body = msgpack.packb({"t": "get_key"})  # lacks id and name
    c.receive_data(PREAMBLE + struct.pack("<I", len(body)) + body)
    with pytest.raises(ProtocolError, match="lacks"):
        c.next_event()


# -- the native responder, held to the reference codec ---------------------------------

class NativeResponder:
    """A responder conn fed in memory (no socket), over one region with guard bytes."""

    KEY = 0x1234_5678_9ABC_DEF1

    def __init__(self, access: int = 7, pull_pid: int = 0) -> None:
        self.mem = np.random.default_rng(0).integers(0, 256, REGION + 2 * GUARD, dtype=np.uint8)
        self.region = self.mem[GUARD:GUARD + REGION]
        self.guard_before = self.mem.copy()
        self.rt = lib.rio_rtable_new(4)
        self._cbuf = ffi.from_buffer(self.region)
        lib.rio_rtable_insert(self.rt, self.KEY, int(ffi.cast("uintptr_t", self._cbuf)), REGION, access)
        self.w = lib.rio_worker_new(64)
        self.c = lib.rio_conn_new(-1, 1, 1, self.rt, 0)
        assert lib.rio_conn_pull(self.c, pull_pid, 0) == 0

    def feed(self, data: bytes) -> int:
        return int(lib.rio_feed(self.w, self.c, data, len(data)))

    def run(self, reqs: list[Request], cuts: list[int]) -> tuple[list[Response], list[int]]:
        """Feed ``reqs`` (their bytes split at ``cuts``); their responses, and the immediates delivered."""
        data = b"".join(bytes(b) for q in reqs for b in encode_request(q))
        out = b""
        imms: list[int] = []
        for piece in splits(data, cuts):
            assert self.feed(piece) == 0
            out += self.output()
            imms += [int(self.w.rx_imm[i]) for i in range(self.w.nrx)]
            self.w.nrx = 0  # what a poll round does before the next batch
        dec = ResponseDecoder()
        for q in reqs:
            dec.expect(q.wr_id, q.op, sum(n for _, n in q.entries) if q.entries else q.arg0)
        dec.receive_data(out)
        return dec.next_events(), imms

    def output(self) -> bytes:
        out = bytearray(1 << 20)
        n = lib.rio_take_output(self.c, ffi.from_buffer(out), len(out))
        return bytes(out[:n])

    def guards_intact(self) -> bool:
        return bool(np.array_equal(self.mem[:GUARD], self.guard_before[:GUARD])
                    and np.array_equal(self.mem[GUARD + REGION:], self.guard_before[GUARD + REGION:]))

    def close(self) -> None:
        lib.rio_conn_close(self.c)
        lib.rio_worker_free(self.w)
        lib.rio_rtable_free(self.rt)


def model_execute(mem: np.ndarray, req: Request, key: int) -> Response:
    """What a correct responder does (the spec, in numpy)."""
    n = len(mem)
    if req.op == Op.NOP:  # a ping: no region involved
        return Response(req.op, Status.OK, req.wr_id, req.arg0)
    if req.key != key:
        return Response(req.op, Status.INVALID_KEY, req.wr_id)
    if req.op in (Op.READ, Op.WRITE, Op.WRITE_IMM):
        rngs = [(req.remote, req.arg0)]
    elif req.op in (Op.READ_BATCH, Op.WRITE_BATCH):
        rngs = list(req.entries)
    else:
        rngs = [(req.remote, 8)]
    if any(off > n or ln > n - off for off, ln in rngs):
        return Response(req.op, Status.BOUNDS, req.wr_id)
    if req.op in (Op.FETCH_ADD, Op.CMP_SWAP):
        if req.remote % 8:
            return Response(req.op, Status.ALIGN, req.wr_id)
        word = mem[req.remote:req.remote + 8].view(np.uint64)
        old = int(word[0])
        if req.op == Op.FETCH_ADD:
            word[0] = np.uint64((old + req.arg0) % 2**64)
        elif old == req.arg0:
            word[0] = np.uint64(req.arg1)
        return Response(req.op, Status.OK, req.wr_id, old)
    if req.op in (Op.READ, Op.READ_BATCH):
        payload = b"".join(mem[o:o + ln].tobytes() for o, ln in rngs)
        return Response(req.op, Status.OK, req.wr_id, len(payload), payload)
    pos = 0
    for o, ln in rngs:
        mem[o:o + ln] = np.frombuffer(req.payload[pos:pos + ln], dtype=np.uint8)
        pos += ln
    return Response(req.op, Status.OK, req.wr_id)


@st.composite
def region_requests(draw: st.DrawFn) -> Request:
    """Requests that are mostly valid for the test region, sometimes not."""
    key = draw(st.sampled_from([NativeResponder.KEY] * 5 + [7]))
    op = draw(st.sampled_from(list(Op)))
    wr = draw(u64)
    off = draw(st.integers(0, REGION + 16))
    if op in (Op.READ_BATCH, Op.WRITE_BATCH):
        entries = tuple(draw(st.lists(st.tuples(st.integers(0, REGION + 8), st.integers(0, 300)),
                                      min_size=1, max_size=6)))
        total = sum(n for _, n in entries)
        payload = draw(st.binary(min_size=total, max_size=total)) if op == Op.WRITE_BATCH else b""
        return Request(op, wr, key, entries=entries, payload=payload)
    if op in (Op.READ, Op.WRITE, Op.WRITE_IMM):
        n = draw(st.integers(0, 3000))
        payload = draw(st.binary(min_size=n, max_size=n)) if op != Op.READ else b""
        imm = draw(st.integers(0, 2**32 - 1)) if op == Op.WRITE_IMM else 0
        return Request(op, wr, key, off, n, imm, payload=payload)
    if op in (Op.FETCH_ADD, Op.CMP_SWAP):
        off = draw(st.sampled_from([0, 8, 3, REGION - 8, REGION - 4, REGION]))
    return Request(op, wr, key, off, draw(u64), draw(u64))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(region_requests(), min_size=1, max_size=8), st.lists(st.integers(0, 50_000), max_size=6))
def test_native_responder_matches_reference_model(reqs: list[Request], cuts: list[int]) -> None:
    reqs = [dataclasses.replace(q, wr_id=i) for i, q in enumerate(reqs)]  # outstanding wr_ids are unique
    r = NativeResponder()
    try:
        model = r.region.copy()
        expected = [model_execute(model, q, NativeResponder.KEY) for q in reqs]
        got, imms = r.run(reqs, cuts)
        # every WRITE_IMM that succeeded, and only those, notified the target, in order
        assert imms == [q.arg1 for q, e in zip(reqs, expected) if q.op == Op.WRITE_IMM and e.status == Status.OK]
        assert [(g.status, g.value, g.payload) for g in got] == \
               [(e.status, e.value, e.payload) for e in expected]
        assert np.array_equal(r.region, model)
        assert r.guards_intact()
    finally:
        r.close()


#: how a write is pulled in the tests below: from a live buffer, under a generation that moved since it was
#: posted (the initiator closed), or from memory this process cannot read
PULLS = ("live", "stale", "unreadable")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(region_requests(), st.sampled_from((None,) + PULLS)), min_size=1, max_size=8),
       st.lists(st.integers(0, 50_000), max_size=6), st.booleans())
def test_native_responder_pulls_writes_as_the_model_says(items: list[tuple[Request, str | None]], cuts: list[int],
                                                          takes_pulls: bool) -> None:
    """Pulled writes (the payload read from the initiator's memory; here this very process) land exactly as
    streamed ones would, after the same checks; a stale generation or unreadable source is an error with no
    immediate that leaves the region unchanged; a responder that takes no pulls refuses every one."""
    gen = np.array([41], dtype=np.uint64)
    sources: dict[int, np.ndarray] = {}  # wr_id -> the payload, kept alive until the responder has read it
    reqs: list[Request] = []
    kinds: list[str | None] = []
    for i, (q, how) in enumerate(items):
        q = dataclasses.replace(q, wr_id=i)
        if how is not None and q.op in (Op.WRITE, Op.WRITE_IMM):
            src = sources[i] = np.frombuffer(q.payload, dtype=np.uint8).copy()
            at = 4096 * 3 if how == "unreadable" else src.ctypes.data  # page 3: never mapped
            q = dataclasses.replace(q, payload=b"", pull=(at, gen.ctypes.data, 40 if how == "stale" else 41))
        else:
            how = None
        reqs.append(q)
        kinds.append(how)
    r = NativeResponder(pull_pid=os.getpid() if takes_pulls else 0)
    try:
        model = r.region.copy()
        expected = []
        for q, how in zip(reqs, kinds):
            if how is None:
                expected.append(model_execute(model, q, NativeResponder.KEY))
                continue
            streamed = dataclasses.replace(q, pull=None, payload=sources[q.wr_id].tobytes())
            checked = model_execute(model.copy(), streamed, NativeResponder.KEY)
            if checked.status != Status.OK or q.arg0 == 0 or (how == "live" and takes_pulls):
                expected.append(model_execute(model, streamed, NativeResponder.KEY))  # as if streamed
            else:
                expected.append(Response(q.op, Status.INVALID_REQUEST, q.wr_id))  # checked, then not pulled
        got, imms = r.run(reqs, cuts)
        assert imms == [q.arg1 for q, e in zip(reqs, expected) if q.op == Op.WRITE_IMM and e.status == Status.OK]
        assert [(g.status, g.value) for g in got] == [(e.status, e.value) for e in expected]
        assert np.array_equal(r.region, model)
        assert r.guards_intact()
        pulled = sum(1 for q, how, e in zip(reqs, kinds, expected) if how == "live" and e.status == Status.OK and q.arg0)
        assert r.c.ops_pulled == (pulled if takes_pulls else 0)
    finally:
        r.close()


def test_closing_an_initiator_ends_its_queued_pulls() -> None:
    """An initiator posts large writes pulled (source, generation word, generation); small ones carry their
    payload.  Closing it moves its generation word before it returns: a pull still queued at the peer fails."""
    rt = lib.rio_rtable_new(4)
    c = lib.rio_conn_new(-1, 1, 2, rt, 8)
    try:
        assert lib.rio_conn_pull(c, 0, 1024) == 0
        big, small = np.arange(4096, dtype=np.uint8), b"tiny"
        assert lib.rio_post_single(c, 0, 0, Op.WRITE_IMM, 7, 0, big.nbytes, 5, big.ctypes.data) == 0
        assert lib.rio_post_single(c, 1, 1, Op.WRITE, 7, 0, len(small), 0, ffi.cast("uintptr_t", ffi.from_buffer(small))) == 0
        out = bytearray(1 << 16)
        n = lib.rio_take_output(c, ffi.from_buffer(out), len(out))
        dec = RequestDecoder()
        dec.receive_data(bytes(out[:n]))
        pulled, plain = dec.next_events()
        assert pulled.pull is not None and pulled.pull[0] == big.ctypes.data and pulled.payload == b""
        assert (plain.pull, plain.payload) == (None, small)
        assert c.ops_pulled == 1
        word = ffi.cast("uint64_t *", pulled.pull[1])
        assert word[0] == pulled.pull[2]
    finally:
        lib.rio_conn_close(c)
        lib.rio_rtable_free(rt)
    assert word[0] != pulled.pull[2]  # the word outlives the connection; its value moved


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), st.lists(st.integers(0, 3000), max_size=6))
def test_native_responder_survives_any_bytes(data: bytes, cuts: list[int]) -> None:
    r = NativeResponder()
    try:
        for piece in splits(data, cuts):
            rc = r.feed(piece)
            assert rc == 0 or -7 <= rc < 0 or rc == -1000
            r.output()
            if rc:
                break
        assert r.guards_intact()
    finally:
        r.close()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=500))
def test_native_initiator_rejects_unsolicited_responses(data: bytes) -> None:
    rt = lib.rio_rtable_new(4)
    w = lib.rio_worker_new(64)
    c = lib.rio_conn_new(-1, 1, 2, rt, 8)
    try:
        rc = lib.rio_feed(w, c, data, len(data))
        if len(data) >= 24:
            assert rc < 0  # no slot is active: any complete header is a protocol error
        assert w.ncq == 0
    finally:
        lib.rio_conn_close(c)
        lib.rio_worker_free(w)
        lib.rio_rtable_free(rt)
