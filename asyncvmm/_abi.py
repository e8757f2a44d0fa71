"""The version of the C core's interface (cext/) this Python code is written for.

The one place it is written: cext/build_ffi.py compiles it into asyncvmm._native as
AVMM_ABI_VERSION, and asyncvmm.vstate.kvm refuses an extension built for another one.
Bump it whenever the C side changes in a way the Python side depends on.
"""

ABI_VERSION = 21
