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
from enum import Enum

from .._native import lib


class Template(str, Enum):
    HOST = "host"
    BASELINE = "baseline"


@dataclass(frozen=True)
class Feature:
    name: str
    leaf: int
    subleaf: int
    reg: str
    bit: int


F = Feature
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


def for_vcpu(entries: list[dict], vcpu: int, nvcpus: int) -> list[dict]:
    """Per-vCPU identity: the initial APIC ID where CPUID reports it."""
    out = [dict(e) for e in entries]
    for e in out:
        fn = e["function"]
        if fn == 0x1:
            # EBX[31:24] initial APIC ID, EBX[23:16] logical processors per package.
            e["ebx"] = (e["ebx"] & 0x0000_FFFF) | (vcpu << 24) | (min(nvcpus, 255) << 16)
            if nvcpus > 1:
                e["edx"] |= 1 << 28  # HTT: the EBX[23:16] count is valid
        elif fn in (0xB, 0x1F):
            e["edx"] = vcpu  # x2APIC ID
        elif fn == 0x8000_001E:
            e["eax"] = vcpu  # AMD extended APIC ID
    return out


def feature_enabled(entries: list[dict], feature: Feature) -> bool:
    for e in entries:
        if e["function"] == feature.leaf and e["index"] == feature.subleaf:
            return bool(e[feature.reg] >> feature.bit & 1)
    return False
