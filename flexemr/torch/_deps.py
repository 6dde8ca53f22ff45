"""Optional dependencies of :mod:`flexemr.torch`: torch (always) and torchrec (where a TorchRec type is needed).

``import flexemr.torch`` imports torch; torchrec is imported by :func:`torchrec`
on first use, so the numpy conversions work with torch alone.  A missing
package is one :class:`DependencyError` naming the install steps.
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

from ..core.errors import FlexEMRError

__all__ = ["INSTALL_STEPS", "DependencyError", "torchrec", "torchrec_missing"]

#: How to install the ``torch`` extra on a CPU-only machine (the same steps as ``make torch``).
INSTALL_STEPS = (
    "run `make torch`, or: .venv/bin/pip install torch==2.13.0 && "
    ".venv/bin/pip install --no-deps fbgemm-gpu-cpu==1.8.0 torchrec==1.8.0 && "
    ".venv/bin/pip install tensordict torchmetrics==1.0.3 pyre-extensions tqdm (docs/torch.md)"
)


class DependencyError(FlexEMRError, ImportError):
    """torch or torchrec is not installed (or cannot be imported); the message says how to install it."""


_TORCHREC: ModuleType | None = None


def torchrec() -> ModuleType:
    """The :mod:`torchrec` module, imported once; :class:`DependencyError` when it cannot be imported.

    fbgemm-gpu-cpu announces optimizers it lacks on CPU with a
    ``DeprecationWarning`` at import time; it is silenced for the import only.
    """
    global _TORCHREC
    if _TORCHREC is None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                _TORCHREC = importlib.import_module("torchrec")
        except ImportError as exc:
            raise DependencyError(f"this needs torchrec ({type(exc).__name__}: {exc}); {INSTALL_STEPS}") from exc
    return _TORCHREC


def torchrec_missing() -> str | None:
    """``None`` when torchrec imports, else the one-line reason (with the install steps)."""
    try:
        torchrec()
    except DependencyError as exc:
        return str(exc)
    return None
