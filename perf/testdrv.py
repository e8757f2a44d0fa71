"""The benchmarks' virtio driver (cext/testdrv.c): a test-only extension, not in asyncvmm.

tools/setup builds it into build/native/avmm_testdrv.so; this module puts that directory on
the path and gives its `ffi` and `lib`.
"""

import sys
from pathlib import Path

NATIVE = Path(__file__).resolve().parent.parent / "build" / "native"
sys.path.insert(0, str(NATIVE))
try:
    from avmm_testdrv import ffi, lib  # noqa: E402,F401
except ImportError as e:
    raise SystemExit(f"perf: the test driver is not built ({e}): run tools/setup") from None
