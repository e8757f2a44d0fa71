"""cffi build of asyncvmm._native (API mode).

Our own C core's declarations are read from its headers (cext/cdef.py): nothing of
cext/*.h is re-typed here. The KVM structs and constants come from <linux/kvm.h> through
the C compiler: KVM_CDEF below only names the fields Python uses and ends each struct with
`...;`, and every constant is `...`, so no layout or number is re-typed either.

The benchmarks' virtio driver (testdrv.c) is not in this extension: build_testdrv.py
builds it apart, for perf/ only.
"""

import os
import re
import sys
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cdef import SYSTEM_CDEF, header_cdef  # noqa: E402 (cext/cdef.py)

# The one place the ABI version is written: asyncvmm/_abi.py (asyncvmm.vstate.kvm refuses
# an extension built for another one).
ABI_VERSION = int(re.search(r"^ABI_VERSION = (\d+)", (HERE.parent / "asyncvmm" / "_abi.py").read_text(), re.M).group(1))

# The headers of the product's C core, in the order they build on one another.
HEADERS = ("avmm.h", "virtq.h", "ioengine.h", "blk.h", "blk_thread.h", "net.h", "net_thread.h", "seccomp.h", "snapshot.h")

KVM_CONSTANTS = """
KVM_API_VERSION
KVM_GET_API_VERSION KVM_CREATE_VM KVM_CHECK_EXTENSION KVM_GET_VCPU_MMAP_SIZE
KVM_GET_SUPPORTED_CPUID KVM_GET_MSR_INDEX_LIST KVM_GET_MSR_FEATURE_INDEX_LIST
KVM_CREATE_VCPU KVM_SET_USER_MEMORY_REGION KVM_MEM_READONLY KVM_CAP_READONLY_MEM KVM_SET_TSS_ADDR KVM_SET_IDENTITY_MAP_ADDR
KVM_CREATE_IRQCHIP KVM_CREATE_PIT2 KVM_IRQ_LINE KVM_IRQFD KVM_IOEVENTFD KVM_ENABLE_CAP
KVM_RUN KVM_GET_REGS KVM_SET_REGS KVM_GET_SREGS KVM_SET_SREGS KVM_SET_CPUID2 KVM_GET_CPUID2
KVM_GET_MSRS KVM_SET_MSRS KVM_GET_VCPU_EVENTS KVM_SET_VCPU_EVENTS KVM_TRANSLATE
KVM_NMI KVM_GET_DEBUGREGS KVM_SET_DEBUGREGS
KVM_GET_MP_STATE KVM_SET_MP_STATE KVM_GET_FPU KVM_SET_FPU KVM_GET_LAPIC KVM_SET_LAPIC
KVM_CAP_IRQCHIP KVM_CAP_USER_MEMORY KVM_CAP_NR_VCPUS KVM_CAP_MAX_VCPUS KVM_CAP_IRQFD
KVM_CAP_PIT2 KVM_CAP_IOEVENTFD KVM_CAP_IMMEDIATE_EXIT KVM_CAP_EXT_CPUID
KVM_CAP_EXIT_ON_EMULATION_FAILURE KVM_CAP_SET_TSS_ADDR KVM_CAP_TSC_DEADLINE_TIMER
KVM_PIT_SPEAKER_DUMMY
KVM_EXIT_UNKNOWN KVM_EXIT_EXCEPTION KVM_EXIT_IO KVM_EXIT_HYPERCALL KVM_EXIT_DEBUG KVM_EXIT_HLT
KVM_EXIT_MMIO KVM_EXIT_IRQ_WINDOW_OPEN KVM_EXIT_SHUTDOWN KVM_EXIT_FAIL_ENTRY KVM_EXIT_INTR
KVM_EXIT_SET_TPR KVM_EXIT_TPR_ACCESS KVM_EXIT_NMI KVM_EXIT_INTERNAL_ERROR KVM_EXIT_SYSTEM_EVENT
KVM_INTERNAL_ERROR_EMULATION KVM_INTERNAL_ERROR_SIMUL_EX KVM_INTERNAL_ERROR_DELIVERY_EV
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
KVM_SYSTEM_EVENT_SHUTDOWN KVM_SYSTEM_EVENT_RESET KVM_SYSTEM_EVENT_CRASH
KVM_VCPUEVENT_VALID_NMI_PENDING KVM_VCPUEVENT_VALID_SIPI_VECTOR KVM_VCPUEVENT_VALID_SHADOW
KVM_MP_STATE_RUNNABLE KVM_MP_STATE_UNINITIALIZED
KVM_CPUID_SIGNATURE KVM_CPUID_FEATURES
KVM_FEATURE_PV_UNHALT KVM_FEATURE_PV_SEND_IPI KVM_FEATURE_PV_SCHED_YIELD
KVM_FEATURE_HC_MAP_GPA_RANGE KVM_FEATURE_MIGRATION_CONTROL
KVM_SET_GSI_ROUTING KVM_IRQ_ROUTING_IRQCHIP KVM_IRQ_ROUTING_MSI KVM_IRQCHIP_PIC_MASTER
KVM_IRQCHIP_PIC_SLAVE KVM_IRQCHIP_IOAPIC KVM_IOEVENTFD_FLAG_DATAMATCH KVM_IOEVENTFD_FLAG_PIO
KVM_IOEVENTFD_FLAG_DEASSIGN KVM_IRQFD_FLAG_DEASSIGN KVM_CAP_IRQ_ROUTING KVM_CAP_IOEVENTFD_ANY_LENGTH
KVM_SET_GUEST_DEBUG KVM_CAP_SET_GUEST_DEBUG KVM_GUESTDBG_ENABLE KVM_GUESTDBG_SINGLESTEP
KVM_GUESTDBG_USE_SW_BP KVM_GUESTDBG_USE_HW_BP KVM_GUESTDBG_INJECT_BP KVM_GUESTDBG_INJECT_DB
KVM_GET_XSAVE KVM_SET_XSAVE KVM_GET_XCRS KVM_SET_XCRS KVM_GET_IRQCHIP KVM_SET_IRQCHIP
KVM_GET_PIT2 KVM_SET_PIT2 KVM_GET_CLOCK KVM_SET_CLOCK KVM_GET_DIRTY_LOG KVM_MEM_LOG_DIRTY_PAGES
KVM_CAP_XSAVE KVM_CAP_XCRS KVM_CAP_ADJUST_CLOCK KVM_CAP_DEBUGREGS KVM_CAP_VCPU_EVENTS
KVM_VCPUEVENT_VALID_SMM
KVM_GET_STATS_FD KVM_CAP_BINARY_STATS_FD KVM_STATS_TYPE_MASK KVM_STATS_TYPE_CUMULATIVE
KVM_STATS_TYPE_INSTANT KVM_STATS_TYPE_PEAK
""".split()

