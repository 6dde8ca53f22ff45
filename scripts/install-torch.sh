#!/usr/bin/env bash
# Install TorchRec on the CPU into .venv (the peer of `flexemr bench compare` and
# `flexemr bench kernel`).  Idempotent: every step is skipped when its packages
# are already installed at the pinned versions.
#
# The pins matter: torch==2.13.0 resolves to the CPU build; any other version,
# or an open range, pulls a multi-GB CUDA build.  fbgemm-gpu-cpu and torchrec
# are installed without their dependencies (which would pull that CUDA torch).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    bash scripts/install.sh test,bench
fi
PIP=(.venv/bin/python -m pip install -q)

# has NAME VERSION: is distribution NAME installed (at VERSION, if given)?
has() {
    .venv/bin/python - "$@" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
name, want = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else ""
try:
    got = version(name)
except PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if not want or got.split("+")[0] == want else 1)
PY
}

if has torch 2.13.0; then
    echo "torch 2.13.0: installed"
else
    "${PIP[@]}" torch==2.13.0
fi
if has fbgemm-gpu-cpu 1.8.0 && has torchrec 1.8.0; then
    echo "fbgemm-gpu-cpu 1.8.0, torchrec 1.8.0: installed"
else
    "${PIP[@]}" --no-deps fbgemm-gpu-cpu==1.8.0 torchrec==1.8.0
fi
if has tensordict && has torchmetrics 1.0.3 && has pyre-extensions && has tqdm; then
    echo "tensordict, torchmetrics 1.0.3, pyre-extensions, tqdm: installed"
else
    "${PIP[@]}" tensordict torchmetrics==1.0.3 pyre-extensions tqdm
fi
.venv/bin/python -c "import torch, fbgemm_gpu, torchrec; print('torch', torch.__version__, '/ torchrec', torchrec.__version__)"
