# cffi's build hook cannot be declared in pyproject.toml yet; everything else lives there.
from setuptools import setup

setup(cffi_modules=["build_ffi.py:ffibuilder"])
