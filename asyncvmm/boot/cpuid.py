"""The guest's CPUID, built from KVM_GET_SUPPORTED_CPUID and a CPU template.

Templates:
  host      everything this KVM supports (what hardware KVM users want).
  baseline  the same minus the features an instruction-emulating KVM cannot execute
            (kvm_pvm here: SSE4/AVX arithmetic, popcnt, rdtscp, xsave, cmpxchg16b, SMAP's
            clac/stac, ...). A guest that sees a feature bit uses the instruction; hiding
            the bit is how the guest is told not to.

Each hidden feature is a row naming the leaf, register and bit as the SDM/APM do.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, IntEnum

from .._native import lib


class Template(str, Enum):
    HOST = "host"
    BASELINE = "baseline"


@dataclass(frozen=True)
class Feature:
    """A CPUID feature flag: bit `bit` of register `reg` in leaf `leaf`, subleaf `subleaf`."""

    name: str
    leaf: int
    subleaf: int
    reg: str
    bit: int


F = Feature
X2APIC = Feature("x2apic", 0x1, 0, "ecx", 21)  # hidden by -a: the local APIC in xAPIC mode, as bhyve's
# What the baseline template hides: instructions KVM's emulator cannot execute, and the
# features whose use brings them in (XSAVE → xgetbv/xrstor, SMAP → clac/stac).
BASELINE_HIDDEN: tuple[Feature, ...] = (
    F("pclmulqdq", 0x1, 0, "ecx", 1),
    F("ssse3", 0x1, 0, "ecx", 9),
    F("fma", 0x1, 0, "ecx", 12),
    F("cx16", 0x1, 0, "ecx", 13),
    F("pcid", 0x1, 0, "ecx", 17),
    F("sse4_1", 0x1, 0, "ecx", 19),
    F("sse4_2", 0x1, 0, "ecx", 20),
    F("popcnt", 0x1, 0, "ecx", 23),
    F("aes", 0x1, 0, "ecx", 25),
    F("xsave", 0x1, 0, "ecx", 26),
    F("osxsave", 0x1, 0, "ecx", 27),
    F("avx", 0x1, 0, "ecx", 28),
    F("f16c", 0x1, 0, "ecx", 29),
    F("fsgsbase", 0x7, 0, "ebx", 0),
    F("bmi1", 0x7, 0, "ebx", 3),
    F("hle", 0x7, 0, "ebx", 4),
    F("avx2", 0x7, 0, "ebx", 5),
    F("smep", 0x7, 0, "ebx", 7),
    F("bmi2", 0x7, 0, "ebx", 8),
    F("invpcid", 0x7, 0, "ebx", 10),
    F("rtm", 0x7, 0, "ebx", 11),
    F("avx512f", 0x7, 0, "ebx", 16),
    F("avx512dq", 0x7, 0, "ebx", 17),
    F("rdseed", 0x7, 0, "ebx", 18),
    F("adx", 0x7, 0, "ebx", 19),
    F("smap", 0x7, 0, "ebx", 20),
    F("avx512ifma", 0x7, 0, "ebx", 21),
    F("clflushopt", 0x7, 0, "ebx", 23),
    F("clwb", 0x7, 0, "ebx", 24),
    F("avx512pf", 0x7, 0, "ebx", 26),
    F("avx512er", 0x7, 0, "ebx", 27),
    F("avx512cd", 0x7, 0, "ebx", 28),
    F("sha_ni", 0x7, 0, "ebx", 29),
    F("avx512bw", 0x7, 0, "ebx", 30),
    F("avx512vl", 0x7, 0, "ebx", 31),
    F("avx512vbmi", 0x7, 0, "ecx", 1),
    F("umip", 0x7, 0, "ecx", 2),
    F("pku", 0x7, 0, "ecx", 3),
    F("avx512_vbmi2", 0x7, 0, "ecx", 6),
    F("gfni", 0x7, 0, "ecx", 8),
    F("vaes", 0x7, 0, "ecx", 9),
    F("vpclmulqdq", 0x7, 0, "ecx", 10),
    F("avx512_vnni", 0x7, 0, "ecx", 11),
    F("avx512_bitalg", 0x7, 0, "ecx", 12),
    F("avx512_vpopcntdq", 0x7, 0, "ecx", 14),
    F("la57", 0x7, 0, "ecx", 16),
    F("rdpid", 0x7, 0, "ecx", 22),
    F("movdiri", 0x7, 0, "ecx", 27),
    F("movdir64b", 0x7, 0, "ecx", 28),
    F("avx512_4vnniw", 0x7, 0, "edx", 2),
    F("avx512_4fmaps", 0x7, 0, "edx", 3),
    F("md_clear", 0x7, 0, "edx", 10),
    F("serialize", 0x7, 0, "edx", 14),
    F("avx512_fp16", 0x7, 0, "edx", 23),
    F("avx_vnni", 0x7, 1, "eax", 4),
    F("avx512_bf16", 0x7, 1, "eax", 5),
    F("sse4a", 0x8000_0001, 0, "ecx", 6),
    F("misalignsse", 0x8000_0001, 0, "ecx", 7),
    F("3dnowprefetch", 0x8000_0001, 0, "ecx", 8),
    F("xop", 0x8000_0001, 0, "ecx", 11),
    F("fma4", 0x8000_0001, 0, "ecx", 16),
    F("tbm", 0x8000_0001, 0, "ecx", 21),
    F("rdtscp", 0x8000_0001, 0, "edx", 27),
)

# KVM's paravirtual features (CPUID KVM_CPUID_FEATURES, EAX; <asm/kvm_para.h>) that a
# guest uses through a hypercall (vmcall/vmmcall). A KVM that emulates guest kernel code
# may not complete them (kvm_pvm here never returns from one), so asyncvmm's quirks hide
# them; what the guest then does instead is said for each.
KVM_HYPERCALL_FEATURES: tuple[Feature, ...] = (
    # KVM_HC_KICK_CPU wakes a vCPU halted in a paravirtual spinlock; else: native spinlocks.
    F("kvm_pv_unhalt", lib.KVM_CPUID_FEATURES, 0, "eax", lib.KVM_FEATURE_PV_UNHALT),
    # KVM_HC_SEND_IPI sends IPIs to many vCPUs at once; else: through the APIC's ICR.
    F("kvm_pv_send_ipi", lib.KVM_CPUID_FEATURES, 0, "eax", lib.KVM_FEATURE_PV_SEND_IPI),
    # KVM_HC_SCHED_YIELD yields to a preempted vCPU an IPI waits on; else: plain waiting.
    F("kvm_pv_sched_yield", lib.KVM_CPUID_FEATURES, 0, "eax", lib.KVM_FEATURE_PV_SCHED_YIELD),
    # KVM_HC_MAP_GPA_RANGE tells KVM about encrypted/shared pages (SEV guests).
    F("kvm_hc_map_gpa_range", lib.KVM_CPUID_FEATURES, 0, "eax", lib.KVM_FEATURE_HC_MAP_GPA_RANGE),
    F("kvm_migration_control", lib.KVM_CPUID_FEATURES, 0, "eax", lib.KVM_FEATURE_MIGRATION_CONTROL),
)

# Leaves that only describe features the baseline hides: dropped whole.
BASELINE_DROPPED_LEAVES = (0xD,)  # XSAVE state components

# CPUID.1:ECX[31] tells the guest it runs under a hypervisor.
HYPERVISOR_BIT = 31


def apply_template(entries: list[dict], template: Template) -> list[dict]:
    """A copy of `entries` (KVM_GET_SUPPORTED_CPUID's) shaped by `template`."""
    out = [dict(e) for e in entries]
    for e in out:
        if e["function"] == 0x1:
            e["ecx"] |= 1 << HYPERVISOR_BIT
    if template is Template.BASELINE:
        out = [e for e in out if e["function"] not in BASELINE_DROPPED_LEAVES]
        out = hide(out, BASELINE_HIDDEN)
    return out


def hide(entries: list[dict], features: tuple[Feature, ...]) -> list[dict]:
    """`entries` with the bits of `features` cleared (in place; returned for chaining)."""
    for f in features:
        for e in entries:
            if e["function"] == f.leaf and e["index"] == f.subleaf:
                e[f.reg] &= ~(1 << f.bit)
    return entries


@dataclass(frozen=True)
class Topology:
    """The vCPUs as sockets x cores x threads (bhyve's -c cpus=N,sockets=S,cores=C,threads=T).

    vCPU i is thread i % T of core (i // T) % C of socket i // (C*T). Its APIC ID packs
    those as the SDM's "APIC ID topology" does: the thread in the low `thread_bits`,
    the core above it, the socket on top, each field as wide as its count needs (so
    3 cores take 2 bits and the IDs have gaps). KVM's vCPU ID is the APIC ID, the
    MADT lists the same IDs, and CPUID reports the same fields (for_vcpu).
    """

    sockets: int = 1
    cores: int = 1
    threads: int = 1

    @classmethod
    def of(cls, cpus: int) -> "Topology":
        """bhyve's default for -c N: N sockets of one single-threaded core."""
        return cls(sockets=cpus)

    @property
    def cpus(self) -> int:
        return self.sockets * self.cores * self.threads

    @property
    def thread_bits(self) -> int:
        return (self.threads - 1).bit_length()

    @property
    def core_bits(self) -> int:
        return (self.cores - 1).bit_length()

    @property
    def package_bits(self) -> int:
        """APIC ID bits below the socket's: log2 of the logical processors a package can hold."""
        return self.thread_bits + self.core_bits

    def place(self, vcpu: int) -> tuple[int, int, int]:
        """(socket, core, thread) of vCPU `vcpu`."""
        return vcpu // (self.cores * self.threads), (vcpu // self.threads) % self.cores, vcpu % self.threads

    def apic_id(self, vcpu: int) -> int:
        socket, core, thread = self.place(vcpu)
        return socket << self.package_bits | core << self.thread_bits | thread

    def apic_ids(self) -> list[int]:
        return [self.apic_id(i) for i in range(self.cpus)]


class LevelType(IntEnum):
    """CPUID 0xB/0x1F ECX[15:8]: the topology level a subleaf describes."""

    INVALID = 0
    SMT = 1
    CORE = 2


# Leaf 4 / 0x8000001D EAX[7:5]: the cache level.
CACHE_LEVEL_SHIFT = 5
CACHE_LEVEL_MASK = 0b111
CACHE_TYPE_MASK = 0b11111  # EAX[4:0]: 0 = no more caches
CACHE_SHARING_SHIFT, CACHE_SHARING_MASK = 14, 0xFFF  # EAX[25:14]: logical processors sharing - 1
CORES_SHIFT, CORES_MASK = 26, 0x3F  # leaf 4 EAX[31:26]: cores per package - 1
TOPOLOGY_LEAVES = (0xB, 0x1F)


def for_vcpu(entries: list[dict], topology: Topology, vcpu: int) -> list[dict]:
    """vCPU `vcpu`'s CPUID: `entries` with its APIC ID and the topology where CPUID says them.

    Intel and AMD leaves both, as a guest reads whichever its vendor has: leaf 1 EBX
    (initial APIC ID, logical processors per package) and HTT; leaf 4 and AMD's 0x8000001D
    (which processors share each cache); leaves 0xB and 0x1F (the x2APIC topology, rebuilt
    whole); AMD's 0x80000008 ECX (cores per package) and 0x8000001E (extended APIC ID,
    core and node).
    """
    apic_id = topology.apic_id(vcpu)
    socket, core, _thread = topology.place(vcpu)
    per_package = 1 << topology.package_bits  # addressable IDs in a package
    out = []
    for e in entries:
        e = dict(e)
        fn = e["function"]
        if fn in TOPOLOGY_LEAVES:
            continue  # rebuilt below
        if fn == 0x1:
            # EBX[31:24] initial APIC ID, EBX[23:16] addressable logical processors per package.
            e["ebx"] = (e["ebx"] & 0x0000_FFFF) | (apic_id & 0xFF) << 24 | min(per_package, 255) << 16
            if topology.cores * topology.threads > 1:
                e["edx"] |= 1 << 28  # HTT: more than one logical processor per package
            else:
                e["edx"] &= ~(1 << 28)
        elif fn in (0x4, 0x8000_001D) and e["eax"] & CACHE_TYPE_MASK:
            level = e["eax"] >> CACHE_LEVEL_SHIFT & CACHE_LEVEL_MASK
            # L1 and L2 belong to a core (its threads share them), L3 to the package.
            sharing = 1 << topology.thread_bits if level <= 2 else per_package
            eax = e["eax"] & ~(CACHE_SHARING_MASK << CACHE_SHARING_SHIFT) | (sharing - 1) << CACHE_SHARING_SHIFT
            if fn == 0x4:
                cores = 1 << topology.core_bits
                eax = eax & ~(CORES_MASK << CORES_SHIFT) | (min(cores, 64) - 1) << CORES_SHIFT
            e["eax"] = eax
        elif fn == 0x8000_0008:
            # ECX[15:12] APIC ID bits of the logical processor within the package, ECX[7:0] its count - 1.
            e["ecx"] = e["ecx"] & ~0xF0FF | topology.package_bits << 12 | (topology.cores * topology.threads - 1)
        elif fn == 0x8000_001E:
            e["eax"] = apic_id  # extended APIC ID
            e["ebx"] = e["ebx"] & ~0xFFFF | (topology.threads - 1) << 8 | core  # threads per core - 1, core ID
            e["ecx"] = e["ecx"] & ~0x7FF | socket  # one node per package: node ID
        out.append(e)
    for fn in TOPOLOGY_LEAVES:
        # Only a leaf KVM reports (it does 0xB when the host has it, 0x1F likewise); its
        # flags say the subleaves are indexed.
        flags = next((e["flags"] for e in entries if e["function"] == fn), None)
        if flags is not None:
            out += _topology_leaf(fn, flags, topology, apic_id)
    return out


def _topology_leaf(fn: int, flags: int, topology: Topology, apic_id: int) -> list[dict]:
    """Leaf 0xB/0x1F subleaves: the SMT level, the core level, then the invalid level that
    ends the list. EAX[4:0] is the shift to the next level's ID, EBX[15:0] the logical
    processors at this level, ECX the level type and number, EDX the x2APIC ID."""
    levels = [
        (LevelType.SMT, topology.thread_bits, topology.threads),
        (LevelType.CORE, topology.package_bits, topology.cores * topology.threads),
        (LevelType.INVALID, 0, 0),
    ]
    return [
        {"function": fn, "index": i, "flags": flags, "eax": shift, "ebx": count,
         "ecx": level << 8 | i, "edx": apic_id}
        for i, (level, shift, count) in enumerate(levels)
    ]


def feature_enabled(entries: list[dict], feature: Feature) -> bool:
    for e in entries:
        if e["function"] == feature.leaf and e["index"] == feature.subleaf:
            return bool(e[feature.reg] >> feature.bit & 1)
    return False
