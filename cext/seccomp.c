/* seccomp-bpf allow-lists per kind of thread: see seccomp.h. The programs are built from the
 * tables below with the kernel's <linux/filter.h> macros: check the architecture, load the
 * syscall number, then one comparison per allowed call; calls whose arguments matter
 * (ioctl on a vCPU thread, clone, socket, openat on a helper) jump to their own checks. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/kvm.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "seccomp.h"

#ifndef SECCOMP_RET_LOG
#define SECCOMP_RET_LOG 0x7ffc0000U
#endif

/* The calls every thread makes: memory, futexes, signals, clocks, its own exit. */
static const int common[] = {
    SYS_read, SYS_write, SYS_readv, SYS_writev, SYS_close, SYS_futex, SYS_mmap, SYS_munmap,
    SYS_mremap, SYS_mprotect, SYS_madvise, SYS_brk, SYS_rt_sigreturn, SYS_rt_sigprocmask,
    SYS_rt_sigaction, SYS_sigaltstack, SYS_clock_gettime, SYS_clock_nanosleep, SYS_nanosleep,
    SYS_gettid, SYS_getpid, SYS_tgkill, SYS_exit, SYS_exit_group, SYS_sched_yield,
    SYS_restart_syscall, SYS_set_robust_list, SYS_rseq, SYS_getrandom,
    SYS_seccomp, /* only ever to add a filter: a filter can narrow what a thread may do, never widen it */
    SYS_prctl,   /* PR_SET_NO_NEW_PRIVS before it, thread names */
};

/* A vCPU thread: the KVM_RUN loop (vcpu_loop.c) — futex waits on the loop, eventfd writes to
 * wake it, RIP samples (KVM_GET_REGS), its sampling timer's end. ioctl: two requests. */
static const int vcpu[] = {SYS_timer_delete};
static const unsigned long vcpu_ioctls[] = {KVM_RUN, KVM_GET_REGS};

/* A helper thread: reading images and unpacking them (asyncio.to_thread), console output
 * (select: waiting for a non-blocking stdout shared with another program, console.py). */
static const int helper[] = {
    SYS_pread64, SYS_pwrite64, SYS_fstat, SYS_newfstatat, SYS_statx, SYS_lseek, SYS_fcntl,
    SYS_poll, SYS_ppoll, SYS_select, SYS_pselect6, SYS_getdents64, SYS_readlink, SYS_getcwd,
    SYS_sched_getaffinity,
};
static const unsigned long helper_ioctls[] = {TCGETS, TIOCGWINSZ};

/* A device's own thread (blk_thread.c): it waits and submits in io_uring_enter, reads its
 * doorbells' and its wake-up eventfds, writes interrupt eventfds; no ioctl, no files.
 * virtio-net's (net_thread.c) waits in ppoll (poll: avmm_net_poll's look at the TAPs) and
 * moves frames with readv/writev (common). */
static const int iothread[] = {SYS_io_uring_enter, SYS_ppoll, SYS_poll};

/* The loop's thread: the Python interpreter and everything the loop serves (sockets,
 * eventfds, io_uring, TAPs, images, the terminal), and, on a guest reset, the building of a
 * new machine (/dev/kvm, KVM_CREATE_VM...). That is why its ioctl and openat are not
 * filtered by argument: what it denies is what a VMM never does (exec, fork, ptrace,
 * mount, module loading, bpf, privilege changes, namespaces, inet servers...). */
