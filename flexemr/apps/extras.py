"""The applications' optional libraries (the ``apps`` extra) and the one-line error when one is missing.

``flexemr demo``, ``rank``, ``gen`` and the benchmarks draw figures with
matplotlib, show progress with tqdm and read Criteo/Parquet files with
pyarrow; ``pip install 'flexemr[apps]'`` (what ``make demo`` installs)
brings all three.  They are imported only where they are used, so
``import flexemr`` (and ``import rdmaio``) never imports them.

>>> require("json", "the report")           # present: nothing happens
>>> require("no_such_module_xyz", "reading Criteo files")
Traceback (most recent call last):
    ...
flexemr.core.errors.ConfigError: reading Criteo files needs no_such_module_xyz, from the 'apps' extra: pip install 'flexemr[apps]' (make demo installs it)
"""

from __future__ import annotations

import importlib.util

from ..core.errors import ConfigError

__all__ = ["APPS_EXTRA", "require"]

#: The optional dependency group of the applications (``pip install 'flexemr[apps]'``).
APPS_EXTRA = "apps"


def require(module: str, purpose: str, *, dist: str | None = None) -> None:
    """:class:`ConfigError` (one line naming the extra) unless ``module`` can be imported.

    ``purpose`` says what needs it; ``dist``: the pip name when it differs from the module's.
    """
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):        # a parent package missing, or a module without a spec
        found = False
    if not found:
        raise ConfigError(f"{purpose} needs {dist or module}, from the {APPS_EXTRA!r} extra: "
                          f"pip install 'flexemr[{APPS_EXTRA}]' (make demo installs it)")
