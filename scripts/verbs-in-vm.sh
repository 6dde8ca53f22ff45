#!/usr/bin/env bash
# Runs INSIDE the Soft-RoCE VM (scripts/test.sh boots it): a numpy self-check,
# the verbs tests of the shared conformance suite plus the verbs-only tests, then
# the perftest ratio.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
# numpy must sort correctly on the emulated CPU, or every result below is suspect
"$PY" -m rdmaio.testing.guestcheck || { echo "the guest's numpy is not trustworthy: failing the VM run" >&2; exit 3; }
"$PY" -m pytest -q --color=no -p no:cacheprovider -m verbs --junitxml=.cache/verbs-junit.xml tests/rdmaio
rc=$?
echo "== rdmaio verbs vs perftest on rxe0 (same VM run; emulated, only ratios mean anything)"
"$PY" -m rdmaio.testing.verbs_ratio || echo "ratio measurement failed (does not fail the suite)"
exit $rc