# <linux/pci_regs.h>: the configuration header, capability IDs, MSI-X.
PCI_CONSTANTS = """
PCI_CFG_SPACE_SIZE PCI_CFG_SPACE_EXP_SIZE PCI_STD_NUM_BARS
PCI_VENDOR_ID PCI_DEVICE_ID PCI_COMMAND PCI_STATUS PCI_CLASS_REVISION PCI_REVISION_ID
PCI_CLASS_PROG PCI_CLASS_DEVICE PCI_CACHE_LINE_SIZE PCI_LATENCY_TIMER PCI_HEADER_TYPE PCI_BIST
PCI_BASE_ADDRESS_0 PCI_BASE_ADDRESS_5 PCI_SUBSYSTEM_VENDOR_ID PCI_SUBSYSTEM_ID PCI_ROM_ADDRESS
PCI_CAPABILITY_LIST PCI_INTERRUPT_LINE PCI_INTERRUPT_PIN PCI_MIN_GNT PCI_MAX_LAT
PCI_COMMAND_IO PCI_COMMAND_MEMORY PCI_COMMAND_MASTER PCI_COMMAND_SPECIAL PCI_COMMAND_INVALIDATE
PCI_COMMAND_VGA_PALETTE PCI_COMMAND_PARITY PCI_COMMAND_WAIT PCI_COMMAND_SERR PCI_COMMAND_FAST_BACK
PCI_COMMAND_INTX_DISABLE
PCI_STATUS_INTERRUPT PCI_STATUS_CAP_LIST PCI_STATUS_66MHZ PCI_STATUS_FAST_BACK PCI_STATUS_PARITY
PCI_STATUS_SIG_TARGET_ABORT PCI_STATUS_REC_TARGET_ABORT PCI_STATUS_REC_MASTER_ABORT
PCI_STATUS_SIG_SYSTEM_ERROR PCI_STATUS_DETECTED_PARITY
PCI_HEADER_TYPE_NORMAL PCI_HEADER_TYPE_MASK
PCI_BASE_ADDRESS_SPACE_IO PCI_BASE_ADDRESS_SPACE_MEMORY PCI_BASE_ADDRESS_MEM_TYPE_32
PCI_BASE_ADDRESS_MEM_TYPE_64 PCI_BASE_ADDRESS_MEM_PREFETCH
PCI_CAP_LIST_ID PCI_CAP_LIST_NEXT PCI_CAP_ID_MSI PCI_CAP_ID_VNDR PCI_CAP_ID_EXP PCI_CAP_ID_MSIX
PCI_MSIX_FLAGS PCI_MSIX_FLAGS_QSIZE PCI_MSIX_FLAGS_MASKALL PCI_MSIX_FLAGS_ENABLE PCI_MSIX_TABLE
PCI_MSIX_TABLE_BIR PCI_MSIX_TABLE_OFFSET PCI_MSIX_PBA PCI_MSIX_PBA_BIR PCI_MSIX_PBA_OFFSET
PCI_CAP_MSIX_SIZEOF PCI_MSIX_ENTRY_SIZE PCI_MSIX_ENTRY_LOWER_ADDR PCI_MSIX_ENTRY_UPPER_ADDR
PCI_MSIX_ENTRY_DATA PCI_MSIX_ENTRY_VECTOR_CTRL PCI_MSIX_ENTRY_CTRL_MASKBIT
PCI_MSI_FLAGS PCI_MSI_FLAGS_ENABLE PCI_MSI_FLAGS_QMASK PCI_MSI_FLAGS_QSIZE PCI_MSI_FLAGS_64BIT PCI_MSI_FLAGS_MASKBIT
PCI_MSI_ADDRESS_LO PCI_MSI_ADDRESS_HI PCI_MSI_DATA_64 PCI_MSI_MASK_64 PCI_MSI_PENDING_64
""".split()

