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
 * microseconds, and a futex wake-up costs more than that (much more in a nested guest). */
#define WAIT_SPIN_NS 30000

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
    _Atomic uint32_t held;     /* parked for a debugger, whatever pause_req says */
    struct avmm_exit exit;
    struct avmm_vcpu_stats stats;
    uint64_t *samples;       /* RIP samples (sampling on), written by the vCPU thread only */
    size_t nsamples;
    timer_t timer;
    int has_timer;
};

struct avmm_vm {
    int nvcpus;
    int notify_efd;
    int console_efd;
    struct avmm_vcpu *vcpus;
    _Atomic uint32_t pause_req;
    _Atomic uint32_t park_gen;  /* futex word for parked vCPUs: bumped when pause_req, a
                                 * vCPU's `held` or quit changes */
    _Atomic uint32_t quit;
    int seccomp_action;         /* enum avmm_seccomp_action: each vCPU thread's filter */
    uint64_t sample_period_ns;  /* 0: no RIP sampling */
    size_t sample_capacity;
    /* UART fast path: the ports of THR and LSR, as the UART model gave them */
    _Atomic uint32_t uart_thr_port;
    _Atomic uint32_t uart_lsr_port;
    _Atomic uint32_t uart_flags;
    _Atomic uint32_t lsr_shadow;
    pthread_mutex_t console_lock;
    size_t console_len;
    uint8_t console_buf[CONSOLE_CAP];
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

/* ---- UART fast path ---------------------------------------------------------------- */

static int serve_fast_io(struct avmm_vcpu *v)
{
    struct avmm_vm *vm = v->vm;
    struct kvm_run *run = v->run;
    uint32_t thr_port = atomic_load_explicit(&vm->uart_thr_port, memory_order_acquire);
    if (!thr_port || run->io.size != 1)
        return 0;
    uint32_t flags = atomic_load_explicit(&vm->uart_flags, memory_order_acquire);
    uint8_t *data = (uint8_t *)run + run->io.data_offset;
    uint32_t count = run->io.count;

    if (run->io.port == thr_port && run->io.direction == KVM_EXIT_IO_OUT && (flags & AVMM_UART_FAST_THR)) {
        int was_empty;
        pthread_mutex_lock(&vm->console_lock);
        if (vm->console_len + count > CONSOLE_CAP) {
            pthread_mutex_unlock(&vm->console_lock);
            return 0; /* full: the loop drains, then serves this write itself */
        }
        was_empty = vm->console_len == 0;
        memcpy(vm->console_buf + vm->console_len, data, count);
        vm->console_len += count;
        pthread_mutex_unlock(&vm->console_lock);
        if (was_empty)
            notify(vm->console_efd);
        return 1;
    }
    if (run->io.port == atomic_load(&vm->uart_lsr_port) && run->io.direction == KVM_EXIT_IO_IN && (flags & AVMM_UART_FAST_LSR)) {
        memset(data, (int)atomic_load(&vm->lsr_shadow), count);
        return 1;
    }
    return 0;
}

void avmm_uart_fast_set(struct avmm_vm *vm, int thr_port, int lsr_port, int flags, int lsr_shadow)
{
    /* A vCPU that read the old flags may still use the shadow: when LSR leaves the fast
     * path, the last valid value stays. */
    if (flags & AVMM_UART_FAST_LSR)
        atomic_store(&vm->lsr_shadow, (uint32_t)lsr_shadow);
    atomic_store(&vm->uart_flags, (uint32_t)flags);
    atomic_store(&vm->uart_lsr_port, (uint32_t)lsr_port);
    atomic_store(&vm->uart_thr_port, (uint32_t)thr_port);
}

size_t avmm_console_drain(struct avmm_vm *vm, uint8_t *out, size_t cap)
{
    uint64_t counter;
    size_t n;
    pthread_mutex_lock(&vm->console_lock);
    /* Reset the eventfd under the lock: a writer that finds the buffer empty after
     * this drain will signal again. */
    if (read(vm->console_efd, &counter, sizeof(counter)) < 0) {
        /* EAGAIN: nothing signalled */
    }
    n = vm->console_len < cap ? vm->console_len : cap;
    memcpy(out, vm->console_buf, n);
    memmove(vm->console_buf, vm->console_buf + n, vm->console_len - n);
    vm->console_len -= n;
    if (vm->console_len)
        notify(vm->console_efd);
    pthread_mutex_unlock(&vm->console_lock);
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
        e->kind = AVMM_EXIT_MMIO;
        e->addr = run->mmio.phys_addr;
        e->size = run->mmio.len;
        e->count = 1;
        e->is_write = run->mmio.is_write;
        e->data = run->mmio.data;
        e->value = 0;
        if (e->is_write && e->size <= 8)
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

static uint32_t wait_action(struct avmm_vcpu *v)
{
    uint32_t a;
    uint64_t spin_until = now_ns() + WAIT_SPIN_NS;
    do {
        for (int i = 0; i < 32; i++) {
            a = atomic_load(&v->action);
            if (a)
                goto got;
            __builtin_ia32_pause();
        }
    } while (now_ns() < spin_until);
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

static uint32_t post_and_wait(struct avmm_vcpu *v, int err)
{
    uint64_t t0 = now_ns();
    uint32_t a;
    fill_exit(v, err);
    set_state(v, AVMM_VCPU_WAITING);
    atomic_store(&v->posted, 1);
    v->stats.posted++;
    notify(v->vm->notify_efd);
    a = wait_action(v);
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

    if (v->host_cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(v->host_cpu, &set);
        pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
    }
    start_sampling(v);
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
        v->stats.ns_exits[slot] += now_ns() - t1;
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
    pthread_mutex_init(&vm->console_lock, NULL);
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

void *avmm_vcpu_run_struct(struct avmm_vm *vm, int idx)
{
    return vm->vcpus[idx].run;
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

int avmm_vm_collect(struct avmm_vm *vm, int *out, int max, uint64_t poll_ns)
{
    uint64_t counter;
    int n;
    if (read(vm->notify_efd, &counter, sizeof(counter)) < 0) {
        /* EAGAIN: a previous collect already took these */
    }
    n = collect_posted(vm, out, max);
    if (n || !poll_ns)
        return n;
    uint64_t deadline = now_ns() + poll_ns;
    do {
        for (int i = 0; i < 64; i++)
            __builtin_ia32_pause();
        n = collect_posted(vm, out, max);
    } while (!n && !atomic_load(&vm->quit) && now_ns() < deadline);
    return n;
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
    pthread_mutex_destroy(&vm->console_lock);
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

void avmm_vm_set_seccomp(struct avmm_vm *vm, int action)
{
    vm->seccomp_action = action;
}
