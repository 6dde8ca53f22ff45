"""The pooling RPC's codec (flexemr.core.poolwire) and the server's answer to any bytes (flexemr.server.pooling).

A server never dies from client bytes: truncated, corrupted or random
requests, unknown shards, ids out of range and bad offsets all give an error
response, and the good requests pooled in the same native call are exact.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexemr.core.errors import InputError, TransportError
from flexemr.core.plan import ShardingPlan
from flexemr.core.pooling import pool
from flexemr.core.poolwire import FrameAssembler, RequestJob, decode_request, decode_response, encode_request, frames
from flexemr.core.spec import TableSpec
from flexemr.server.pooling import PoolService

PLAN = ShardingPlan.row_wise([TableSpec("a", 40, 8), TableSpec("b", 30, 3, "float64")], ["s0", "s1"])
RNG = np.random.default_rng(0)
MODEL = {"a": RNG.standard_normal((40, 8)).astype(np.float32), "b": RNG.standard_normal((30, 3))}
SHARDS = [sh for t in ("a", "b") for sh in PLAN.shards[t] if sh.server == "s1"]
SERVICE = PoolService(PLAN, SHARDS, {sh.region_name: MODEL[sh.table][sh.row_start:sh.row_end] for sh in SHARDS})


def joined(parts: list[object]) -> bytes:
    return b"".join(bytes(p) for p in parts)  # type: ignore[call-overload]


def good_request(mode: str = "sum", weights: bool = False) -> tuple[bytes, list[np.ndarray]]:
    """One job per shard of s1, and what each must pool to."""
    jobs, want = [], []
    for sh in SHARDS:
        n = sh.row_end - sh.row_start
        offs = np.array([0, 3, 3, 7])
        ids = RNG.integers(0, n, 7).astype(np.int32)
        w = RNG.standard_normal(7).astype(np.float32) if weights else None
        jobs.append(RequestJob(sh.table, sh.index, offs, ids, w))
        want.append(pool(MODEL[sh.table][sh.row_start + ids.astype(np.int64)], offs, mode, w))
    return joined(encode_request(jobs, mode)), want


@pytest.mark.parametrize("mode, weights", [("sum", False), ("sum", True), ("max", False)])
def test_round_trip(mode: str, weights: bool) -> None:
    data, want = good_request(mode, weights)
    got = decode_response(joined(SERVICE.handle(data)), [w.shape for w in want])
    for g, w in zip(got, want):
        if mode == "max":  # the server leaves -inf in empty bags (bag 1); the ranker zeroes them
            w = w.copy()
            w[1] = -np.inf
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def error_of(data: bytes) -> str:
    with pytest.raises(TransportError) as info:
        decode_response(joined(SERVICE.handle(data)), [(3, 8)])
    return str(info.value)


def test_bad_requests_get_error_responses() -> None:
    data, _ = good_request()
    assert "too short" in error_of(data[:5])
    assert "bad magic" in error_of(b"XXXX" + data[4:])
    assert "imply" in error_of(data + bytes(8))
    for job, match in ((RequestJob("a", 0, np.array([0, 1]), np.array([0], np.int32), None), "no full-width shard 0"),
                       (RequestJob("zz", 1, np.array([0, 1]), np.array([0], np.int32), None), "'zz'"),
                       (RequestJob("a", 1, np.array([0, 1]), np.array([20], np.int32), None), "id 20"),
                       (RequestJob("a", 1, np.array([0, 2]), np.array([0], np.int32), None), "offsets")):
        assert match in error_of(joined(encode_request([job], "sum")))


def test_a_bad_request_fails_alone_in_a_shared_native_call() -> None:
    good, want = good_request()
    bad = joined(encode_request([RequestJob("a", 1, np.array([0, 1]), np.array([-1], np.int32), None)], "sum"))
    answers = SERVICE.handle_many([good, bad, good])
    for i in (0, 2):
        for g, w in zip(decode_response(joined(answers[i]), [w.shape for w in want]), want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    with pytest.raises(TransportError, match="id -1"):
        decode_response(joined(answers[1]), [(1, 8)])


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_corrupted_requests_never_raise(data: st.DataObject) -> None:
    mode = data.draw(st.sampled_from(["sum", "max"]))
    req, _ = good_request(mode, mode == "sum" and data.draw(st.booleans()))
    buf = bytearray(req)
    for _ in range(data.draw(st.integers(1, 6))):
        buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(buf)))
    for msg in (bytes(buf), bytes(buf[:cut]), data.draw(st.binary(max_size=200))):
        resp = joined(SERVICE.handle(msg))        # an answer, whatever the bytes
        assert resp[:4] == b"FXPR"
        try:
            decode_request(msg)
        except InputError:
            pass


def test_frames_reassemble_in_any_order() -> None:
    data, _ = good_request()
    pieces = [joined([head, *parts]) for head, parts in frames(9, [data], 40)]
    assert len(pieces) > 2
    fa = FrameAssembler()
    got = [fa.add(p) for p in reversed(pieces)]
    assert got[:-1] == [None] * (len(pieces) - 1) and got[-1] is not None
    assert got[-1][0] == 9 and bytes(got[-1][1]) == data and fa.pending() == 0
    with pytest.raises(TransportError):
        fa.add(pieces[0][:5])


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_add_view_reassembles_like_add_and_rejects_misfit_frames(data: st.DataObject) -> None:
    """add_view (one copy, into a buffer reserved at the first frame) gives add's messages for frames in any
    order, interleaved between requests; a frame that does not fit its message is a TransportError."""
    from flexemr.core.poolwire import FRAME, MAX_ASSEMBLY_BYTES

    max_message = data.draw(st.integers(FRAME.size + 1, 64))
    msgs = {rid: data.draw(st.binary(min_size=0, max_size=300)) for rid in range(3)}
    pieces = [(rid, joined([h, *p])) for rid, m in msgs.items() for h, p in frames(rid, [m], max_message)]
    order = data.draw(st.permutations(pieces))
    fa, fb = FrameAssembler(max_message - FRAME.size), FrameAssembler()
    for rid, p in order:
        buf = bytearray(p)
        a = fa.add_view(memoryview(buf))
        buf[:] = bytes(len(buf))  # the view is only valid during the call
        b = fb.add(p)
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            assert a[0] == b[0] == rid and bytes(a[1]) == bytes(b[1]) == msgs[rid]
    assert fa.pending() == 0
    mp = max_message - FRAME.size
    for bad in (FRAME.pack(1, 0, 2) + bytes(max(0, mp - 1)),   # a frame but the last shorter than max_payload
                FRAME.pack(1, 2, 2) + bytes(1),                 # index past the count
                FRAME.pack(1, 0, MAX_ASSEMBLY_BYTES // mp + 1),  # too large a message
                b"\x00" * 5):                                   # no frame header
        with pytest.raises(TransportError):
            FrameAssembler(mp).add_view(memoryview(bad))
    fa = FrameAssembler(mp)
    fa.add_view(memoryview(FRAME.pack(4, 0, 3) + bytes(mp)))
    with pytest.raises(TransportError):  # the same frame twice
        fa.add_view(memoryview(FRAME.pack(4, 0, 3) + bytes(mp)))


class _NoRegion:
    """Stands in for the arena's memory region: framed answers are only built here, not sent."""


