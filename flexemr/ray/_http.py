"""Sending ranking requests to the HTTP rankers: a small load generator that checks the CTRs.

:func:`rank_over_http` posts pre-encoded requests (:func:`~flexemr.ray._request.encode_request`)
from ``concurrency`` threads, each on one kept-alive connection, and
measures samples/s and per-request latency; with a reference model it checks
the first ``check_samples`` CTRs of every answer.  ``flexemr ray rank`` and
the Ray benchmark use it.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..apps.dlrm import DLRM, ReferenceTables, head_of
from ..apps.trace import TraceBatch
from ..core.errors import ConfigError, FlexEMRError
from ._request import encode_request

__all__ = ["HttpRankResult", "check_result", "rank_over_http", "split_url"]


@dataclass
class HttpRankResult:
    """What :func:`rank_over_http` measured."""

    requests: int = 0
    samples: int = 0
    seconds: float = 0.0
    samples_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    concurrency: int = 1
    failed: int = 0
    checked_samples: int = 0
    max_abs_err: float | None = None
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def split_url(url: str) -> tuple[str, int, str]:
    """``(host, port, path)`` of an ``http://`` URL (:class:`~flexemr.ConfigError` otherwise)."""
    u = urllib.parse.urlsplit(url)
    if u.scheme != "http" or not u.hostname:
        raise ConfigError(f"--url must be http://HOST:PORT/PATH, got {url!r}")
    return u.hostname, u.port or 80, u.path or "/"


def post(conn: http.client.HTTPConnection, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
    """POST ``body``; ``(status, decoded JSON answer)``."""
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    try:
        out = json.loads(data)
    except ValueError:
        out = {"error": data[:200].decode(errors="replace")}
    return resp.status, out if isinstance(out, dict) else {"error": repr(out)[:200]}


def rank_over_http(url: str, batches: Sequence[TraceBatch], *, concurrency: int = 2, warmup: int = 1,
                   model: DLRM | None = None, reference: ReferenceTables | None = None, check_samples: int = 32,
                   timeout: float = 120.0) -> HttpRankResult:
    """Rank ``batches`` (the first ``warmup`` untimed) over HTTP; every batch goes out once."""
    if concurrency < 1:
        raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
    host, port, path = split_url(url)
    bodies = [encode_request(b.dense, b.sparse) for b in batches]
    result = HttpRankResult(concurrency=concurrency)
    errs: list[float] = []
    lock = threading.Lock()
    latencies: list[float] = []

    def check(i: int, ctr: list[float]) -> None:
        if model is None or reference is None or check_samples <= 0:
            return
        b = batches[i]
        k = min(check_samples, b.batch_size)
        want = model.reference_forward(b.dense[:k], head_of(b.sparse, k), reference)
        with lock:
            errs.append(float(np.max(np.abs(np.asarray(ctr[:k], dtype=np.float32) - want))))
            result.checked_samples += k

    def one(conn: http.client.HTTPConnection, i: int, timed: bool) -> None:
        t0 = time.perf_counter()
        try:
            status, out = post(conn, path, bodies[i])
        except (OSError, http.client.HTTPException) as exc:
            status, out = 0, {"error": f"{type(exc).__name__}: {exc}"}
            conn.close()
        dt = time.perf_counter() - t0
        if status != 200 or not isinstance(out.get("ctr"), list) or len(out["ctr"]) != batches[i].batch_size:
            with lock:
                result.failed += 1
                if len(result.errors) < 5:
                    result.errors.append(f"request {i}: HTTP {status}: {out.get('error', out)}")
            return
        check(i, out["ctr"])
        if timed:
            with lock:
                latencies.append(dt)
                result.requests += 1
                result.samples += batches[i].batch_size

    warm = list(range(min(warmup, len(batches))))
    timed = list(range(len(warm), len(batches))) or warm
    conn0 = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        for i in warm:
            one(conn0, i, timed=False)
    finally:
        conn0.close()
    todo = iter(timed)

    def worker() -> None:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            while True:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                one(conn, i, timed=True)
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.seconds = time.perf_counter() - t0
    if result.samples:
        result.samples_per_s = result.samples / result.seconds
        lat = np.asarray(latencies) * 1e3
        result.p50_ms = float(np.percentile(lat, 50))
        result.p99_ms = float(np.percentile(lat, 99))
    result.max_abs_err = max(errs) if errs else None
    return result


def check_result(result: HttpRankResult, tolerance: float) -> None:
    """:class:`FlexEMRError` when a request failed or a checked CTR is off by more than ``tolerance``."""
    if result.failed:
        raise FlexEMRError(f"{result.failed} request(s) failed: {'; '.join(result.errors)}")
    if result.max_abs_err is not None and result.max_abs_err > tolerance:
        raise FlexEMRError(f"CTRs differ from the local reference by {result.max_abs_err:.2e} (> {tolerance:g}): "
                           f"do the servers' --seed and the model's --model-seed match this run's?")
