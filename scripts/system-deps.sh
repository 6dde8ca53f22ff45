#!/usr/bin/env bash
# System packages for the verbs suite: qemu + Debian kernel tooling for the
# Soft-RoCE VM, rdma-core/perftest/pyverbs, and the libibverbs headers the verbs
# extension compiles against; redis-server for a benchmark peer; chromium for
# the docs site's browser test (tests/test_docs.py).  Only missing
# packages are installed and nothing already installed is upgraded unless a new
# dependency forces it, which is printed first (README: why).  Needs root and
# apt; otherwise it says what is missing and exits 1 (the verbs suite then skips
# with that reason).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "system-deps: not root or no apt-get: install the Soft-RoCE packages yourself" \
         "(see docs/softroce.md); the verbs suite will be skipped" >&2
    exit 1
fi
if [ ! -d /var/lib/apt/lists ] || [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v lock || true)" ]; then
    apt-get update -qq
fi
# only what is missing, and nothing already installed is upgraded (--no-upgrade)
# except what a new dependency forces, which is printed first
install_missing() {  # PACKAGE WHAT-IS-LOST-WITHOUT-IT
    if dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q " installed$"; then
        return 0
    fi
    local forced
    forced=$(LC_ALL=C apt-get -s install --no-install-recommends --no-upgrade "$1" 2>/dev/null \
        | sed -n 's/^Inst \([^ ]*\) \[\([^]]*\)\] (\([^ ]*\).*/\1 \2 -> \3/p' | paste -sd, - || true)
    if [ -n "$forced" ]; then
        echo "system-deps: installing $1 forces apt to upgrade: $forced" >&2
    fi
    # a failure may be stale package lists (security updates move versions): update once, retry
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends --no-upgrade "$1" >/dev/null \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
             apt-get install -y -qq --no-install-recommends --no-upgrade "$1" >/dev/null; } \
        || echo "system-deps: $1 not installed: $2" >&2
}
install_missing redis-server "the Redis peer of flexemr bench compare will be skipped"
install_missing chromium "the docs site's browser test (tests/test_docs.py) cannot run"
# the package list lives in one place: rdmaio/testing/softroce.py (APT_PACKAGES);
# the module is stdlib-only, so it runs by path before anything is built
"$PYTHON" rdmaio/testing/softroce.py --install-deps -q || {
    apt-get update -qq && "$PYTHON" rdmaio/testing/softroce.py --install-deps -q; }
