/*
 * Native vCPU threads: KVM_RUN without the GIL, exits handed to the asyncio loop.
 *
 * A vCPU thread loops on KVM_RUN. Exits it can serve alone (a UART's THR writes and LSR
 * reads, at the ports the UART model armed) never leave C. Any other exit is posted: the
 * thread fills its exit slot, writes the VM's notify eventfd (a reader on the loop) and
 * waits on a futex until the loop completes it. Pause, resume and stop kick the threads
 * out of KVM_RUN with a signal and kvm_run.immediate_exit.
 *
 * RIP sampling (a boot profile): each vCPU thread may own a POSIX timer that sends it the
 * same signal every period; KVM_RUN returns EINTR and the thread reads RIP into its sample
 * buffer before it goes back in. Time out of KVM_RUN is counted per exit reason.
 *
 * Memory ordering: all shared words are C11 atomics with sequential consistency; the
 * Dekker-style pairs (state/pause_req, action/sleeping) rely on that.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "avmm.h"
#include "seccomp.h"

/* Bytes the UART fast path may hold before the vCPU must wait for the loop to drain. */
#define CONSOLE_CAP 65536
/* How long a waiting vCPU spins before it sleeps: the loop usually answers within
 * microseconds, and a futex wake-up costs more than that (much more in a nested guest).
 * Whether it spins at all is decided per wait (struct spin_policy). */
#define WAIT_SPIN_NS 30000

/* Spinning pays only while the thread waited for runs on another CPU: then the answer
 * comes within the window and a wake-up is saved. On a busy host, or when both threads
 * share a CPU, the spinner takes the CPU the other thread needs to answer, and every
 * wait costs the whole window and the wake-up after it (measured on a loaded 2-CPU host:
 * a posted exit's p50 60 µs with spinning on both sides, 11 µs with none). So each
 * waiter judges its spins by their outcome: SPIN_MISSES_OFF misses in a row turn
 * spinning off for `backoff` waits; then one wait spins again as a probe: a hit turns
 * spinning back on, a miss doubles the back-off (up to SPIN_BACKOFF_MAX). A spin
 * is also skipped when the other thread last ran on this thread's CPU (it could not run
 * while this one spins). No machine-specific threshold: only hits and misses. */
#define SPIN_MISSES_OFF 2
#define SPIN_BACKOFF_MIN 16
#define SPIN_BACKOFF_MAX 4096

struct spin_policy {
    uint32_t misses;  /* in a row */
    uint32_t skip;    /* waits left without spinning */
    uint32_t backoff; /* the last back-off; 0: spinning is on */
    uint64_t hits, spins;
};

struct avmm_vcpu {
    struct avmm_vm *vm;
    int idx;
    int fd;
    struct kvm_run *run;
    size_t run_size;
    pthread_t thread;
    int started;
    int host_cpu;
    _Atomic uint32_t state;    /* enum avmm_vcpu_state; futex word for pausers */
    _Atomic uint32_t posted;   /* an exit waits to be collected */
    _Atomic uint32_t action;   /* enum avmm_action; futex word for the vCPU */
    _Atomic uint32_t sleeping; /* the vCPU sleeps on `action` */
    _Atomic int32_t cpu;       /* the host CPU it posted its last exit from */
    struct spin_policy spin;   /* its spinning on `action` (vCPU thread only) */
    _Atomic uint32_t held;     /* parked for a debugger, whatever pause_req says */
    struct avmm_exit exit;
    struct avmm_vcpu_stats stats;
    uint64_t exit_hist[AVMM_HIST_BUCKETS]; /* posted exits' time out of KVM_RUN */
    uint64_t cycle_hist[AVMM_HIST_BUCKETS]; /* a posted exit's KVM_RUN return to the next one */
    uint64_t *samples;       /* RIP samples (sampling on), written by the vCPU thread only */
    size_t nsamples;
    timer_t timer;
    int has_timer;
};

/* One UART the fast path serves: the ports of its THR and LSR, as the UART model gave
 * them, and the bytes taken from THR until the loop drains them. */
struct avmm_uart_fast_slot {
    _Atomic uint32_t thr_port; /* 0: not armed */
    _Atomic uint32_t lsr_port;
    _Atomic uint32_t flags;
    _Atomic uint32_t lsr_shadow;
    pthread_mutex_t lock;
    size_t len;
    uint8_t buf[CONSOLE_CAP];
};

struct avmm_vm {
    int nvcpus;
    int notify_efd;
    int console_efd;
    _Atomic uint32_t console_pending; /* console_efd was signalled since the last ack */
    struct avmm_vcpu *vcpus;
    _Atomic uint32_t pause_req;
    _Atomic uint32_t park_gen;  /* futex word for parked vCPUs: bumped when pause_req, a
                                 * vCPU's `held` or quit changes */
    _Atomic uint32_t quit;
    /* The exit hand-off from the loop's side: where it ran last, whether it is polling
     * for posted exits now (a vCPU then need not write notify_efd), whether notify_efd
     * may have been written since the loop last reset it; its own spin policy. */
    _Atomic int32_t loop_cpu;
    _Atomic uint32_t loop_polling;
    _Atomic uint32_t notified;
    struct spin_policy loop_spin;
    int seccomp_action;         /* enum avmm_seccomp_action: each vCPU thread's filter */
    uint64_t sample_period_ns;  /* 0: no RIP sampling */
    size_t sample_capacity;
    struct avmm_uart_fast_slot uart[AVMM_UART_FAST_SLOTS];
    _Atomic uint32_t pm_timer_port; /* 0: the PM timer is the loop's (avmm_pm_timer_set) */
};

