#!/usr/bin/env bash
# Runs INSIDE the Soft-RoCE VM (scripts/test.sh boots it): a numpy self-check,
# the verbs tests of the shared conformance suite plus the verbs-only tests, the
# flexemr end-to-end tests on transport="verbs" (the same tests as on tcp), then
# the perftest ratio.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
# numpy must sort correctly on the emulated CPU, or every result below is suspect
"$PY" -m rdmaio.testing.guestcheck || { echo "the guest's numpy is not trustworthy: failing the VM run" >&2; exit 3; }
"$PY" -m pytest -q --color=no -p no:cacheprovider -m verbs --junitxml=.cache/verbs-junit.xml tests/rdmaio
rc=$?
echo "== flexemr end to end on verbs (lookups, server pooling, cache, replicas + failover, updates, several clients)"
"$PY" -m pytest -q --color=no -p no:cacheprovider -m verbs --junitxml=.cache/flexemr-verbs-junit.xml \
    tests/flexemr/test_e2e.py tests/flexemr/test_pooled_e2e.py tests/flexemr/test_cache_e2e.py \
    tests/flexemr/test_replicas.py tests/flexemr/test_updates.py
frc=$?
[ "$rc" = 0 ] && rc=$frc
echo "== rdmaio verbs vs perftest on rxe0 (same VM run; emulated, only ratios mean anything)"
"$PY" -m rdmaio.testing.verbs_ratio || echo "ratio measurement failed (does not fail the suite)"
exit $rc