# <linux/virtio_*.h>: status, features, the PCI transport, the ring, the block device.
VIRTIO_CONSTANTS = """
VIRTIO_CONFIG_S_ACKNOWLEDGE VIRTIO_CONFIG_S_DRIVER VIRTIO_CONFIG_S_DRIVER_OK
VIRTIO_CONFIG_S_FEATURES_OK VIRTIO_CONFIG_S_NEEDS_RESET VIRTIO_CONFIG_S_FAILED
VIRTIO_F_NOTIFY_ON_EMPTY VIRTIO_F_ANY_LAYOUT VIRTIO_F_VERSION_1 VIRTIO_F_ACCESS_PLATFORM
VIRTIO_F_RING_PACKED VIRTIO_F_IN_ORDER VIRTIO_F_ORDER_PLATFORM VIRTIO_F_SR_IOV VIRTIO_F_RING_RESET
VIRTIO_RING_F_INDIRECT_DESC VIRTIO_RING_F_EVENT_IDX
VRING_DESC_F_NEXT VRING_DESC_F_WRITE VRING_DESC_F_INDIRECT VRING_USED_F_NO_NOTIFY
VRING_AVAIL_F_NO_INTERRUPT
VIRTIO_ID_NET VIRTIO_ID_BLOCK VIRTIO_ID_CONSOLE VIRTIO_ID_RNG
VIRTIO_CONSOLE_F_SIZE VIRTIO_CONSOLE_F_MULTIPORT VIRTIO_CONSOLE_F_EMERG_WRITE VIRTIO_CONSOLE_BAD_ID
VIRTIO_CONSOLE_DEVICE_READY VIRTIO_CONSOLE_PORT_ADD VIRTIO_CONSOLE_PORT_REMOVE VIRTIO_CONSOLE_PORT_READY
VIRTIO_CONSOLE_CONSOLE_PORT VIRTIO_CONSOLE_RESIZE VIRTIO_CONSOLE_PORT_OPEN VIRTIO_CONSOLE_PORT_NAME
VIRTIO_PCI_CAP_COMMON_CFG VIRTIO_PCI_CAP_NOTIFY_CFG VIRTIO_PCI_CAP_ISR_CFG VIRTIO_PCI_CAP_DEVICE_CFG
VIRTIO_PCI_CAP_PCI_CFG VIRTIO_MSI_NO_VECTOR VIRTIO_PCI_ISR_CONFIG
VIRTIO_PCI_COMMON_DFSELECT VIRTIO_PCI_COMMON_DF VIRTIO_PCI_COMMON_GFSELECT VIRTIO_PCI_COMMON_GF
VIRTIO_PCI_COMMON_MSIX VIRTIO_PCI_COMMON_NUMQ VIRTIO_PCI_COMMON_STATUS VIRTIO_PCI_COMMON_CFGGENERATION
VIRTIO_PCI_COMMON_Q_SELECT VIRTIO_PCI_COMMON_Q_SIZE VIRTIO_PCI_COMMON_Q_MSIX VIRTIO_PCI_COMMON_Q_ENABLE
VIRTIO_PCI_COMMON_Q_NOFF VIRTIO_PCI_COMMON_Q_DESCLO VIRTIO_PCI_COMMON_Q_DESCHI
VIRTIO_PCI_COMMON_Q_AVAILLO VIRTIO_PCI_COMMON_Q_AVAILHI VIRTIO_PCI_COMMON_Q_USEDLO
VIRTIO_PCI_COMMON_Q_USEDHI
VIRTIO_BLK_F_SIZE_MAX VIRTIO_BLK_F_SEG_MAX VIRTIO_BLK_F_GEOMETRY VIRTIO_BLK_F_RO VIRTIO_BLK_F_BLK_SIZE
VIRTIO_BLK_F_TOPOLOGY VIRTIO_BLK_F_MQ VIRTIO_BLK_F_DISCARD VIRTIO_BLK_F_WRITE_ZEROES VIRTIO_BLK_F_FLUSH
VIRTIO_BLK_F_CONFIG_WCE
VIRTIO_BLK_T_IN VIRTIO_BLK_T_OUT VIRTIO_BLK_T_FLUSH VIRTIO_BLK_T_GET_ID VIRTIO_BLK_T_DISCARD
VIRTIO_BLK_T_WRITE_ZEROES VIRTIO_BLK_S_OK VIRTIO_BLK_S_IOERR VIRTIO_BLK_S_UNSUPP
VIRTIO_BLK_ID_BYTES VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
VIRTIO_NET_F_CSUM VIRTIO_NET_F_GUEST_CSUM VIRTIO_NET_F_CTRL_GUEST_OFFLOADS VIRTIO_NET_F_MTU VIRTIO_NET_F_MAC
VIRTIO_NET_F_GUEST_TSO4 VIRTIO_NET_F_GUEST_TSO6 VIRTIO_NET_F_GUEST_ECN VIRTIO_NET_F_GUEST_UFO
VIRTIO_NET_F_HOST_TSO4 VIRTIO_NET_F_HOST_TSO6 VIRTIO_NET_F_HOST_ECN VIRTIO_NET_F_HOST_UFO
VIRTIO_NET_F_MRG_RXBUF VIRTIO_NET_F_STATUS VIRTIO_NET_F_CTRL_VQ VIRTIO_NET_F_CTRL_RX
VIRTIO_NET_F_CTRL_VLAN VIRTIO_NET_F_CTRL_RX_EXTRA VIRTIO_NET_F_GUEST_ANNOUNCE VIRTIO_NET_F_MQ
VIRTIO_NET_F_CTRL_MAC_ADDR VIRTIO_NET_F_SPEED_DUPLEX VIRTIO_NET_S_LINK_UP VIRTIO_NET_S_ANNOUNCE
VIRTIO_NET_HDR_F_NEEDS_CSUM VIRTIO_NET_HDR_F_DATA_VALID VIRTIO_NET_HDR_GSO_NONE VIRTIO_NET_HDR_GSO_TCPV4
VIRTIO_NET_HDR_GSO_UDP VIRTIO_NET_HDR_GSO_TCPV6 VIRTIO_NET_HDR_GSO_ECN VIRTIO_NET_OK VIRTIO_NET_ERR
VIRTIO_NET_CTRL_RX VIRTIO_NET_CTRL_RX_PROMISC VIRTIO_NET_CTRL_RX_ALLMULTI VIRTIO_NET_CTRL_RX_ALLUNI
VIRTIO_NET_CTRL_RX_NOMULTI VIRTIO_NET_CTRL_RX_NOUNI VIRTIO_NET_CTRL_RX_NOBCAST VIRTIO_NET_CTRL_MAC
VIRTIO_NET_CTRL_MAC_TABLE_SET VIRTIO_NET_CTRL_MAC_ADDR_SET VIRTIO_NET_CTRL_VLAN VIRTIO_NET_CTRL_VLAN_ADD
VIRTIO_NET_CTRL_VLAN_DEL VIRTIO_NET_CTRL_ANNOUNCE VIRTIO_NET_CTRL_ANNOUNCE_ACK VIRTIO_NET_CTRL_MQ
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX
VIRTIO_NET_CTRL_GUEST_OFFLOADS VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET
TUNSETIFF TUNGETIFF TUNSETOFFLOAD TUNSETVNETHDRSZ TUNSETQUEUE TUNSETPERSIST IFF_TAP IFF_NO_PI IFF_VNET_HDR
IFF_MULTI_QUEUE IFF_ATTACH_QUEUE IFF_DETACH_QUEUE IFF_TUN_EXCL TUN_F_CSUM TUN_F_TSO4 TUN_F_TSO6
TUN_F_TSO_ECN TUN_F_UFO
FALLOC_FL_KEEP_SIZE FALLOC_FL_PUNCH_HOLE FALLOC_FL_ZERO_RANGE RWF_DSYNC
""".split()