static int kick_signal;
/* Set by the kick signal's handler in the thread it interrupted: a sampling timer's tick
 * that came while the vCPU was out of KVM_RUN (waiting on the loop) is taken then. */
static __thread volatile sig_atomic_t tick_pending;

static long futex(_Atomic uint32_t *word, int op, uint32_t val)
{
    return syscall(SYS_futex, (uint32_t *)word, op, val, NULL, NULL, 0);
}

static void futex_wait(_Atomic uint32_t *word, uint32_t val)
{
    futex(word, FUTEX_WAIT_PRIVATE, val);
}

static void futex_wake_all(_Atomic uint32_t *word)
{
    futex(word, FUTEX_WAKE_PRIVATE, INT_MAX);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void kick_handler(int sig)
{
    (void)sig; /* here to make KVM_RUN return EINTR */
    tick_pending = 1;
}

static void notify(int efd)
{
    uint64_t one = 1;
    ssize_t r;
    do {
        r = write(efd, &one, sizeof(one));
    } while (r < 0 && errno == EINTR);
}

static void set_state(struct avmm_vcpu *v, uint32_t state)
{
    atomic_store(&v->state, state);
    if (atomic_load(&v->vm->pause_req) || atomic_load(&v->held) || atomic_load(&v->vm->quit))
        futex_wake_all(&v->state);
}

/* ---- adaptive spinning (struct spin_policy) ---------------------------------------- */

static int spin_allowed(struct spin_policy *p)
{
    if (p->skip) {
        p->skip--;
        return 0;
    }
    return 1;
}

static void spin_outcome(struct spin_policy *p, int hit)
{
    p->spins++;
    if (hit) {
        p->hits++;
        p->misses = 0;
        p->backoff = 0;
        return;
    }
    if (!p->backoff && ++p->misses < SPIN_MISSES_OFF)
        return;
    /* Enough misses in a row, or a probe missed: stop spinning for a while, longer each time. */
    p->backoff = p->backoff ? (p->backoff * 2 < SPIN_BACKOFF_MAX ? p->backoff * 2 : SPIN_BACKOFF_MAX) : SPIN_BACKOFF_MIN;
    p->skip = p->backoff;
    p->misses = 0;
}

/* ---- what KVM reported: sizes checked before they are used ----------------------------- */

/* An I/O exit's bytes are size*count at data_offset in the run mapping, and size is what
 * the exit slot's value holds: KVM keeps to that, but the VMM does not rely on it to stay
 * inside the mapping (tests/fuzz/c/fuzz_exit.c). An exit that does not fit stops the vCPU. */
static int io_fits(const struct avmm_vcpu *v)
{
    const struct kvm_run *run = v->run;
    uint64_t size = run->io.size, count = run->io.count;
    if ((size != 1 && size != 2 && size != 4) || count == 0)
        return 0;
    return run->io.data_offset <= v->run_size && size * count <= v->run_size - run->io.data_offset;
}

static int mmio_fits(const struct kvm_run *run)
{
    return run->mmio.len >= 1 && run->mmio.len <= sizeof(run->mmio.data);
}

/* ---- UART fast path ---------------------------------------------------------------- */

/* The ACPI PM timer's count now: CLOCK_MONOTONIC in ticks of AVMM_PM_TIMER_HZ, 32 bits
 * (devices/legacy/acpi_pm.py's pm_timer_value computes the same). */
static uint32_t pm_timer_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    uint64_t ticks = (uint64_t)ts.tv_sec * AVMM_PM_TIMER_HZ
                     + (uint64_t)ts.tv_nsec * AVMM_PM_TIMER_HZ / 1000000000u;
    return (uint32_t)ticks;
}

/* A read of the PM timer's 4 ports (a dword at its base, or a part of it). */
static int serve_pm_timer(struct avmm_vcpu *v)
{
    struct kvm_run *run = v->run;
    uint32_t base = atomic_load_explicit(&v->vm->pm_timer_port, memory_order_relaxed);
    uint32_t port = run->io.port;
    if (!base || port < base || port + run->io.size > base + 4 || run->io.direction != KVM_EXIT_IO_IN
        || run->io.count != 1 || !io_fits(v))
        return 0;
    uint32_t value = pm_timer_now() >> (8 * (port - base));
    memcpy((uint8_t *)run + run->io.data_offset, &value, run->io.size); /* x86: little-endian */
    return 1;
}

