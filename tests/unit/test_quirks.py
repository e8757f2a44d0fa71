"""The emulating-KVM quirks that need no guest (the others are in the guest tests)."""

from asyncvmm.quirks import XSAVEERPTR, Quirks


def entries():
    return [{"function": 0x8000_0008, "index": 0, "flags": 0, "eax": 0x3030, "ebx": 0x1, "ecx": 0, "edx": 0}]


def test_xsaveerptr_is_set_only_with_quirks():
    leaf, reg, bit = XSAVEERPTR
    assert Quirks(True).adjust_cpuid(entries())[0][reg] == 0x1 | (1 << bit)
    assert Quirks(False).adjust_cpuid(entries())[0][reg] == 0x1