KVM_CDEF = """
typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef int __s32;
typedef short __s16;

struct kvm_regs {
    __u64 rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    __u64 r8, r9, r10, r11, r12, r13, r14, r15;
    __u64 rip, rflags;
};
struct kvm_segment {
    __u64 base; __u32 limit; __u16 selector; __u8 type; __u8 present, dpl, db, s, l, g, avl;
    __u8 unusable; ...;
};
struct kvm_dtable { __u64 base; __u16 limit; ...; };
struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss, tr, ldt;
    struct kvm_dtable gdt, idt;
    __u64 cr0, cr2, cr3, cr4, cr8, efer, apic_base;
    __u64 interrupt_bitmap[...];
};
struct kvm_cpuid_entry2 {
    __u32 function; __u32 index; __u32 flags; __u32 eax, ebx, ecx, edx; ...;
};
struct kvm_cpuid2 { __u32 nent; struct kvm_cpuid_entry2 entries[]; ...; };
struct kvm_msr_entry { __u32 index; __u64 data; ...; };
struct kvm_debugregs { __u64 db[4]; __u64 dr6; __u64 dr7; __u64 flags; ...; };
struct kvm_msrs { __u32 nmsrs; struct kvm_msr_entry entries[]; ...; };
struct kvm_msr_list { __u32 nmsrs; __u32 indices[]; };
struct kvm_userspace_memory_region {
    __u32 slot; __u32 flags; __u64 guest_phys_addr; __u64 memory_size; __u64 userspace_addr;
};
struct kvm_pit_config { __u32 flags; ...; };
struct kvm_irqfd { __u32 fd; __u32 gsi; __u32 flags; __u32 resamplefd; ...; };
struct kvm_ioeventfd { __u64 datamatch; __u64 addr; __u32 len; __s32 fd; __u32 flags; ...; };
struct kvm_irq_level { __u32 irq; __u32 level; };
struct kvm_translation {
    __u64 linear_address; __u64 physical_address; __u8 valid; __u8 writeable; __u8 usermode; ...;
};
struct kvm_enable_cap { __u32 cap; __u32 flags; __u64 args[4]; ...; };
struct kvm_mp_state { __u32 mp_state; };
struct kvm_fpu {
    __u8 fpr[8][16]; __u16 fcw; __u16 fsw; __u8 ftwx; __u16 last_opcode; __u64 last_ip; __u64 last_dp;
    __u8 xmm[16][16]; __u32 mxcsr; ...;
};
struct kvm_guest_debug_arch { __u64 debugreg[8]; };
struct kvm_guest_debug { __u32 control; struct kvm_guest_debug_arch arch; ...; };
struct kvm_irq_routing_irqchip { __u32 irqchip; __u32 pin; };
struct kvm_irq_routing_msi { __u32 address_lo; __u32 address_hi; __u32 data; __u32 devid; };
struct kvm_irq_routing_entry {
    __u32 gsi; __u32 type; __u32 flags;
    union { struct kvm_irq_routing_irqchip irqchip; struct kvm_irq_routing_msi msi; __u32 pad[8]; } u;
    ...;
};
struct kvm_irq_routing { __u32 nr; __u32 flags; struct kvm_irq_routing_entry entries[]; };
/* KVM_GET_STATS_FD's file: a header, then descriptors (each followed by its name) */
struct kvm_stats_header {
    __u32 flags; __u32 name_size; __u32 num_desc; __u32 id_offset; __u32 desc_offset; __u32 data_offset;
};
struct kvm_stats_desc { __u32 flags; __s16 exponent; __u16 size; __u32 offset; __u32 bucket_size; ...; };

/* virtio and PCI layouts the Python models read and write (offsets from the C compiler) */
struct virtio_pci_cap {
    __u8 cap_vndr; __u8 cap_next; __u8 cap_len; __u8 cfg_type; __u8 bar; __u8 id;
    __u32 offset; __u32 length; ...;
};
struct virtio_pci_notify_cap { struct virtio_pci_cap cap; __u32 notify_off_multiplier; ...; };
struct virtio_pci_common_cfg { ...; };
struct vring_used_elem { __u32 id; __u32 len; };
struct virtio_net_hdr_v1 {
    __u8 flags; __u8 gso_type; __u16 hdr_len; __u16 gso_size; __u16 csum_start; __u16 csum_offset;
    __u16 num_buffers;
};
struct virtio_net_config { __u8 mac[6]; __u16 status; __u16 max_virtqueue_pairs; __u16 mtu; ...; };
struct virtio_blk_outhdr { __u32 type; __u32 ioprio; __u64 sector; };
struct virtio_blk_discard_write_zeroes { __u64 sector; __u32 num_sectors; __u32 flags; };
struct virtio_blk_config {
    __u64 capacity; __u32 size_max; __u32 seg_max;
    __u32 blk_size; __u8 physical_block_exp; __u8 alignment_offset; __u16 min_io_size;
    __u32 opt_io_size; __u8 wce; __u16 num_queues; __u32 max_discard_sectors;
    __u32 max_discard_seg; __u32 discard_sector_alignment; __u32 max_write_zeroes_sectors;
    __u32 max_write_zeroes_seg; __u8 write_zeroes_may_unmap; ...;
};

/* vCPU and VM state a snapshot keeps as the kernel's bytes (sizes from the compiler) */
struct kvm_xsave { ...; };
struct kvm_xcrs { __u32 nr_xcrs; __u32 flags; ...; };
struct kvm_lapic_state { ...; };
struct kvm_irqchip { __u32 chip_id; ...; };
struct kvm_pit_state2 { ...; };
struct kvm_clock_data { __u64 clock; __u32 flags; ...; };
struct kvm_dirty_log { __u32 slot; union { void *dirty_bitmap; __u64 padding2; }; ...; };

struct kvm_vcpu_events {
    struct { __u8 injected; __u8 nr; __u8 has_error_code; __u8 pending; __u32 error_code; } exception;
    struct { __u8 injected; __u8 nr; __u8 soft; __u8 shadow; } interrupt;
    struct { __u8 injected; __u8 pending; __u8 masked; __u8 pad; } nmi;
    __u32 sipi_vector;
    __u32 flags;
    ...;
};
"""