void avmm_pm_timer_set(struct avmm_vm *vm, int port)
{
    atomic_store(&vm->pm_timer_port, port > 0 && port <= 0xFFFC ? (uint32_t)port : 0);
}

static int serve_fast_io(struct avmm_vcpu *v)
{
    struct avmm_vm *vm = v->vm;
    struct kvm_run *run = v->run;
    if (serve_pm_timer(v))
        return 1;
    if (run->io.size != 1 || !io_fits(v))
        return 0;
    uint8_t *data = (uint8_t *)run + run->io.data_offset;
    uint32_t count = run->io.count;
    uint32_t port = run->io.port;

    for (int i = 0; i < AVMM_UART_FAST_SLOTS; i++) {
        struct avmm_uart_fast_slot *u = &vm->uart[i];
        uint32_t thr_port = atomic_load_explicit(&u->thr_port, memory_order_acquire);
        if (!thr_port)
            continue;
        uint32_t flags = atomic_load_explicit(&u->flags, memory_order_acquire);
        if (port == thr_port && run->io.direction == KVM_EXIT_IO_OUT && (flags & AVMM_UART_FAST_THR)) {
            int was_empty;
            pthread_mutex_lock(&u->lock);
            if (u->len + count > CONSOLE_CAP) {
                pthread_mutex_unlock(&u->lock);
                return 0; /* full: the loop drains, then serves this write itself */
            }
            was_empty = u->len == 0;
            memcpy(u->buf + u->len, data, count);
            u->len += count;
            pthread_mutex_unlock(&u->lock);
            if (was_empty) {
                atomic_store(&vm->console_pending, 1);
                notify(vm->console_efd);
            }
            return 1;
        }
        if (port == atomic_load(&u->lsr_port) && run->io.direction == KVM_EXIT_IO_IN && (flags & AVMM_UART_FAST_LSR)) {
            memset(data, (int)atomic_load(&u->lsr_shadow), count);
            return 1;
        }
    }
    return 0;
}

int avmm_uart_fast_set(struct avmm_vm *vm, int slot, int thr_port, int lsr_port, int flags, int lsr_shadow)
{
    if (slot < 0 || slot >= AVMM_UART_FAST_SLOTS)
        return -EINVAL;
    struct avmm_uart_fast_slot *u = &vm->uart[slot];
    /* A vCPU that read the old flags may still use the shadow: when LSR leaves the fast
     * path, the last valid value stays. */
    if (flags & AVMM_UART_FAST_LSR)
        atomic_store(&u->lsr_shadow, (uint32_t)lsr_shadow);
    atomic_store(&u->flags, (uint32_t)flags);
    atomic_store(&u->lsr_port, (uint32_t)lsr_port);
    atomic_store(&u->thr_port, (uint32_t)thr_port);
    return 0;
}

void avmm_console_ack(struct avmm_vm *vm)
{
    uint64_t counter;
    /* Reset before the drains: a vCPU that appends to a slot drained empty afterwards
     * finds it empty and signals again (the flag first, then the eventfd). */
    atomic_store(&vm->console_pending, 0);
    if (read(vm->console_efd, &counter, sizeof(counter)) < 0) {
        /* EAGAIN: nothing signalled */
    }
}

int avmm_console_pending(struct avmm_vm *vm)
{
    return (int)atomic_load(&vm->console_pending);
}

size_t avmm_console_drain(struct avmm_vm *vm, int slot, uint8_t *out, size_t cap)
{
    size_t n;
    if (slot < 0 || slot >= AVMM_UART_FAST_SLOTS)
        return 0;
    struct avmm_uart_fast_slot *u = &vm->uart[slot];
    pthread_mutex_lock(&u->lock);
    n = u->len < cap ? u->len : cap;
    memcpy(out, u->buf, n);
    memmove(u->buf, u->buf + n, u->len - n);
    u->len -= n;
    pthread_mutex_unlock(&u->lock);
    return n;
}

/* ---- the vCPU thread --------------------------------------------------------------- */

