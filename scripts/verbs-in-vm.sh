#!/usr/bin/env bash
# Runs INSIDE the Soft-RoCE VM (scripts/test.sh boots it): the verbs tests of the
# shared conformance suite plus the verbs-only tests, then the perftest ratio.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
"$PY" -m pytest -q --color=no -p no:cacheprovider -m verbs --junitxml=.cache/verbs-junit.xml tests/rdmaio
rc=$?
echo "== rdmaio verbs vs perftest on rxe0 (same VM run; emulated, only ratios mean anything)"
"$PY" -m rdmaio.testing.verbs_ratio || echo "ratio measurement failed (does not fail the suite)"
exit $rc
