"""cffi build script for rdmaio's optional verbs data path (API mode).

``setup.py`` adds it to ``cffi_modules`` only when ``<infiniband/verbs.h>`` is
found (see :func:`have_verbs_headers`); it compiles ``verbs.c`` into
``rdmaio._native._rdmaio_verbs`` linked with ``-libverbs``.  Without it the
package still installs and imports; ``rdmaio.available_transports()["verbs"]``
then explains what is missing.
"""

from __future__ import annotations

import os
import pathlib

import cffi

HERE = pathlib.Path(__file__).resolve().parent

#: where the header is looked for (plus $CPATH / $C_INCLUDE_PATH entries)
INCLUDE_DIRS = ("/usr/include", "/usr/local/include")


def have_verbs_headers() -> bool:
    """True if ``infiniband/verbs.h`` exists in a standard include directory.

    ``RDMAIO_VERBS=0`` forces False (build without verbs), ``RDMAIO_VERBS=1`` forces True.
    """
    forced = os.environ.get("RDMAIO_VERBS", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    dirs = list(INCLUDE_DIRS)
    for var in ("CPATH", "C_INCLUDE_PATH"):
        dirs += [d for d in os.environ.get(var, "").split(os.pathsep) if d]
    return any(os.path.isfile(os.path.join(d, "infiniband", "verbs.h")) for d in dirs)


ffibuilder = cffi.FFI()
ffibuilder.cdef((HERE / "verbs.h").read_text())
ffibuilder.set_source(
    "rdmaio._native._rdmaio_verbs",
    (HERE / "verbs.c").read_text(),
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-unused-function", "-pthread"],
    extra_link_args=["-pthread"],
    libraries=["ibverbs"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
