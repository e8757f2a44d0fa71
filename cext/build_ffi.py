"""cffi build of asyncvmm._native (API mode).

The KVM structs and constants come from <linux/kvm.h> through the C compiler: the cdef
below only names the fields Python uses and ends each struct with `...;`, and every
constant is `...`, so no layout or number is re-typed here.
"""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

# Bumped whenever the C side changes in a way the Python side depends on;
# asyncvmm.vstate.kvm refuses to run with an extension built for another version.
ABI_VERSION = 3

KVM_CONSTANTS = """
KVM_API_VERSION
KVM_GET_API_VERSION KVM_CREATE_VM KVM_CHECK_EXTENSION KVM_GET_VCPU_MMAP_SIZE
KVM_GET_SUPPORTED_CPUID KVM_GET_MSR_INDEX_LIST KVM_GET_MSR_FEATURE_INDEX_LIST
KVM_CREATE_VCPU KVM_SET_USER_MEMORY_REGION KVM_SET_TSS_ADDR KVM_SET_IDENTITY_MAP_ADDR
KVM_CREATE_IRQCHIP KVM_CREATE_PIT2 KVM_IRQ_LINE KVM_IRQFD KVM_IOEVENTFD KVM_ENABLE_CAP
KVM_RUN KVM_GET_REGS KVM_SET_REGS KVM_GET_SREGS KVM_SET_SREGS KVM_SET_CPUID2 KVM_GET_CPUID2
KVM_GET_MSRS KVM_SET_MSRS KVM_GET_VCPU_EVENTS KVM_SET_VCPU_EVENTS KVM_TRANSLATE
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
""".split()

CDEF = """
typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef int __s32;

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
struct kvm_fpu { __u16 fcw; __u16 fsw; ...; };
struct kvm_vcpu_events {
    struct { __u8 injected; __u8 nr; __u8 has_error_code; __u8 pending; __u32 error_code; } exception;
    struct { __u8 injected; __u8 nr; __u8 soft; __u8 shadow; } interrupt;
    struct { __u8 injected; __u8 pending; __u8 masked; __u8 pad; } nmi;
    __u32 sipi_vector;
    __u32 flags;
    ...;
};
"""

AVMM_CDEF = """
enum avmm_exit_kind { AVMM_EXIT_NONE, AVMM_EXIT_IO, AVMM_EXIT_MMIO, AVMM_EXIT_STOP, AVMM_EXIT_ERROR };
enum avmm_action { AVMM_ACTION_NONE, AVMM_ACTION_RESUME, AVMM_ACTION_QUIT };
enum avmm_vcpu_state { AVMM_VCPU_IDLE, AVMM_VCPU_RUNNING, AVMM_VCPU_WAITING, AVMM_VCPU_PAUSED, AVMM_VCPU_DONE };
enum avmm_uart_fast { AVMM_UART_FAST_THR, AVMM_UART_FAST_LSR };
#define AVMM_NR_REASONS ...
#define AVMM_ABI_VERSION ...

struct avmm_exit {
    uint32_t kind; uint32_t kvm_reason; uint64_t addr; uint32_t size; uint32_t count;
    uint32_t is_write; int32_t err; uint8_t *data; uint64_t value; uint64_t info[18];
};
struct avmm_vcpu_stats {
    uint64_t exits[...]; uint64_t fast_io; uint64_t posted; uint64_t kicks;
    uint64_t ns_in_run; uint64_t ns_waiting; uint64_t ns_exits[...]; uint64_t ns_fast_io;
    uint64_t samples; uint64_t samples_dropped; uint64_t first_high_rip_ns;
};
struct avmm_vm;

struct avmm_vm *avmm_vm_new(int nvcpus, int notify_efd, int console_efd);
void avmm_vm_free(struct avmm_vm *vm);
int avmm_vcpu_attach(struct avmm_vm *vm, int idx, int vcpu_fd, size_t mmap_size);
void *avmm_vcpu_run_struct(struct avmm_vm *vm, int idx);
int avmm_vcpu_start(struct avmm_vm *vm, int idx, int host_cpu);
struct avmm_exit *avmm_vcpu_exit(struct avmm_vm *vm, int idx);
struct avmm_vcpu_stats *avmm_vcpu_stats(struct avmm_vm *vm, int idx);
int avmm_vcpu_state(struct avmm_vm *vm, int idx);
void avmm_vcpu_complete(struct avmm_vm *vm, int idx, int action);
int avmm_vm_collect(struct avmm_vm *vm, int *out, int max, uint64_t poll_ns);
void avmm_vm_pause(struct avmm_vm *vm);
void avmm_vm_resume(struct avmm_vm *vm);
void avmm_vm_stop(struct avmm_vm *vm);
int avmm_vm_set_sampling(struct avmm_vm *vm, uint64_t period_ns, size_t capacity);
size_t avmm_vcpu_samples(struct avmm_vm *vm, int idx, uint64_t *out, size_t max);
void avmm_uart_fast_set(struct avmm_vm *vm, int base, int flags, int lsr_shadow);
size_t avmm_console_drain(struct avmm_vm *vm, uint8_t *out, size_t cap);
long avmm_ioctl(int fd, unsigned long request, void *arg);
long avmm_ioctl_val(int fd, unsigned long request, unsigned long arg);
int avmm_run_once(int vcpu_fd, void *run);
void *avmm_map_run(int vcpu_fd, size_t mmap_size);
void avmm_unmap(void *addr, size_t size);
"""

ffibuilder = FFI()
ffibuilder.cdef(
    CDEF
    + "".join(f"#define {name} ...\n" for name in KVM_CONSTANTS)
    + AVMM_CDEF
)
ffibuilder.set_source(
    "asyncvmm._native",
    f'#include <linux/kvm.h>\n#include <linux/kvm_para.h>\n#include "avmm.h"\n#define AVMM_ABI_VERSION {ABI_VERSION}\n',
    sources=["cext/vcpu_loop.c"],
    include_dirs=["cext"],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Werror", "-Wno-unused-function"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