def framed_bytes(svc: PoolService, answer: object) -> bytes:
    """The logical response of a framed answer: its frames' payloads, in order (what a ranker reassembles)."""
    from flexemr.server.pooling import FramedAnswer

    assert isinstance(answer, FramedAnswer)
    buf = svc._arena.buf  # type: ignore[union-attr]
    return b"".join(bytes(buf[answer.base + at: answer.base + at + n]) for at, n in answer.layout.frames)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_framed_answers_carry_the_plain_response_and_bad_requests_free_their_place(data: st.DataObject) -> None:
    """With a frame payload the kernel writes the values in place in the arena, as frames of whole rows; the
    frames' payloads are the plain response byte for byte; a bad request in the same call gets an error and its
    place goes back, as does every answer once released."""
    from flexemr.server.pooling import FramedAnswer, ResponseArena

    payload = data.draw(st.sampled_from([40, 64, 100, 1000, 1 << 16]))
    arena_buf = np.full(1 << 20, 0xAB, np.uint8)
    arena = ResponseArena(arena_buf, _NoRegion())  # type: ignore[arg-type]
    svc = PoolService(PLAN, SHARDS, {sh.region_name: MODEL[sh.table][sh.row_start:sh.row_end] for sh in SHARDS},
                      arena)
    mode = data.draw(st.sampled_from(["sum", "max"]))
    good, _ = good_request(mode, mode == "sum" and data.draw(st.booleans()))
    bad = joined(encode_request([RequestJob("a", 1, np.array([0, 1]), np.array([99], np.int32), None)], "sum"))
    plain = joined(svc.handle(good))
    answers = svc.handle_many([good, bad, good], [payload, payload, payload])
    fits = payload >= 12 + 16 * len(SHARDS)  # the head fits a frame (rows do): else copied as before
    for i in (0, 2):
        a = answers[i]
        assert isinstance(a, FramedAnswer) == fits
        if not fits:
            assert joined(a) == plain  # type: ignore[arg-type]
            continue
        assert isinstance(a, FramedAnswer)
        assert framed_bytes(svc, a) == plain and a.nbytes == len(plain)
        assert all(0 < n <= payload for _, n in a.layout.frames)
    assert isinstance(answers[1], list)
    with pytest.raises(TransportError, match="id 99"):
        decode_response(joined(answers[1]), [(1, 8)])
    for a in answers:
        if isinstance(a, FramedAnswer):
            svc.release(a)
    assert arena.free_bytes() == arena_buf.nbytes


