# The native parts of rdmaio (and flexemr's embedding kernel) are compiled by cffi in API mode when the package is
# installed; everything else is in pyproject.toml.  The verbs data path is optional:
# it is built only when the libibverbs headers are present (apt-get install
# libibverbs-dev), so the package installs everywhere.
import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "rdmaio", "_native"))
try:
    from verbs_build import have_verbs_headers
finally:
    sys.path.pop(0)

cffi_modules = ["rdmaio/_native/build.py:ffibuilder", "flexemr/_native/build.py:ffibuilder",
                "flexemr/_native/criteo_build.py:ffibuilder", "flexemr/_native/cache_build.py:ffibuilder"]
if have_verbs_headers():
    cffi_modules.append("rdmaio/_native/verbs_build.py:ffibuilder")

setup(cffi_modules=cffi_modules)
