"""cffi build script for rdmaio's native data path (API mode).

Run by ``pip install`` through ``setup.py``'s ``cffi_modules``; it compiles
``rio.c`` with the machine's C compiler into ``rdmaio._native._rdmaio_native``.
"""

from __future__ import annotations

import pathlib

import cffi

HERE = pathlib.Path(__file__).resolve().parent

ffibuilder = cffi.FFI()
ffibuilder.cdef((HERE / "rio.h").read_text())
ffibuilder.set_source(
    "rdmaio._native._rdmaio_native",
    (HERE / "rio.c").read_text(),
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-unused-function"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
