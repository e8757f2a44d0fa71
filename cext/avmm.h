/*
 * asyncvmm's C core: native vCPU threads and the exit hand-off to the asyncio loop.
 *
 * Thread ownership
 *   - A vCPU thread owns its kvm_run and its `exit` slot while it is RUNNING.
 *   - When it posts an exit it becomes WAITING: from then until the loop calls
 *     avmm_vcpu_complete(), the loop's thread owns the slot (and may read/write the
 *     access's data, and issue vCPU ioctls such as KVM_GET_REGS).
 *   - avmm_vm_pause() returns once no vCPU runs guest code: each is PAUSED, WAITING on the
 *     loop, or DONE. A WAITING vCPU that is completed while a pause is requested parks
 *     before re-entering the guest.
 *
 * Nothing here takes Python's GIL: cffi drops it around every call into this file.
 */
#ifndef AVMM_H
#define AVMM_H

#include <stdint.h>
#include <stddef.h>

/* What a vCPU hands to the loop. */
enum avmm_exit_kind {
    AVMM_EXIT_NONE = 0,
    AVMM_EXIT_IO = 1,    /* port I/O a device model on the loop must serve */
    AVMM_EXIT_MMIO = 2,  /* MMIO a device model on the loop must serve */
    AVMM_EXIT_STOP = 3,  /* the vCPU cannot go on alone: kvm_reason (and info) say why */
    AVMM_EXIT_ERROR = 4, /* KVM_RUN itself failed: err holds errno */
};

/* What the loop answers a waiting vCPU. */
enum avmm_action {
    AVMM_ACTION_NONE = 0,
    AVMM_ACTION_RESUME = 1, /* re-enter the guest */
    AVMM_ACTION_QUIT = 2,   /* leave the thread */
};

enum avmm_vcpu_state {
    AVMM_VCPU_IDLE = 0,    /* created, thread not started */
    AVMM_VCPU_RUNNING = 1, /* in KVM_RUN or about to be */
    AVMM_VCPU_WAITING = 2, /* an exit is posted to the loop */
    AVMM_VCPU_PAUSED = 3,
    AVMM_VCPU_DONE = 4,    /* the thread has ended */
};

/* The UART fast path: which of a UART's registers C may serve without the loop, for up
 * to AVMM_UART_FAST_SLOTS UARTs (one slot each). */
#define AVMM_UART_FAST_SLOTS 4
enum avmm_uart_fast {
    AVMM_UART_FAST_THR = 1, /* THR writes are appended to the console buffer */
    AVMM_UART_FAST_LSR = 2, /* LSR reads return lsr_shadow */
};

struct avmm_exit {
    uint32_t kind;       /* enum avmm_exit_kind */
    uint32_t kvm_reason; /* kvm_run.exit_reason */
    uint64_t addr;       /* port number or guest physical address */
    uint32_t size;       /* bytes per access */
    uint32_t count;      /* accesses (string I/O) */
    uint32_t is_write;
    int32_t err;         /* errno of a failed KVM_RUN */
    uint8_t *data;       /* the access's size*count bytes, inside kvm_run */
    uint64_t value;      /* count == 1: the value written, or the value to read (the loop sets it) */
    uint64_t info[18];   /* KVM_EXIT_INTERNAL_ERROR: suberror | ndata << 32, then data[]; other stops: raw words */
};

/* Per-vCPU counters: written only by the vCPU thread, read racily for stats. */
#define AVMM_NR_REASONS 64
struct avmm_vcpu_stats {
    uint64_t exits[AVMM_NR_REASONS]; /* by kvm_run.exit_reason */
    uint64_t fast_io;                /* exits served in C */
    uint64_t posted;                 /* exits handed to the loop */
    uint64_t kicks;                  /* KVM_RUN interrupted by a kick */
    uint64_t ns_in_run;              /* inside KVM_RUN (guest time plus in-kernel exits) */
    uint64_t ns_waiting;             /* waiting for the loop to complete an exit */
    uint64_t ns_exits[AVMM_NR_REASONS]; /* out of KVM_RUN serving exits, by exit_reason */
    uint64_t ns_fast_io;             /* of which serving exits in C */
    uint64_t samples;                /* RIP samples taken (avmm_vm_set_sampling) */
    uint64_t samples_dropped;        /* RIP samples not kept: the buffer was full */
    uint64_t first_high_rip_ns;      /* CLOCK_MONOTONIC of the first sample in the upper half
                                      * of the address space (a kernel proper), or 0 */
    uint64_t seccomp_failed;         /* 1: the thread's seccomp filter could not be installed */
};

struct avmm_vm;

/* Per-exit latency, for the benchmarks: a log-linear histogram (8 buckets per power of
 * two, so a bucket is at most 12.5% wide) of the time each posted exit spent out of
 * KVM_RUN, from KVM_RUN's return to the next entry. Written by the vCPU thread only. */
#define AVMM_HIST_BUCKETS 256
/* Copy vCPU idx's histogram (up to max buckets) into out; returns how many. */
int avmm_vcpu_exit_hist(struct avmm_vm *vm, int idx, uint64_t *out, int max);
/* The same kind of histogram of each guest round trip that went through the loop: from the
 * KVM_RUN return of a posted exit to the next KVM_RUN return (the hand-off, then the guest
 * up to its next exit). A raw KVM_RUN loop's period between exits (perf/rawkvm.c) is the
 * figure to set it beside. */