def fresh_service() -> PoolService:
    return PoolService(PLAN, SHARDS, {sh.region_name: MODEL[sh.table][sh.row_start:sh.row_end] for sh in SHARDS})


def kind_request(counts: list[int | None], mode: str = "sum", weights: bool = False, id_dtype: type = np.int32,
                 rng: np.random.Generator = RNG) -> tuple[bytes, list[np.ndarray]]:
    """One job per shard of s1, 3 bags, ``counts[i]`` ids in job i (bags of random sizes, empty ones too; ``None``:
    one id per bag)."""
    jobs, want = [], []
    for sh, n_ids in zip(SHARDS, counts):
        n = sh.row_end - sh.row_start
        if n_ids is None:
            n_ids, offs = 3, np.arange(4)
        else:
            cuts = np.sort(rng.integers(0, n_ids + 1, 2))
            offs = np.array([0, cuts[0], cuts[1], n_ids])
        ids = rng.integers(0, n, n_ids).astype(id_dtype)
        w = rng.standard_normal(n_ids).astype(np.float32) if weights else None
        jobs.append(RequestJob(sh.table, sh.index, offs, ids, w))
        want.append(pool(MODEL[sh.table][sh.row_start + ids.astype(np.int64)], offs, mode, w))
    return joined(encode_request(jobs, mode)), want


