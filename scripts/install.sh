#!/usr/bin/env bash
# Create .venv and install the project (editable) into it, with the extras named
# by $1 (default: apps, what `make demo` needs; `make test` asks for
# test,bench,apps,docs so the peer tests and the docs site's tests run).
# The native data path is compiled here by cffi; the verbs extension is built
# too when the libibverbs headers are present (scripts/system-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
EXTRAS="${1:-apps}"
.venv/bin/python -m pip install -q -e ".[$EXTRAS]"
touch .venv/.installed