int avmm_vcpu_cycle_hist(struct avmm_vm *vm, int idx, uint64_t *out, int max);
/* The smallest latency, in ns, that falls in bucket i. */
uint64_t avmm_hist_bucket_ns(int i);
/* The exit hand-off's spinning: out[0..3] = the vCPUs' spins and hits waiting for the
 * loop, the loop's polls for posted exits and their hits. */
void avmm_vm_spin_stats(struct avmm_vm *vm, uint64_t *out);

struct avmm_vm *avmm_vm_new(int nvcpus, int notify_efd, int console_efd);
void avmm_vm_free(struct avmm_vm *vm);

/* Attach vCPU idx: map its kvm_run (mmap_size from KVM_GET_VCPU_MMAP_SIZE). 0 or -errno. */
int avmm_vcpu_attach(struct avmm_vm *vm, int idx, int vcpu_fd, size_t mmap_size);
/* Start its thread; host_cpu >= 0 pins it. 0 or -errno. */
int avmm_vcpu_start(struct avmm_vm *vm, int idx, int host_cpu);
struct avmm_exit *avmm_vcpu_exit(struct avmm_vm *vm, int idx);
struct avmm_vcpu_stats *avmm_vcpu_stats(struct avmm_vm *vm, int idx);
int avmm_vcpu_state(struct avmm_vm *vm, int idx);
void avmm_vcpu_complete(struct avmm_vm *vm, int idx, int action);

/* Loop side: reset the notify eventfd and list vCPUs with a posted exit. Returns count.
 * With poll_ns > 0 and nothing posted yet, spin up to poll_ns for one (busy polling: an
 * exit-heavy guest posts again within microseconds, and a sleeping loop thread costs a
 * wake-up each time). */
int avmm_vm_collect(struct avmm_vm *vm, int *out, int max, uint64_t poll_ns);

/* Stop every vCPU from entering the guest; returns when none runs guest code. */
void avmm_vm_pause(struct avmm_vm *vm);
void avmm_vm_resume(struct avmm_vm *vm);
/* A debugger's hold on one vCPU: on, it leaves the guest (kicked) and parks as a paused
 * one does, whatever pause/resume say; off, it runs again unless the VM is paused. */
void avmm_vcpu_hold(struct avmm_vm *vm, int idx, int on);
/* Loop side, after holding vCPUs: wait (up to timeout_ns) until every held vCPU is parked
 * or has ended. Returns 0 when they are, the count of vCPUs with a posted exit (listed in
 * out, as avmm_vm_collect does: the loop serves them, then calls again), or -ETIMEDOUT. */
int avmm_vm_settle(struct avmm_vm *vm, int *out, int max, uint64_t timeout_ns);
/* End every vCPU thread and join them. Waiting vCPUs are told to quit. */
void avmm_vm_stop(struct avmm_vm *vm);

/* RIP sampling, for a boot profile: before the vCPUs start, give each a timer that
 * interrupts KVM_RUN every period_ns; the vCPU thread then reads RIP (KVM_GET_REGS) into
 * a buffer of `capacity` samples. 0 or -errno. */
int avmm_vm_set_sampling(struct avmm_vm *vm, uint64_t period_ns, size_t capacity);
/* Copy up to max of vCPU idx's samples, from the first, into out; returns how many. */
size_t avmm_vcpu_samples(struct avmm_vm *vm, int idx, uint64_t *out, size_t max);

/* Before the vCPUs start: each vCPU thread installs its seccomp filter (seccomp.h; an
 * enum avmm_seccomp_action, 0 = none) once its set-up is done. */
void avmm_vm_set_seccomp(struct avmm_vm *vm, int action);

/* UART fast path (see enum avmm_uart_fast) of one slot, at the ports of THR and LSR the
 * UART model names. thr_port 0 turns it off. 0 or -EINVAL (no such slot). */
int avmm_uart_fast_set(struct avmm_vm *vm, int slot, int thr_port, int lsr_port, int flags, int lsr_shadow);
/* The ACPI PM timer (3.579545 MHz from CLOCK_MONOTONIC, 32 bits) answered by the vCPU
 * threads at ports [port, port+4): reads of 1, 2 or 4 bytes. port 0 turns it off (the
 * loop's model answers then). */
#define AVMM_PM_TIMER_HZ 3579545
void avmm_pm_timer_set(struct avmm_vm *vm, int port);
/* The console eventfd says some slot has bytes: reset it, then drain every slot. */
void avmm_console_ack(struct avmm_vm *vm);
/* 1 when a vCPU has signalled the console eventfd since the last avmm_console_ack (a slot
 * may hold bytes), else 0: a check without a syscall, for the loop before each batch of
 * exits. Bytes in a slot always come with the flag set since the ack before their drain. */
int avmm_console_pending(struct avmm_vm *vm);
/* Move bytes written through a slot's fast path into out; returns how many. */
size_t avmm_console_drain(struct avmm_vm *vm, int slot, uint8_t *out, size_t cap);

/* Thin wrappers: return the result, or -errno. */
long avmm_ioctl(int fd, unsigned long request, void *arg);
long avmm_ioctl_val(int fd, unsigned long request, unsigned long arg);

/* KVM_IRQ_LINE on a VM fd: a level interrupt line up (1) or down (0); 0 or -errno. What
 * a PCI transport puts in a level line's struct avmm_irq (virtq.h) as its set_line. */
int avmm_kvm_irq_line(int32_t vm_fd, uint32_t gsi, uint32_t level);

/* One KVM_RUN on a vCPU with no thread of ours (the KVM probe). Returns exit_reason or -errno. */
int avmm_run_once(int vcpu_fd, void *run);
void *avmm_map_run(int vcpu_fd, size_t mmap_size);
void avmm_unmap(void *addr, size_t size);

#endif
