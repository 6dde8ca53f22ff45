#!/usr/bin/env bash
# System packages for the verbs suite: qemu + Debian kernel tooling for the
# Soft-RoCE VM, rdma-core/perftest/pyverbs, and the libibverbs headers the verbs
# extension compiles against; redis-server for a benchmark peer.  Only missing
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
if ! dpkg-query -W -f='${Status}' redis-server 2>/dev/null | grep -q " installed$"; then
    apt-get install -y -qq --no-install-recommends --no-upgrade redis-server >/dev/null \
        || echo "system-deps: redis-server not installed: the Redis peer of flexemr bench compare will be skipped" >&2
fi
# the package list lives in one place: rdmaio/testing/softroce.py (APT_PACKAGES);
# the module is stdlib-only, so it runs by path before anything is built
"$PYTHON" rdmaio/testing/softroce.py --install-deps -q || {
    apt-get update -qq && "$PYTHON" rdmaio/testing/softroce.py --install-deps -q; }
