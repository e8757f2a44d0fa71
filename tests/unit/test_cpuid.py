"""CPU templates over a synthetic KVM_GET_SUPPORTED_CPUID table."""

from asyncvmm.boot import cpuid
from asyncvmm.boot.cpuid import BASELINE_HIDDEN, Template, apply_template, feature_enabled, for_vcpu

ALL = 0xFFFF_FFFF


def supported():
    return [
        {"function": 0x0, "index": 0, "flags": 0, "eax": 0xD, "ebx": 1, "ecx": 2, "edx": 3},
        {"function": 0x1, "index": 0, "flags": 0, "eax": 0x806F8, "ebx": 0x0000_0800, "ecx": ALL & ~(1 << 31), "edx": ALL & ~(1 << 28)},
        {"function": 0x7, "index": 0, "flags": 1, "eax": 1, "ebx": ALL, "ecx": ALL, "edx": ALL},
        {"function": 0x7, "index": 1, "flags": 1, "eax": ALL, "ebx": 0, "ecx": 0, "edx": 0},
        {"function": 0xB, "index": 0, "flags": 1, "eax": 1, "ebx": 1, "ecx": 0x100, "edx": 0},
        {"function": 0xD, "index": 0, "flags": 1, "eax": 7, "ebx": 0, "ecx": 0, "edx": 0},
        {"function": 0x8000_0001, "index": 0, "flags": 0, "eax": 0, "ebx": 0, "ecx": ALL, "edx": ALL},
        {"function": 0x8000_001E, "index": 0, "flags": 0, "eax": 0, "ebx": 0, "ecx": 0, "edx": 0},
    ]


def leaf(entries, fn, idx=0):
    return next(e for e in entries if e["function"] == fn and e["index"] == idx)


def test_host_keeps_everything_and_says_hypervisor():
    out = apply_template(supported(), Template.HOST)
    assert leaf(out, 0x7)["ebx"] == ALL
    assert leaf(out, 0x1)["ecx"] == ALL  # bit 31 (hypervisor) now set, the rest kept
    assert any(e["function"] == 0xD for e in out)


def test_baseline_hides_each_listed_feature_and_nothing_else():
    src = supported()
    out = apply_template(src, Template.BASELINE)
    for f in BASELINE_HIDDEN:
        if any(e["function"] == f.leaf and e["index"] == f.subleaf for e in src):
            assert not feature_enabled(out, f), f.name
    hidden = {(f.leaf, f.subleaf, f.reg): 0 for f in BASELINE_HIDDEN}
    for f in BASELINE_HIDDEN:
        hidden[(f.leaf, f.subleaf, f.reg)] |= 1 << f.bit
    for e in out:
        for reg in ("eax", "ebx", "ecx", "edx"):
            before = leaf(src, e["function"], e["index"])[reg]
            if e["function"] == 0x1 and reg == "ecx":
                before |= 1 << cpuid.HYPERVISOR_BIT
            assert e[reg] == before & ~hidden.get((e["function"], e["index"], reg), 0)
    assert not any(e["function"] == 0xD for e in out)  # XSAVE leaf dropped with xsave


def test_baseline_names_what_the_emulator_lacks():
    names = {f.name for f in BASELINE_HIDDEN}
    for must in ("popcnt", "rdtscp", "cx16", "xsave", "avx", "avx2", "smap", "sse4_2", "pclmulqdq", "rdpid"):
        assert must in names


def test_input_is_not_modified():
    src = supported()
    apply_template(src, Template.BASELINE)
    assert src == supported()


def test_for_vcpu_sets_apic_ids():
    out = for_vcpu(apply_template(supported(), Template.HOST), 3, 4)
    l1 = leaf(out, 0x1)
    assert l1["ebx"] >> 24 == 3
    assert (l1["ebx"] >> 16) & 0xFF == 4
    assert l1["ebx"] & 0xFFFF == 0x0800  # brand index / CLFLUSH size kept
    assert l1["edx"] >> 28 & 1 == 1  # HTT
    assert leaf(out, 0xB)["edx"] == 3
    assert leaf(out, 0x8000_001E)["eax"] == 3
