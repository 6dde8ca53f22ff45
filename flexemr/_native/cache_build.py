"""cffi build script for the native parts of flexemr's ranker row cache (API mode).

Run by ``pip install`` through ``setup.py``'s ``cffi_modules``; it compiles
``cache.c`` into ``flexemr._native._flexemr_cache`` (portable C, no ``-march``).
"""

from __future__ import annotations

import pathlib

import cffi

HERE = pathlib.Path(__file__).resolve().parent

ffibuilder = cffi.FFI()
ffibuilder.cdef((HERE / "cache.h").read_text())
ffibuilder.set_source(
    "flexemr._native._flexemr_cache",
    (HERE / "cache.c").read_text(),
    include_dirs=[str(HERE)],
    extra_compile_args=["-O3", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
