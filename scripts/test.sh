#!/usr/bin/env bash
# The project's test command (README: `make test`).
#
# 1. system packages for the verbs suite (root + apt only), then .venv with the
#    test, bench, apps, docs and ray extras and the torch extra (make torch)
# 2. the whole suite on this host (verbs tests skip here: no RDMA stack) and,
#    at the same time, in the background:
# 3. the verbs suite inside the Soft-RoCE VM, then the flexemr end-to-end tests
#    on verbs there, each with the number of tests executed printed and checked
#    once both are done, plus the rdmaio-vs-perftest ratio from the same VM run
# RDMAIO_REQUIRE_VERBS=1 (CI) turns "the VM could not run" into a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .cache

have_vm=1
bash scripts/system-deps.sh || have_vm=0
bash scripts/install.sh test,bench,apps,docs,ray
# the torch extra (flexemr.torch, the TorchRec peer): pinned CPU torch + TorchRec without deps
bash scripts/install-torch.sh
PY=.venv/bin/python

# The verbs suite runs in the Soft-RoCE VM (software-emulated, about one core) *beside* the host
# suite, which keeps about one core busy itself: the two together take about as long as the longer.
reason=""
if [ "$have_vm" = 0 ]; then
    reason="system packages for the VM could not be installed (not root or no apt)"
elif ! "$PY" -c 'import rdmaio._native._rdmaio_verbs' 2>/dev/null; then
    reason="rdmaio was built without the verbs extension (libibverbs-dev missing at install time)"
elif ! "$PY" -m rdmaio.testing.softroce --prepare -q; then
    reason="the Soft-RoCE VM could not be prepared (see the messages above)"
fi
vm_pid=""
if [ -z "$reason" ]; then
    rm -f .cache/verbs-junit.xml .cache/flexemr-verbs-junit.xml .cache/verbs-ratio.json .cache/verbs-vm.log
    echo "== verbs suite: started in the Soft-RoCE VM beside the host suite (output: .cache/verbs-vm.log)"
    "$PY" -m rdmaio.testing.softroce --timeout 3600 -- bash scripts/verbs-in-vm.sh > .cache/verbs-vm.log 2>&1 &
    vm_pid=$!
    trap '[ -n "$vm_pid" ] && kill "$vm_pid" 2>/dev/null' EXIT
fi

echo "== host suite"
host_rc=0
"$PY" -m pytest -q -p no:cacheprovider "$@" || host_rc=$?

echo "== verbs suite in the Soft-RoCE VM"
if [ -n "$reason" ]; then
    echo "verbs suite SKIPPED: $reason"
    if [ "${RDMAIO_REQUIRE_VERBS:-0}" = 1 ]; then
        echo "RDMAIO_REQUIRE_VERBS=1: failing" >&2
        exit 1
    fi
    exit "$host_rc"
fi
vm_rc=0
wait "$vm_pid" || vm_rc=$?
vm_pid=""
cat .cache/verbs-vm.log
if [ "$vm_rc" != 0 ]; then
    echo "the Soft-RoCE VM run failed (exit code $vm_rc)" >&2
    exit 1
fi
"$PY" - <<'PYEOF'
import sys
import xml.etree.ElementTree as ET

def counts(path):
    suites = ET.parse(path).getroot()
    suite = suites if suites.tag == "testsuite" else suites.find("testsuite")
    total, failed = int(suite.get("tests")), int(suite.get("failures")) + int(suite.get("errors"))
    skipped = int(suite.get("skipped"))
    return total - failed - skipped, failed, skipped

bad = []
for what, path in (("verbs tests", ".cache/verbs-junit.xml"), ("flexemr tests on verbs", ".cache/flexemr-verbs-junit.xml")):
    passed, failed, skipped = counts(path)
    print(f"{what} executed in the Soft-RoCE VM: {passed} passed, {failed} failed, {skipped} skipped")
    if passed == 0 or failed:
        bad.append(what)
if bad:
    sys.exit(f"the {' and the '.join(bad)} must run (and pass) inside the VM")
PYEOF
exit "$host_rc"
