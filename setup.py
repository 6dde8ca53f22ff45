# The native part of rdmaio (the software transport's data path) is compiled by cffi
# in API mode when the package is installed; everything else is in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["rdmaio/_native/build.py:ffibuilder"])