static void fill_exit(struct avmm_vcpu *v, int err)
{
    struct kvm_run *run = v->run;
    struct avmm_exit *e = &v->exit;
    memset(e->info, 0, sizeof(e->info));
    e->err = err;
    e->kvm_reason = run->exit_reason;
    e->data = NULL;
    e->addr = e->size = e->count = e->is_write = 0;
    if (err) {
        e->kind = AVMM_EXIT_ERROR;
        return;
    }
    switch (run->exit_reason) {
    case KVM_EXIT_IO:
        if (!io_fits(v)) { /* the loop says so: AVMM_EXIT_STOP with the sizes KVM gave */
            e->kind = AVMM_EXIT_STOP;
            e->info[0] = run->io.size;
            e->info[1] = run->io.count;
            e->info[2] = run->io.data_offset;
            break;
        }
        e->kind = AVMM_EXIT_IO;
        e->addr = run->io.port;
        e->size = run->io.size;
        e->count = run->io.count;
        e->is_write = run->io.direction == KVM_EXIT_IO_OUT;
        e->data = (uint8_t *)run + run->io.data_offset;
        e->value = 0;
        if (e->is_write && e->count == 1)
            memcpy(&e->value, e->data, e->size);
        break;
    case KVM_EXIT_MMIO:
        if (!mmio_fits(run)) {
            e->kind = AVMM_EXIT_STOP;
            e->info[0] = run->mmio.len;
            break;
        }
        e->kind = AVMM_EXIT_MMIO;
        e->addr = run->mmio.phys_addr;
        e->size = run->mmio.len;
        e->count = 1;
        e->is_write = run->mmio.is_write;
        e->data = run->mmio.data;
        e->value = 0;
        if (e->is_write)
            memcpy(&e->value, e->data, e->size);
        break;
    case KVM_EXIT_INTERNAL_ERROR:
        e->kind = AVMM_EXIT_STOP;
        e->info[0] = run->internal.suberror | ((uint64_t)run->internal.ndata << 32);
        memcpy(&e->info[1], run->internal.data,
               sizeof(run->internal.data) < sizeof(e->info) - 8 ? sizeof(run->internal.data) : sizeof(e->info) - 8);
        break;
    case KVM_EXIT_FAIL_ENTRY:
        e->kind = AVMM_EXIT_STOP;
        e->info[0] = run->fail_entry.hardware_entry_failure_reason;
        e->info[1] = run->fail_entry.cpu;
        break;
    case KVM_EXIT_SYSTEM_EVENT:
        e->kind = AVMM_EXIT_STOP;
        e->info[0] = run->system_event.type;
        break;
    case KVM_EXIT_DEBUG: /* a guest debug event (KVM_SET_GUEST_DEBUG): #DB or #BP */
        e->kind = AVMM_EXIT_STOP;
        e->info[0] = run->debug.arch.exception;
        e->info[1] = run->debug.arch.pc;
        e->info[2] = run->debug.arch.dr6;
        e->info[3] = run->debug.arch.dr7;
        break;
    default:
        e->kind = AVMM_EXIT_STOP;
        break;
    }
}

static uint32_t wait_action(struct avmm_vcpu *v, int spin)
{
    uint32_t a;
    if (spin) {
        uint64_t spin_until = now_ns() + WAIT_SPIN_NS;
        do {
            for (int i = 0; i < 32; i++) {
                a = atomic_load(&v->action);
                if (a) {
                    spin_outcome(&v->spin, 1);
                    goto got;
                }
                __builtin_ia32_pause();
            }
        } while (now_ns() < spin_until);
        spin_outcome(&v->spin, 0);
    }
    for (;;) {
        atomic_store(&v->sleeping, 1);
        a = atomic_load(&v->action);
        if (a)
            break;
        futex_wait(&v->action, 0);
        a = atomic_load(&v->action);
        if (a)
            break;
    }
    atomic_store(&v->sleeping, 0);
got:
    atomic_store(&v->action, AVMM_ACTION_NONE);
    return a;
}

/* Post the exit; wake the loop unless it is polling for posted exits right now. */
static void post_exit(struct avmm_vcpu *v)
{
    struct avmm_vm *vm = v->vm;
    atomic_store(&v->posted, 1);
    /* Pairs with the loop's store of loop_polling = 0 and its re-check of `posted`
     * (avmm_vm_collect): one of the two sides sees the other's store. */
    if (atomic_load(&vm->loop_polling))
        return;
    atomic_store(&vm->notified, 1);
    notify(vm->notify_efd);
}

static uint32_t post_and_wait(struct avmm_vcpu *v, int err)
{
    uint64_t t0 = now_ns();
    uint32_t a;
    int cpu = sched_getcpu();
    fill_exit(v, err);
    set_state(v, AVMM_VCPU_WAITING);
    atomic_store(&v->cpu, cpu);
    v->stats.posted++;
    int spin = spin_allowed(&v->spin) && atomic_load(&v->vm->loop_cpu) != cpu;
    post_exit(v);
    a = wait_action(v, spin);
    struct avmm_exit *e = &v->exit;
    if ((e->kind == AVMM_EXIT_IO || e->kind == AVMM_EXIT_MMIO) && !e->is_write && e->count == 1 && e->size <= 8)
        memcpy(e->data, &e->value, e->size); /* a read the loop answered in `value` */
    atomic_store(&v->state, AVMM_VCPU_RUNNING);
    v->stats.ns_waiting += now_ns() - t0;
    return a;
}

/* Whether the vCPU must stay out of the guest: the VM is paused, or a debugger holds it. */
static int parked(struct avmm_vcpu *v)
{
    return atomic_load(&v->vm->pause_req) || atomic_load(&v->held);
}

static void park_while_paused(struct avmm_vcpu *v)
{
    struct avmm_vm *vm = v->vm;
    /* An I/O exit the loop just completed only takes effect (RIP moves on, an IN's value
     * lands in RAX) on the next KVM_RUN: do that one with immediate_exit, which completes
     * it and returns EINTR without running guest code, so a paused vCPU's registers are
     * whole. */
    v->run->immediate_exit = 1;
    ioctl(v->fd, KVM_RUN, 0);
    v->run->immediate_exit = 0;
    set_state(v, AVMM_VCPU_PAUSED);
    for (;;) {
        uint32_t gen = atomic_load(&vm->park_gen);
        if (!parked(v) || atomic_load(&vm->quit))
            break;
        futex_wait(&vm->park_gen, gen);
    }
    atomic_store(&v->state, AVMM_VCPU_RUNNING);
}

