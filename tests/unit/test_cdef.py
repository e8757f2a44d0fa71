"""cext/cdef.py: cffi's declarations are read from the C headers, not re-typed."""

import sys
from pathlib import Path

CEXT = Path(__file__).resolve().parents[2] / "cext"
sys.path.insert(0, str(CEXT))
try:
    import cdef
finally:
    sys.path.remove(str(CEXT))


def test_the_light_pass_leaves_what_cffi_parses(tmp_path, monkeypatch):
    (tmp_path / "x.h").write_text(
        "#ifndef X_H\n#define X_H\n#include <stdint.h>\n"
        "#define X_MAX 8 /* a bound */\n"
        "struct x { uint32_t n; uint64_t v[X_MAX]; uint8_t raw[4]; }; // the state\n"
        "static inline int x_helper(const struct x *p)\n{\n    if (p->n) { return 1; }\n    return 0;\n}\n"
        "int x_use(struct x *p);\n#endif\n"
    )
    monkeypatch.setattr(cdef, "HERE", tmp_path)
    text = cdef.header_cdef("x.h")
    assert "#define X_MAX ...\n" in text and "X_H" not in text and "#include" not in text
    assert "uint64_t v[...];" in text and "uint8_t raw[4];" in text  # a literal size stays
    assert "x_helper" not in text and "return" not in text and "int x_use(struct x *p);" in text
    body = text.split("\n", 1)[1]  # after its "/* cext/x.h */" label
    assert "/*" not in body and "//" not in body


def test_every_function_of_the_product_headers_is_in_the_extension():
    import re

    from asyncvmm._native import lib

    for header in ("avmm.h", "virtq.h", "ioengine.h", "blk.h", "net.h"):
        for name in re.findall(r"\b(avmm_\w+)\s*\(", cdef.header_cdef(header)):
            assert hasattr(lib, name), f"{header}: {name}"
