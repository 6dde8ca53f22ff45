"""``python -m flexemr.bench locality`` runs end to end on a tiny configuration (not a timing test)."""

from __future__ import annotations

import json

import pytest

from flexemr.bench.__main__ import COMMANDS, main


def test_locality_bench_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert "locality" in COMMANDS
    rc = main(["locality", "--json", "--tables", "2", "--rows", "20000", "--dim", "16", "--batch", "64",
               "--pooling", "8", "--warmup", "1", "--batches", "2", "--profile-batches", "1",
               "--naive-ids", "200", "--cache-mb", "1", "--transport", "tcp"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == ["naive", "coalesce", "cache", "pooling", "all", "local"]
    for name, r in out.items():
        assert r["samples_per_s"] > 0, name
        assert r["bytes_per_sample"] >= 0, name
    assert out["local"]["bytes_per_sample"] == 0
    assert out["naive"]["bytes_per_sample"] == pytest.approx(out["naive"]["reads_per_sample"] * 16 * 4)
    assert out["coalesce"]["bytes_per_sample"] < out["naive"]["bytes_per_sample"]
