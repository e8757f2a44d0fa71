"""cffi build of avmm_testdrv: the benchmarks' virtio driver (testdrv.c), apart from the product.

A test-only module: it plays a guest's virtio-blk and virtio-net drivers in a thread of
its own, for perf/blk.py and perf/net.py. tools/setup builds it into build/native/
(`python cext/build_testdrv.py [OUTDIR]`); asyncvmm._native does not contain it.
Its declarations are read from testdrv.h (cext/cdef.py), as the product's are.
"""

import sys
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cdef import SYSTEM_CDEF, header_cdef  # noqa: E402 (cext/cdef.py)

ffibuilder = FFI()
ffibuilder.cdef(SYSTEM_CDEF + header_cdef("testdrv.h"))
ffibuilder.set_source(
    "avmm_testdrv",
    '#include <sys/uio.h>\n#include "testdrv.h"\n',  # sys/uio.h: SYSTEM_CDEF's iovec
    sources=[str(HERE / "testdrv.c")],
    include_dirs=[str(HERE)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Werror", "-Wno-unused-function"],
)

if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else HERE.parent / "build" / "native").resolve()
    out.mkdir(parents=True, exist_ok=True)
    ffibuilder.compile(tmpdir=str(out / "tmp"), target=str(out / "avmm_testdrv.*"))
    print(out / "avmm_testdrv")
