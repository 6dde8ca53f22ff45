"""cffi build script for flexemr's native embedding kernel (API mode).

Run by ``pip install`` through ``setup.py``'s ``cffi_modules``; it compiles
``kernel.c`` with the machine's C compiler into
``flexemr._native._flexemr_kernel``.  The code is portable C with GCC/Clang
vector extensions; no ``-march``: the build runs on any x86-64 (SSE2) or
aarch64 machine.
"""

from __future__ import annotations

import pathlib

import cffi

HERE = pathlib.Path(__file__).resolve().parent

ffibuilder = cffi.FFI()
ffibuilder.cdef((HERE / "kernel.h").read_text())
ffibuilder.set_source(
    "flexemr._native._flexemr_kernel",
    (HERE / "kernel.c").read_text(),
    include_dirs=[str(HERE)],
    extra_compile_args=["-O3", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-unused-function",
                        "-Wno-psabi"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