/* ---- per-exit latency histogram --------------------------------------------------- */

#define HIST_SUB_BITS 3 /* 8 buckets per power of two */

static int hist_bucket(uint64_t ns)
{
    if (ns < (1u << HIST_SUB_BITS))
        return (int)ns;
    int msb = 63 - __builtin_clzll(ns);
    int i = ((msb - HIST_SUB_BITS + 1) << HIST_SUB_BITS) + (int)((ns >> (msb - HIST_SUB_BITS)) & ((1u << HIST_SUB_BITS) - 1));
    return i < AVMM_HIST_BUCKETS ? i : AVMM_HIST_BUCKETS - 1;
}

uint64_t avmm_hist_bucket_ns(int i)
{
    if (i < (1 << HIST_SUB_BITS))
        return (uint64_t)(i < 0 ? 0 : i);
    return (uint64_t)((1u << HIST_SUB_BITS) + (i & ((1u << HIST_SUB_BITS) - 1))) << ((i >> HIST_SUB_BITS) - 1);
}

int avmm_vcpu_exit_hist(struct avmm_vm *vm, int idx, uint64_t *out, int max)
{
    int n = max < AVMM_HIST_BUCKETS ? max : AVMM_HIST_BUCKETS;
    if (idx < 0 || idx >= vm->nvcpus || n < 0)
        return -EINVAL;
    memcpy(out, vm->vcpus[idx].exit_hist, (size_t)n * sizeof(*out));
    return n;
}

int avmm_vcpu_cycle_hist(struct avmm_vm *vm, int idx, uint64_t *out, int max)
{
    int n = max < AVMM_HIST_BUCKETS ? max : AVMM_HIST_BUCKETS;
    if (idx < 0 || idx >= vm->nvcpus || n < 0)
        return -EINVAL;
    memcpy(out, vm->vcpus[idx].cycle_hist, (size_t)n * sizeof(*out));
    return n;
}

static void unpark(struct avmm_vm *vm)
{
    atomic_fetch_add(&vm->park_gen, 1);
    futex_wake_all(&vm->park_gen);
}

/* ---- RIP sampling ------------------------------------------------------------------ */

/* x86-64: the upper half of the address space, where a kernel proper runs. */
#define HIGH_HALF 0xFFFF800000000000ull

#ifndef sigev_notify_thread_id
#define sigev_notify_thread_id _sigev_un._tid
#endif

static void start_sampling(struct avmm_vcpu *v)
{
    uint64_t period = v->vm->sample_period_ns;
    struct sigevent sev;
    struct itimerspec its;
    if (!period || !v->samples)
        return;
    memset(&sev, 0, sizeof(sev));
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = kick_signal;
    sev.sigev_notify_thread_id = (pid_t)syscall(SYS_gettid);
    if (timer_create(CLOCK_MONOTONIC, &sev, &v->timer) < 0)
        return; /* no samples: the profile says so */
    v->has_timer = 1;
    its.it_interval.tv_sec = (time_t)(period / 1000000000u);
    its.it_interval.tv_nsec = (long)(period % 1000000000u);
    its.it_value = its.it_interval;
    timer_settime(v->timer, 0, &its, NULL);
}

static void stop_sampling(struct avmm_vcpu *v)
{
    if (v->has_timer) {
        timer_delete(v->timer);
        v->has_timer = 0;
    }
}

static void take_sample(struct avmm_vcpu *v)
{
    struct kvm_regs regs;
    if (ioctl(v->fd, KVM_GET_REGS, &regs) < 0)
        return;
    v->stats.samples++;
    if (!v->stats.first_high_rip_ns && regs.rip >= HIGH_HALF)
        v->stats.first_high_rip_ns = now_ns();
    if (v->nsamples < v->vm->sample_capacity)
        v->samples[v->nsamples++] = regs.rip;
    else
        v->stats.samples_dropped++;
}

