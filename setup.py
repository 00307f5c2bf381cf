# setuptools needs setup() to take `cffi_modules`; everything else is in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["libkvmrr/build_ffi.py:ffibuilder"])
