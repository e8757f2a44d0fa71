"""CPU templates over a synthetic KVM_GET_SUPPORTED_CPUID table."""

import pytest

from asyncvmm.boot import cpuid
from asyncvmm.boot.cpuid import BASELINE_HIDDEN, Template, Topology, apply_template, feature_enabled, for_vcpu

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
        {"function": 0x4, "index": 0, "flags": 1, "eax": 0x0000_0121, "ebx": 0x01C0_003F, "ecx": 0x3F, "edx": 0},  # L1d
        {"function": 0x4, "index": 1, "flags": 1, "eax": 0x0000_0143, "ebx": 0x01C0_003F, "ecx": 0x3FF, "edx": 0},  # L2
        {"function": 0x4, "index": 2, "flags": 1, "eax": 0x0000_0163, "ebx": 0x03C0_003F, "ecx": 0x1FFF, "edx": 0},  # L3
        {"function": 0x4, "index": 3, "flags": 1, "eax": 0, "ebx": 0, "ecx": 0, "edx": 0},  # no more caches
        {"function": 0x8000_0008, "index": 0, "flags": 0, "eax": 0x3030, "ebx": 0, "ecx": 0x7001, "edx": 0},
        {"function": 0x8000_001D, "index": 2, "flags": 1, "eax": 0x0000_4163, "ebx": 0, "ecx": 0, "edx": 0},  # L3
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


def test_topology_apic_ids_pack_thread_core_socket():
    assert Topology.of(4).apic_ids() == [0, 1, 2, 3]  # -c 4: four sockets, as bhyve
    t = Topology(sockets=2, cores=3, threads=1)  # 3 cores take 2 bits: IDs have a gap
    assert (t.core_bits, t.thread_bits, t.package_bits) == (2, 0, 2)
    assert t.apic_ids() == [0, 1, 2, 4, 5, 6]
    t = Topology(sockets=2, cores=2, threads=2)
    assert t.apic_ids() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert t.place(5) == (1, 0, 1)


def test_for_vcpu_sets_apic_ids_single_threaded_sockets():
    out = for_vcpu(apply_template(supported(), Template.HOST), Topology.of(4), 3)
    l1 = leaf(out, 0x1)
    assert l1["ebx"] >> 24 == 3
    assert (l1["ebx"] >> 16) & 0xFF == 1  # one logical processor per package
    assert l1["ebx"] & 0xFFFF == 0x0800  # brand index / CLFLUSH size kept
    assert l1["edx"] >> 28 & 1 == 0  # no HTT: nothing shares a package
    assert leaf(out, 0xB)["edx"] == 3
    assert leaf(out, 0x8000_001E)["eax"] == 3
    assert leaf(out, 0x8000_001E)["ecx"] & 0xFF == 3  # its own node (package)


@pytest.mark.parametrize("vcpu", range(12))
def test_for_vcpu_reports_the_topology_in_every_leaf(vcpu):
    topo = Topology(sockets=2, cores=3, threads=2)  # 1 thread bit, 2 core bits
    socket, core, thread = topo.place(vcpu)
    apic = topo.apic_id(vcpu)
    assert apic == socket << 3 | core << 1 | thread
    out = for_vcpu(apply_template(supported(), Template.HOST), topo, vcpu)
    l1 = leaf(out, 0x1)
    assert (l1["ebx"] >> 24, l1["ebx"] >> 16 & 0xFF, l1["edx"] >> 28 & 1) == (apic, 8, 1)
    # 0xB: SMT level (shift 1, 2 threads), core level (shift 3, 6 logical), then the end.
    levels = [(e["eax"] & 0x1F, e["ebx"] & 0xFFFF, e["ecx"] >> 8 & 0xFF, e["ecx"] & 0xFF, e["edx"])
              for e in sorted((e for e in out if e["function"] == 0xB), key=lambda e: e["index"])]
    assert levels == [(1, 2, 1, 0, apic), (3, 6, 2, 1, apic), (0, 0, 0, 2, apic)]
    assert all(e["flags"] == 1 for e in out if e["function"] == 0xB)  # subleaf-indexed, as KVM said
    assert not any(e["function"] == 0x1F for e in out)  # KVM did not report 0x1F: not invented
    # Leaf 4: L1/L2 shared by a core's 2 threads, L3 by the package's 8 IDs; 4 cores (2 bits).
    sharing = [(leaf(out, 0x4, i)["eax"] >> 14 & 0xFFF) + 1 for i in range(3)]
    assert sharing == [2, 2, 8]
    assert {(leaf(out, 0x4, i)["eax"] >> 26) + 1 for i in range(3)} == {4}
    assert leaf(out, 0x4, 0)["eax"] & 0x3FFF == 0x121  # type and level kept
    assert leaf(out, 0x4, 3)["eax"] == 0
    assert (leaf(out, 0x8000_001D, 2)["eax"] >> 14 & 0xFFF) + 1 == 8
    # AMD: 0x80000008 ECX ApicIdCoreIdSize 3, NC = 6 - 1; 0x8000001E IDs.
    ecx = leaf(out, 0x8000_0008)["ecx"]
    assert (ecx >> 12 & 0xF, ecx & 0xFF, ecx & ~0xF0FF) == (3, 5, 0x7001 & ~0xF0FF)
    e = leaf(out, 0x8000_001E)
    assert (e["eax"], e["ebx"] & 0xFF, e["ebx"] >> 8 & 0xFF, e["ecx"] & 0xFF) == (apic, core, 1, socket)