static void *vcpu_main(void *arg)
{
    struct avmm_vcpu *v = arg;
    struct avmm_vm *vm = v->vm;
    sigset_t only_kick;

    /* Every signal but the kick goes to the loop's thread. */
    sigfillset(&only_kick);
    sigdelset(&only_kick, kick_signal);
    pthread_sigmask(SIG_SETMASK, &only_kick, NULL);

    /* The creator names the thread through /proc, which a jailed VMM has not: the thread
     * names itself too (prctl). */
    char name[16];
    snprintf(name, sizeof(name), "vcpu%d", (int)(v - vm->vcpus));
    pthread_setname_np(pthread_self(), name);

    if (v->host_cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(v->host_cpu, &set);
        pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
    }
    start_sampling(v);
    uint64_t posted_at = 0; /* the KVM_RUN return of the last exit, when it was posted */
    /* Set-up is done (signals, affinity, the sampling timer): from here on the thread makes
     * only the calls the vCPU allow-list names (seccomp.c). */
    if (vm->seccomp_action && avmm_seccomp_install(AVMM_SECCOMP_VCPU, vm->seccomp_action, 0) < 0)
        v->stats.seccomp_failed = 1;

    for (;;) {
        if (atomic_load(&vm->quit))
            break;
        if (tick_pending && v->has_timer) {
            tick_pending = 0;
            take_sample(v);
        }
        if (parked(v)) {
            posted_at = 0; /* a pause is no round trip */
            park_while_paused(v);
            continue;
        }
        uint64_t t0 = now_ns();
        int r = ioctl(v->fd, KVM_RUN, 0);
        int err = r < 0 ? errno : 0;
        uint64_t t1 = now_ns();
        v->stats.ns_in_run += t1 - t0;
        if (v->run->immediate_exit)
            v->run->immediate_exit = 0;
        if (posted_at && !err)
            v->cycle_hist[hist_bucket(t1 - posted_at)]++;
        posted_at = 0;
        if (err == EINTR || err == EAGAIN) {
            v->stats.kicks++; /* the sample, if it was the timer, is taken at the loop's top */
            v->stats.ns_exits[KVM_EXIT_INTR] += now_ns() - t1;
            continue;
        }
        uint32_t slot = AVMM_NR_REASONS - 1;
        if (!err) {
            uint32_t reason = v->run->exit_reason;
            slot = reason < AVMM_NR_REASONS ? reason : AVMM_NR_REASONS - 1;
            v->stats.exits[slot]++;
            if (reason == KVM_EXIT_INTR)
                continue;
            if (reason == KVM_EXIT_IO && serve_fast_io(v)) {
                uint64_t served = now_ns() - t1;
                v->stats.fast_io++;
                v->stats.ns_fast_io += served;
                v->stats.ns_exits[slot] += served;
                continue;
            }
        }
        uint32_t action = post_and_wait(v, err);
        uint64_t out_ns = now_ns() - t1;
        v->stats.ns_exits[slot] += out_ns;
        v->exit_hist[hist_bucket(out_ns)]++;
        posted_at = t1;
        if (action == AVMM_ACTION_QUIT)
            break;
    }
    stop_sampling(v);
    set_state(v, AVMM_VCPU_DONE);
    futex_wake_all(&v->state);
    return NULL;
}

/* ---- the VM, from the loop's thread ----------------------------------------------- */

static void install_kick(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = kick_handler; /* no SA_RESTART: KVM_RUN must return EINTR */
    sigemptyset(&sa.sa_mask);
    kick_signal = SIGRTMIN + 3;
    sigaction(kick_signal, &sa, NULL);
}

struct avmm_vm *avmm_vm_new(int nvcpus, int notify_efd, int console_efd)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, install_kick);

    if (nvcpus <= 0)
        return NULL;
    struct avmm_vm *vm = calloc(1, sizeof(*vm));
    if (!vm)
        return NULL;
    vm->vcpus = calloc((size_t)nvcpus, sizeof(*vm->vcpus));
    if (!vm->vcpus) {
        free(vm);
        return NULL;
    }
    vm->nvcpus = nvcpus;
    vm->notify_efd = notify_efd;
    vm->console_efd = console_efd;
    for (int i = 0; i < AVMM_UART_FAST_SLOTS; i++)
        pthread_mutex_init(&vm->uart[i].lock, NULL);
    for (int i = 0; i < nvcpus; i++) {
        vm->vcpus[i].vm = vm;
        vm->vcpus[i].idx = i;
        vm->vcpus[i].fd = -1;
        vm->vcpus[i].host_cpu = -1;
    }
    return vm;
}

int avmm_vcpu_attach(struct avmm_vm *vm, int idx, int vcpu_fd, size_t mmap_size)
{
    if (idx < 0 || idx >= vm->nvcpus)
        return -EINVAL;
    struct avmm_vcpu *v = &vm->vcpus[idx];
    void *run = mmap(NULL, mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu_fd, 0);
    if (run == MAP_FAILED)
        return -errno;
    v->fd = vcpu_fd;
    v->run = run;
    v->run_size = mmap_size;
    return 0;
}

int avmm_vcpu_start(struct avmm_vm *vm, int idx, int host_cpu)
{
    if (idx < 0 || idx >= vm->nvcpus || !vm->vcpus[idx].run || vm->vcpus[idx].started)
        return -EINVAL;
    struct avmm_vcpu *v = &vm->vcpus[idx];
    v->host_cpu = host_cpu;
    atomic_store(&v->state, AVMM_VCPU_RUNNING);
    int r = pthread_create(&v->thread, NULL, vcpu_main, v);
    if (r) {
        atomic_store(&v->state, AVMM_VCPU_IDLE);
        return -r;
    }
    char name[16];
    snprintf(name, sizeof(name), "vcpu%d", idx); /* what ps/top show for the thread */
    pthread_setname_np(v->thread, name);
    v->started = 1;
    return 0;
}

