"""cffi declarations read from our own C headers: the headers are the one source of truth.

`header_cdef("avmm.h", ...)` turns each header into text `ffi.cdef` accepts, by a light
pass that only removes what cffi's C parser does not take; nothing is re-typed:

- comments, `#include`, the include guard and other preprocessor conditionals go;
- `#define NAME VALUE` becomes `#define NAME ...` (the C compiler supplies the value);
- an array sized by a macro, `x[NAME]`, becomes `x[...]` (sized by the compiler too);
- `static inline` functions (C-only helpers) go, body and all.

Used by build_ffi.py (the product's asyncvmm._native) and build_testdrv.py (the
benchmarks' test-only driver). Linux's own structs stay in build_ffi.py's KVM_CDEF: those
headers are beyond cffi's parser, so only the fields Python uses are named there, each
struct ending in `...;` so that the compiler lays it out.
"""

from __future__ import annotations

import re
from pathlib import Path

HERE = Path(__file__).resolve().parent

# The types the headers take from the system headers they include.
SYSTEM_CDEF = """
struct iovec { void *iov_base; size_t iov_len; ...; };
struct vring_desc { uint64_t addr; uint32_t len; uint16_t flags; uint16_t next; };
struct vring_avail;
struct vring_used;
"""

_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_DEFINE = re.compile(r"^\s*#\s*define\s+(\w+)(\s+\S.*)?$")
_MACRO_ARRAY = re.compile(r"\[\s*([A-Za-z_]\w*)\s*\]")


def _drop_static_inline(text: str) -> str:
    out, pos = [], 0
    for m in re.finditer(r"\bstatic\s+inline\b", text):
        if m.start() < pos:
            continue  # inside a body already dropped
        brace = text.index("{", m.end())
        depth, i = 0, brace
        while True:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
            if depth == 0:
                break
        out.append(text[pos : m.start()])
        pos = i
    out.append(text[pos:])
    return "".join(out)


def header_cdef(*names: str) -> str:
    """The declarations of cext/NAME... as one cdef string."""
    parts = []
    for name in names:
        text = _COMMENT.sub(" ", (HERE / name).read_text())
        text = _drop_static_inline(text)
        lines = []
        for line in text.splitlines():
            m = _DEFINE.match(line)
            if m:
                if m.group(2):  # a value: the compiler's (an include guard has none)
                    lines.append(f"#define {m.group(1)} ...")
                continue
            if line.lstrip().startswith("#"):
                continue  # include, ifndef, endif
            lines.append(line)
        parts.append(f"/* cext/{name} */\n" + _MACRO_ARRAY.sub("[...]", "\n".join(lines)))
    return "\n".join(parts)


if __name__ == "__main__":  # show what cffi is given
    import sys

    print(header_cdef(*(sys.argv[1:] or ["avmm.h"])))
