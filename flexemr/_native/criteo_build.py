"""cffi build script for flexemr's text-column parser and bag hasher (API mode).

Run by ``pip install`` through ``setup.py``'s ``cffi_modules``; it compiles
``criteo.c`` into ``flexemr._native._flexemr_criteo`` (used by
:mod:`flexemr.core.textcols`).  Portable C (GCC/Clang ``__int128``), no ``-march``.
"""

from __future__ import annotations

import pathlib

import cffi

HERE = pathlib.Path(__file__).resolve().parent

ffibuilder = cffi.FFI()
ffibuilder.cdef((HERE / "criteo.h").read_text())
ffibuilder.set_source(
    "flexemr._native._flexemr_criteo",
    (HERE / "criteo.c").read_text(),
    include_dirs=[str(HERE)],
    extra_compile_args=["-O3", "-std=gnu11", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