def test_requests_of_one_kind_are_laid_out_once_and_bound_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ranker sends requests of one kind batch after batch (same tables, shards, bags; other ids, other id
    counts): the server decodes and lays out the first one only, binds the others to the same native jobs in
    place, and their partials are exact; another kind (id width, weights, op) is a kind of its own; a response
    over MAX_RESPONSE_BYTES is still an error response."""
    from flexemr.server import pooling

    svc = fresh_service()
    pooling._layouts.cache_clear()
    for counts in ([7, 5], [0, 9], [12, 1]):
        data, want = kind_request(counts)
        got = decode_response(joined(svc.handle(data)), [w.shape for w in want])
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    assert len(svc._kinds) == 1 and pooling._layouts.cache_info().misses == 1
    for mode, weights, id_dtype in (("sum", True, np.int32), ("sum", False, np.int64), ("max", False, np.int32)):
        data, want = kind_request([4, 6], mode, weights, id_dtype)
        got = decode_response(joined(svc.handle(data)), [w.shape for w in want])
        for g, w in zip(got, want):
            if mode == "max":
                w = np.where(np.isneginf(g), g, w)  # empty bags: -inf from the server, 0 from the oracle
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    assert len(svc._kinds) == 4
    monkeypatch.setattr(pooling, "MAX_RESPONSE_BYTES", 64)
    pooling._layouts.cache_clear()
    assert "more than 64" in error_of_service(fresh_service(), data)
    pooling._layouts.cache_clear()


def error_of_service(svc: PoolService, data: bytes) -> str:
    with pytest.raises(TransportError) as info:
        decode_response(joined(svc.handle(data)), [(3, 8)])
    return str(info.value)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_corrupted_requests_of_a_known_kind_get_error_responses(data: st.DataObject) -> None:
    """Bytes past the head (and the id counts, which a kind leaves open) corrupted, cut or extended in a request
    of a kind the server knows: an error response or exact partials, never an exception, and the good requests
    pooled in the same native call stay exact."""
    svc = fresh_service()
    weights = data.draw(st.booleans())
    rng = np.random.default_rng(data.draw(st.integers(0, 1 << 16)))
    one = data.draw(st.booleans())  # the second job: one id per bag (no offsets on the wire)
    good, want = kind_request([5, None if one else 4], "sum", weights, rng=rng)
    svc.handle(good)  # the kind is known from now on
    buf = bytearray(kind_request([data.draw(st.integers(0, 9)), None if one else data.draw(st.integers(0, 9))], "sum",
                                 weights, rng=rng)[0])
    head = 12 + 24 * len(SHARDS)
    for _ in range(data.draw(st.integers(0, 4))):  # the body
        buf[data.draw(st.integers(head, len(buf) - 1))] = data.draw(st.integers(0, 255))
    for _ in range(data.draw(st.integers(0, 2))):  # an id count (u64 at the start of a job header)
        at = 12 + 24 * data.draw(st.integers(0, len(SHARDS) - 1)) + data.draw(st.integers(0, 7))
        buf[at] = data.draw(st.integers(0, 255))
    msg = bytes(buf)
    cut = data.draw(st.sampled_from(["none", "cut", "extend"]))
    if cut == "cut":
        msg = msg[: data.draw(st.integers(head, len(msg)))]
    elif cut == "extend":
        msg += bytes(data.draw(st.sampled_from([4, 8, 16])))
    answers = svc.handle_many([good, msg, good])
    assert joined(answers[1])[:4] == b"FXPR"
    assert len(svc._kinds) <= 2  # the known kind, and the message's if it decodes to another (e.g. one id per bag)
    for i in (0, 2):
        for g, w in zip(decode_response(joined(answers[i]), [w.shape for w in want]), want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_one_id_per_bag_travels_without_offsets() -> None:
    """Bags of one id each (Criteo's categorical features) are sent without offsets (flags & 2): the request is
    smaller by B + 1 int64s per job, decodes to offsets 0..B, and its kind pools exactly, batch after batch;
    the same tables with other bags are another kind."""
    svc = fresh_service()
    ids = np.array([1, 0, 2], np.int32)
    one, plain = (joined(encode_request([RequestJob(sh.table, sh.index, np.array(offs), ids, None) for sh in SHARDS],
                                        "sum")) for offs in ([0, 1, 2, 3], [0, 2, 2, 3]))
    assert len(plain) - len(one) == 2 * 4 * 8 and decode_request(one).jobs[0].offsets.tolist() == [0, 1, 2, 3]
    for _ in range(3):
        one, want = kind_request([None, None], "sum", True)
        got = decode_response(joined(svc.handle(one)), [w.shape for w in want])
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    assert len(svc._kinds) == 1
    svc.handle(kind_request([4, 4], "sum", True)[0])
    assert len(svc._kinds) == 2
    bad = bytearray(one)
    bad[12:20] = (2).to_bytes(8, "little")  # job 0 claims 2 ids for its 3 bags of one id
    assert "bad job header" in error_of_service(svc, bytes(bad))


def test_the_kinds_a_server_keeps_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """However many kinds of request clients send, a server keeps at most _MAX_KINDS of them and _MAX_KIND_JOBS
    jobs in all (the oldest go first); a kind larger than that is answered, exactly, without being kept."""
    from flexemr.server import pooling

    monkeypatch.setattr(pooling, "_MAX_KINDS", 3)
    monkeypatch.setattr(pooling, "_MAX_KIND_JOBS", 8)
    svc = fresh_service()
    sh = SHARDS[0]

    def request(jobs: int, bags: int) -> tuple[bytes, np.ndarray]:
        ids = np.arange(bags, dtype=np.int32) % (sh.row_end - sh.row_start)
        offs = np.arange(bags + 1)
        want = MODEL[sh.table][sh.row_start + ids.astype(np.int64)]
        return joined(encode_request([RequestJob(sh.table, sh.index, offs, ids, None)] * jobs, "sum")), want

    for jobs, bags in ((2, 1), (2, 2), (2, 3), (3, 4), (9, 5), (4, 6)):
        data, want = request(jobs, bags)
        for g in decode_response(joined(svc.handle(data)), [want.shape] * jobs):
            np.testing.assert_allclose(g, want, rtol=1e-6)
        assert len(svc._kinds) <= 3 and svc._kind_jobs == sum(k.plain.n_jobs for k in svc._kinds.values()) <= 8
    assert [k.plain.n_jobs for k in svc._kinds.values()] == [3, 4]  # (9, 5) was not kept; (4, 6) evicted two


async def test_submitted_requests_pool_on_the_service_thread_in_batches() -> None:
    """submit: requests waiting while a native call runs go together into the next; the calls run on the
    service's own thread (not the event loop's); a call that raises answers each of its requests with the
    error; close() ends the thread, and a later submit starts a new one."""
    svc = PoolService(PLAN, SHARDS, {sh.region_name: MODEL[sh.table][sh.row_start:sh.row_end] for sh in SHARDS})
    data, want = good_request()
    ran_on: list[str] = []
    real = svc.handle_many

    def spy(requests: list[bytes], payloads: list[object]) -> list[object]:
        ran_on.append(threading.current_thread().name)
        return real(requests, payloads)  # type: ignore[arg-type]

    svc.handle_many = spy  # type: ignore[method-assign, assignment]
    answers = await asyncio.gather(*(svc.submit(data) for _ in range(5)))
    for a in answers:
        for g, w in zip(decode_response(joined(a), [w.shape for w in want]), want):  # type: ignore[arg-type]
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    assert svc.requests == 5 and svc.calls == 2          # the first alone, the four that waited together
    assert ran_on == ["flexemr-pool"] * 2

    def boom(requests: list[bytes], payloads: list[object]) -> list[object]:
        raise RuntimeError("injected")

    svc.handle_many = boom  # type: ignore[method-assign, assignment]
    for a in await asyncio.gather(svc.submit(data), svc.submit(data)):
        with pytest.raises(TransportError, match="RuntimeError: injected"):
            decode_response(joined(a), [w.shape for w in want])  # type: ignore[arg-type]
    svc.close()
    assert not any(t.name == "flexemr-pool" for t in threading.enumerate())
    svc.handle_many = spy  # type: ignore[method-assign, assignment]
    assert decode_response(joined(await svc.submit(data)), [w.shape for w in want])  # type: ignore[arg-type]
    assert [t.name for t in threading.enumerate()].count("flexemr-pool") == 1
    svc.close()
    svc.close()                                          # idempotent
    assert not any(t.name == "flexemr-pool" for t in threading.enumerate())