int avmm_vm_set_sampling(struct avmm_vm *vm, uint64_t period_ns, size_t capacity)
{
    if (!period_ns || !capacity)
        return -EINVAL;
    for (int i = 0; i < vm->nvcpus; i++) {
        struct avmm_vcpu *v = &vm->vcpus[i];
        if (v->started)
            return -EBUSY;
        free(v->samples);
        v->nsamples = 0;
        v->samples = calloc(capacity, sizeof(*v->samples));
        if (!v->samples)
            return -ENOMEM;
    }
    vm->sample_capacity = capacity;
    vm->sample_period_ns = period_ns;
    return 0;
}

size_t avmm_vcpu_samples(struct avmm_vm *vm, int idx, uint64_t *out, size_t max)
{
    struct avmm_vcpu *v = &vm->vcpus[idx];
    size_t n;
    if (atomic_load(&v->state) != AVMM_VCPU_DONE && v->started)
        return 0; /* the thread still writes them: read them once it has ended */
    n = v->nsamples < max ? v->nsamples : max;
    memcpy(out, v->samples, n * sizeof(*out));
    return n;
}

struct avmm_exit *avmm_vcpu_exit(struct avmm_vm *vm, int idx)
{
    return &vm->vcpus[idx].exit;
}

struct avmm_vcpu_stats *avmm_vcpu_stats(struct avmm_vm *vm, int idx)
{
    return &vm->vcpus[idx].stats;
}

int avmm_vcpu_state(struct avmm_vm *vm, int idx)
{
    return (int)atomic_load(&vm->vcpus[idx].state);
}

void avmm_vcpu_complete(struct avmm_vm *vm, int idx, int action)
{
    struct avmm_vcpu *v = &vm->vcpus[idx];
    atomic_store(&v->action, (uint32_t)action);
    if (atomic_load(&v->sleeping))
        futex(&v->action, FUTEX_WAKE_PRIVATE, 1);
}

static int collect_posted(struct avmm_vm *vm, int *out, int max)
{
    int n = 0;
    for (int i = 0; i < vm->nvcpus && n < max; i++)
        if (atomic_load_explicit(&vm->vcpus[i].posted, memory_order_relaxed) && atomic_exchange(&vm->vcpus[i].posted, 0))
            out[n++] = i;
    return n;
}

/* Is there a vCPU that may post soon from another CPU than the loop's? Polling for one
 * that last ran on the loop's own CPU only keeps it from running. */
static int vcpu_elsewhere(struct avmm_vm *vm, int loop_cpu)
{
    for (int i = 0; i < vm->nvcpus; i++) {
        struct avmm_vcpu *v = &vm->vcpus[i];
        if (v->started && atomic_load(&v->state) == AVMM_VCPU_RUNNING && atomic_load(&v->cpu) != loop_cpu)
            return 1;
    }
    return 0;
}

int avmm_vm_collect(struct avmm_vm *vm, int *out, int max, uint64_t poll_ns)
{
    uint64_t counter;
    int n;
    int cpu = sched_getcpu();
    atomic_store(&vm->loop_cpu, cpu);
    /* Reset the eventfd when a vCPU may have written it, and always on a wake-up (poll_ns
     * 0, the first collect after one): a write that lands after a reset left it readable. */
    uint32_t notified = atomic_exchange(&vm->notified, 0);
    if ((notified || !poll_ns) && read(vm->notify_efd, &counter, sizeof(counter)) < 0) {
        /* EAGAIN: a previous collect already took these */
    }
    n = collect_posted(vm, out, max);
    if (n || !poll_ns || !spin_allowed(&vm->loop_spin) || !vcpu_elsewhere(vm, cpu))
        return n;
    uint64_t deadline = now_ns() + poll_ns;
    atomic_store(&vm->loop_polling, 1);
    do {
        for (int i = 0; i < 64; i++)
            __builtin_ia32_pause();
        n = collect_posted(vm, out, max);
    } while (!n && !atomic_load(&vm->quit) && now_ns() < deadline);
    atomic_store(&vm->loop_polling, 0);
    if (!n)
        n = collect_posted(vm, out, max); /* posted as polling ended, without a notify */
    spin_outcome(&vm->loop_spin, n > 0);
    return n;
}

void avmm_vm_spin_stats(struct avmm_vm *vm, uint64_t *out)
{
    uint64_t hits = 0, spins = 0;
    for (int i = 0; i < vm->nvcpus; i++) {
        hits += vm->vcpus[i].spin.hits;
        spins += vm->vcpus[i].spin.spins;
    }
    out[0] = spins;
    out[1] = hits;
    out[2] = vm->loop_spin.spins;
    out[3] = vm->loop_spin.hits;
}

static void kick_all(struct avmm_vm *vm)
{
    for (int i = 0; i < vm->nvcpus; i++) {
        struct avmm_vcpu *v = &vm->vcpus[i];
        if (!v->started)
            continue;
        v->run->immediate_exit = 1;
        pthread_kill(v->thread, kick_signal);
    }
}