static const int loop[] = {
    SYS_pread64, SYS_pwrite64, SYS_preadv, SYS_pwritev, SYS_preadv2, SYS_pwritev2, SYS_fstat,
    SYS_newfstatat, SYS_statx, SYS_lseek, SYS_fcntl, SYS_ioctl, SYS_openat, SYS_getdents64,
    SYS_readlink, SYS_readlinkat, SYS_getcwd, SYS_access, SYS_faccessat, SYS_faccessat2,
    SYS_unlink, SYS_unlinkat, SYS_rename, SYS_renameat, SYS_renameat2, SYS_flock, SYS_fdatasync, SYS_fsync, SYS_fallocate, SYS_ftruncate,
    SYS_statfs, SYS_fstatfs, SYS_mkdir, SYS_mkdirat, SYS_umask, SYS_fchmod,
    SYS_poll, SYS_ppoll, SYS_select, SYS_pselect6, SYS_epoll_create1, SYS_epoll_ctl,
    SYS_epoll_wait, SYS_epoll_pwait, SYS_eventfd2, SYS_pipe2, SYS_dup, SYS_dup2, SYS_dup3,
    SYS_accept4, SYS_bind, SYS_listen, SYS_connect, SYS_getsockopt, SYS_setsockopt,
    SYS_getsockname, SYS_getpeername, SYS_recvfrom, SYS_sendto, SYS_recvmsg, SYS_sendmsg,
    SYS_shutdown, SYS_socketpair, SYS_io_uring_setup, SYS_io_uring_enter, SYS_io_uring_register,
    SYS_kill, SYS_sched_getaffinity, SYS_sched_setaffinity, SYS_prctl, SYS_getuid, SYS_geteuid,
    SYS_getgid, SYS_getegid, SYS_uname, SYS_sysinfo, SYS_getrusage, SYS_times, SYS_getcpu,
    SYS_timer_create, SYS_timer_settime, SYS_timer_delete, SYS_set_tid_address, SYS_memfd_create,
    SYS_mlock, SYS_munlock, SYS_getppid, SYS_wait4,
    SYS_prlimit64, SYS_getrlimit, SYS_capget, /* -S: RLIMIT_MEMLOCK and CAP_IPC_LOCK before mlock */
};

#define MAX_INSNS 512

struct prog {
    struct sock_filter f[MAX_INSNS];
    unsigned n;
};

static void emit(struct prog *p, struct sock_filter ins)
{
    if (p->n < MAX_INSNS)
        p->f[p->n++] = ins;
}

#define ARG_LO(i) (offsetof(struct seccomp_data, args) + 8 * (i))
#define ARG_HI(i) (ARG_LO(i) + 4)

static void allow_nr(struct prog *p, int nr)
{
    emit(p, (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (unsigned)nr, 0, 1));
    emit(p, (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW));
}

/* nr allowed when argument `arg` (a 32-bit value: its high half must be 0) is one of vals. */
static void allow_args(struct prog *p, int nr, int arg, const unsigned long *vals, unsigned nvals, uint32_t deny)
{
    /* if nr != this: skip the block (the 5 + 2 * nvals instructions below) */
    unsigned block = 5 + 2 * nvals;
    emit(p, (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (unsigned)nr, 0, block));
    emit(p, (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, ARG_HI(arg)));
    emit(p, (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0, 0, 2 * nvals + 1));
    emit(p, (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, ARG_LO(arg)));
    for (unsigned i = 0; i < nvals; i++) {
        emit(p, (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (uint32_t)vals[i], 0, 1));
        emit(p, (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW));
    }
    emit(p, (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, deny));
    /* reload the syscall number for the comparisons after this block */
    emit(p, (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)));
}

/* nr allowed when (argument `arg` & mask) == want (32-bit argument). */
static void allow_masked(struct prog *p, int nr, int arg, uint32_t mask, uint32_t want, uint32_t deny)
{
    emit(p, (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (unsigned)nr, 0, 5));
    emit(p, (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, ARG_LO(arg)));
    emit(p, (struct sock_filter)BPF_STMT(BPF_ALU | BPF_AND | BPF_K, mask));
    emit(p, (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, want, 0, 1));
    emit(p, (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW));
    emit(p, (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, deny));
}

#define N(a) (sizeof(a) / sizeof((a)[0]))

