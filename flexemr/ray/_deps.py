"""Ray itself: imported on first use, with an error that says how to install it."""

from __future__ import annotations

import importlib
from types import ModuleType

from ..core.errors import FlexEMRError

__all__ = ["RAY_VERSION", "DependencyError", "ray", "ray_missing", "serve"]

#: The Ray release the ``ray`` extra pins (``pyproject.toml``); others may work.
RAY_VERSION = "2.58.0"
INSTALL = f"install the ray extra: pip install -e '.[ray]' (ray[serve]=={RAY_VERSION})"


class DependencyError(FlexEMRError, ImportError):
    """Ray (with Serve) is not installed or cannot be imported; the message says how to install it."""


def _load(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise DependencyError(f"flexemr.ray needs {name} ({type(exc).__name__}: {exc}); {INSTALL}") from exc


def ray() -> ModuleType:
    """The :mod:`ray` module (:class:`DependencyError` when missing)."""
    return _load("ray")


def serve() -> ModuleType:
    """The :mod:`ray.serve` module (:class:`DependencyError` when missing)."""
    return _load("ray.serve")


def ray_missing() -> str | None:
    """Why Ray cannot be used here, or ``None``."""
    try:
        serve()
    except DependencyError as exc:
        return str(exc)
    return None