void avmm_vm_pause(struct avmm_vm *vm)
{
    atomic_store(&vm->pause_req, 1);
    atomic_fetch_add(&vm->park_gen, 1);
    kick_all(vm);
    for (int i = 0; i < vm->nvcpus; i++) {
        struct avmm_vcpu *v = &vm->vcpus[i];
        if (!v->started)
            continue;
        uint32_t s;
        while ((s = atomic_load(&v->state)) == AVMM_VCPU_RUNNING)
            futex_wait(&v->state, s);
    }
}

void avmm_vm_resume(struct avmm_vm *vm)
{
    atomic_store(&vm->pause_req, 0);
    unpark(vm);
}

void avmm_vcpu_hold(struct avmm_vm *vm, int idx, int on)
{
    struct avmm_vcpu *v = &vm->vcpus[idx];
    atomic_store(&v->held, on ? 1u : 0u);
    if (on) {
        if (v->started) {
            v->run->immediate_exit = 1;
            pthread_kill(v->thread, kick_signal);
        }
    } else {
        unpark(vm);
    }
}

int avmm_vm_settle(struct avmm_vm *vm, int *out, int max, uint64_t timeout_ns)
{
    uint64_t deadline = now_ns() + timeout_ns;
    for (;;) {
        int n = collect_posted(vm, out, max);
        if (n)
            return n;
        int moving = 0;
        for (int i = 0; i < vm->nvcpus; i++) {
            struct avmm_vcpu *v = &vm->vcpus[i];
            uint32_t s = atomic_load(&v->state);
            if (!v->started || !atomic_load(&v->held) || s == AVMM_VCPU_PAUSED || s == AVMM_VCPU_DONE)
                continue;
            moving = 1;
            if (s == AVMM_VCPU_RUNNING) { /* re-kick: the signal may have come before KVM_RUN */
                v->run->immediate_exit = 1;
                pthread_kill(v->thread, kick_signal);
            }
        }
        if (!moving)
            return 0;
        if (now_ns() >= deadline)
            return -ETIMEDOUT;
        struct timespec ts = {0, 200000};
        nanosleep(&ts, NULL);
    }
}

void avmm_vm_stop(struct avmm_vm *vm)
{
    atomic_store(&vm->quit, 1);
    kick_all(vm);
    unpark(vm);
    for (int i = 0; i < vm->nvcpus; i++) {
        struct avmm_vcpu *v = &vm->vcpus[i];
        if (!v->started)
            continue;
        /* A vCPU waiting on the loop is told to quit; one in KVM_RUN was kicked. */
        while (atomic_load(&v->state) != AVMM_VCPU_DONE) {
            if (atomic_load(&v->state) == AVMM_VCPU_WAITING) {
                atomic_store(&v->posted, 0);
                avmm_vcpu_complete(vm, i, AVMM_ACTION_QUIT);
            }
            /* re-kick in case the signal landed before KVM_RUN */
            v->run->immediate_exit = 1;
            pthread_kill(v->thread, kick_signal);
            struct timespec ts = {0, 1000000};
            syscall(SYS_futex, (uint32_t *)&v->state, FUTEX_WAIT_PRIVATE, atomic_load(&v->state), &ts, NULL, 0);
        }
        pthread_join(v->thread, NULL);
        v->started = 0;
    }
}

void avmm_vm_free(struct avmm_vm *vm)
{
    if (!vm)
        return;
    avmm_vm_stop(vm);
    for (int i = 0; i < vm->nvcpus; i++) {
        if (vm->vcpus[i].run)
            munmap(vm->vcpus[i].run, vm->vcpus[i].run_size);
        free(vm->vcpus[i].samples);
    }
    for (int i = 0; i < AVMM_UART_FAST_SLOTS; i++)
        pthread_mutex_destroy(&vm->uart[i].lock);
    free(vm->vcpus);
    free(vm);
}

/* ---- thin wrappers ----------------------------------------------------------------- */

long avmm_ioctl(int fd, unsigned long request, void *arg)
{
    long r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

long avmm_ioctl_val(int fd, unsigned long request, unsigned long arg)
{
    long r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

void *avmm_map_run(int vcpu_fd, size_t mmap_size)
{
    void *p = mmap(NULL, mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu_fd, 0);
    return p == MAP_FAILED ? NULL : p;
}

void avmm_unmap(void *addr, size_t size)
{
    munmap(addr, size);
}

int avmm_run_once(int vcpu_fd, void *run)
{
    if (ioctl(vcpu_fd, KVM_RUN, 0) < 0)
        return -errno;
    return (int)((struct kvm_run *)run)->exit_reason;
}

int avmm_kvm_irq_line(int32_t vm_fd, uint32_t gsi, uint32_t level)
{
    struct kvm_irq_level l = {.irq = gsi, .level = level};
    return ioctl(vm_fd, KVM_IRQ_LINE, &l) < 0 ? -errno : 0;
}

void avmm_vm_set_seccomp(struct avmm_vm *vm, int action)
{
    vm->seccomp_action = action;
}
