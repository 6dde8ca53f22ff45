#!/usr/bin/env bash
# Create .venv and install the project (editable, with test tools) into it.
# The native data path is compiled here by cffi; the verbs extension is built
# too when the libibverbs headers are present (scripts/system-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
touch .venv/.installed
