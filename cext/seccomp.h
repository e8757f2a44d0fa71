/*
 * seccomp-bpf allow-lists, one per kind of thread (Firecracker's model): a vCPU thread, the
 * loop's thread, a helper thread (image reading, unpacking, console output). A call not on
 * the list gets the action: SECCOMP_RET_LOG (allowed, written to the kernel's audit log) or
 * SECCOMP_RET_KILL_PROCESS. Filters are per thread and inherited by threads created after;
 * they stack (a thread's calls pass every filter it has), and can never be removed.
 */
#ifndef AVMM_SECCOMP_H
#define AVMM_SECCOMP_H

enum avmm_seccomp_kind {
    AVMM_SECCOMP_VCPU = 1,   /* KVM_RUN and KVM_GET_REGS, futexes, eventfd signals */
    AVMM_SECCOMP_LOOP = 2,   /* the asyncio loop: Python, sockets, io_uring, KVM; builds machines */
    AVMM_SECCOMP_HELPER = 3, /* reads files, decompresses, writes the console: no ioctl but tty ones */
    AVMM_SECCOMP_IOTHREAD = 4, /* a device's own thread (blk_thread.c): io_uring_enter, eventfds */
};

enum avmm_seccomp_action {
    AVMM_SECCOMP_OFF = 0,
    AVMM_SECCOMP_LOG = 1,
    AVMM_SECCOMP_KILL = 2,
};

/* Install `kind`'s filter on the calling thread; with `all_threads`, on every thread of the
 * process (SECCOMP_FILTER_FLAG_TSYNC). 0, -errno, or (TSYNC) the positive TID of a thread
 * whose filters prevented it. */
int avmm_seccomp_install(int kind, int action, int all_threads);

/* The program `kind`'s filter is (struct sock_filter, 8 bytes each), copied into `out` up
 * to `max` instructions: its length, or -errno. What the kernel gives back for an
 * installed filter (PTRACE_SECCOMP_GET_FILTER) is compared with it in the tests. */
int avmm_seccomp_program(int kind, int action, void *out, unsigned max);

#endif