ffibuilder = FFI()
ffibuilder.cdef(
    KVM_CDEF
    + "".join(f"#define {name} ...\n" for name in KVM_CONSTANTS + PCI_CONSTANTS + VIRTIO_CONSTANTS)
    + SYSTEM_CDEF
    + "#define AVMM_ABI_VERSION ...\n"
    + header_cdef(*HEADERS)
)
# ASYNCVMM_SANITIZE=address,undefined builds the extension with those sanitizers
# (tools/test --asan: the test suite runs on it with the runtime preloaded).
_san = os.environ.get("ASYNCVMM_SANITIZE", "")
SANITIZE = [f"-fsanitize={_san}", "-fno-omit-frame-pointer", "-g", "-O1"] if _san else []

ffibuilder.set_source(
    "asyncvmm._native",
    "#include <linux/kvm.h>\n#include <linux/kvm_para.h>\n#include <linux/pci_regs.h>\n#include <linux/virtio_config.h>\n"
    "#include <linux/virtio_ids.h>\n#include <linux/virtio_pci.h>\n#include <linux/virtio_ring.h>\n"
    "#include <linux/virtio_blk.h>\n#include <linux/virtio_net.h>\n#include <linux/virtio_console.h>\n#include <linux/if_tun.h>\n#include <linux/falloc.h>\n"
    + "".join(f'#include "{h}"\n' for h in HEADERS)
    + f"#define AVMM_ABI_VERSION {ABI_VERSION}\n",
    sources=["cext/vcpu_loop.c", "cext/virtq.c", "cext/ioengine.c", "cext/blk.c", "cext/blk_thread.c", "cext/devthread.c", "cext/net.c", "cext/net_thread.c",
             "cext/seccomp.c", "cext/snapshot.c"],
    include_dirs=["cext"],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Werror", "-Wno-unused-function", *SANITIZE],
    extra_link_args=SANITIZE,
    libraries=["pthread", "uring"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
