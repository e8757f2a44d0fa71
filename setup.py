# The cffi extension (cext/build_ffi.py) is declared here: setuptools reads cffi_modules
# only through setup(); everything else is in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["cext/build_ffi.py:ffibuilder"])