static void build(struct prog *p, int kind, uint32_t deny)
{
    p->n = 0;
    /* Another architecture's calls (x32, i386 through int 0x80) are never allowed. */
    emit(p, (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)));
    emit(p, (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0));
    emit(p, (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS));
    emit(p, (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)));
    emit(p, (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, 0x40000000u, 0, 1)); /* x32 ABI */
    emit(p, (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS));
    /* A vCPU's KVM_RUN first: the kernel caches the answer for calls whose arguments no
     * filter reads (futex, write...), so ioctl, the one call per exit, is the only one
     * that runs the program — 10 instructions to its answer rather than 70. */
    if (kind == AVMM_SECCOMP_VCPU)
        allow_args(p, SYS_ioctl, 1, vcpu_ioctls, N(vcpu_ioctls), deny);
    for (unsigned i = 0; i < N(common); i++)
        allow_nr(p, common[i]);
    switch (kind) {
    case AVMM_SECCOMP_VCPU:
        for (unsigned i = 0; i < N(vcpu); i++)
            allow_nr(p, vcpu[i]);
        break;
    case AVMM_SECCOMP_HELPER:
        for (unsigned i = 0; i < N(helper); i++)
            allow_nr(p, helper[i]);
        allow_args(p, SYS_ioctl, 1, helper_ioctls, N(helper_ioctls), deny);
        /* openat(dirfd, path, flags): read-only, nothing created */
        allow_masked(p, SYS_openat, 2, O_ACCMODE | O_CREAT | O_TRUNC, O_RDONLY, deny);
        break;
    case AVMM_SECCOMP_IOTHREAD:
        for (unsigned i = 0; i < N(iothread); i++)
            allow_nr(p, iothread[i]);
        break;
    case AVMM_SECCOMP_LOOP: {
        /* AF_INET: SIOCSIFFLAGS on a new TAP, and with AF_INET6 the -l comN,tcp= consoles */
        static const unsigned long families[] = {AF_UNIX, AF_INET, AF_INET6};
        for (unsigned i = 0; i < N(loop); i++)
            allow_nr(p, loop[i]);
        allow_args(p, SYS_socket, 0, families, N(families), deny);
        /* clone3's flags are in memory a filter cannot read: ENOSYS makes glibc use clone */
        emit(p, (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_clone3, 0, 1));
        emit(p, (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENOSYS));
        /* clone: threads only (CLONE_THREAD), never a new process */
        allow_masked(p, SYS_clone, 0, CLONE_THREAD, CLONE_THREAD, deny);
        break;
    }
    }
    if (kind != AVMM_SECCOMP_LOOP) {
        /* threads never make threads; clone3 as above */
        emit(p, (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)));
        emit(p, (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_clone3, 0, 1));
        emit(p, (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENOSYS));
    }
    emit(p, (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, deny));
}

/* `kind`'s program for `action` in a new struct prog (free it), or NULL with errno set. */
static struct prog *program(int kind, int action)
{
    if (kind < AVMM_SECCOMP_VCPU || kind > AVMM_SECCOMP_IOTHREAD || action == AVMM_SECCOMP_OFF) {
        errno = EINVAL;
        return NULL;
    }
    uint32_t deny = action == AVMM_SECCOMP_KILL ? SECCOMP_RET_KILL_PROCESS : SECCOMP_RET_LOG;
    struct prog *p = malloc(sizeof(*p));
    if (!p)
        return NULL;
    build(p, kind, deny);
    if (p->n >= MAX_INSNS) {
        free(p);
        errno = E2BIG;
        return NULL;
    }
    return p;
}

int avmm_seccomp_program(int kind, int action, void *out, unsigned max)
{
    struct prog *p = program(kind, action);
    if (!p)
        return -errno;
    int n = (int)p->n;
    if (out && max)
        memcpy(out, p->f, (n < (int)max ? (unsigned)n : max) * sizeof(struct sock_filter));
    free(p);
    return n;
}

int avmm_seccomp_install(int kind, int action, int all_threads)
{
    if (action == AVMM_SECCOMP_OFF)
        return 0;
    struct prog *p = program(kind, action);
    if (!p)
        return -errno;
    struct sock_fprog fprog = {.len = (unsigned short)p->n, .filter = p->f};
    /* Needed without CAP_SYS_ADMIN; and what the filter allows, no exec could widen. */
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) {
        free(p);
        return -errno;
    }
    long r = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, all_threads ? SECCOMP_FILTER_FLAG_TSYNC : 0, &fprog);
    int err = r < 0 ? -errno : (int)r;
    free(p);
    return err;
}

