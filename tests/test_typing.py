"""The packages type-check: ``mypy`` (configured in pyproject.toml's ``[tool.mypy]``) reports no errors."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


# a cold run (no .mypy_cache) analyses numpy and, with the bench extra, torch: allow more than the suite's 120 s
@pytest.mark.timeout(600)
def test_mypy_is_clean() -> None:
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (the test extra pins it: pip install -e '.[test]')")
    proc = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, (
        f"mypy failed (exit {proc.returncode}); reproduce with: python -m mypy\n{proc.stdout}{proc.stderr}"
    )
