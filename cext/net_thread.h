/*
 * virtio-net's own thread on a TAP (what vhost-net does in the kernel): it serves one
 * device's queue pairs with no loop and no Python in between.
 *
 * One ppoll waits on every pair's TX and RX doorbells (their ioeventfds), every TAP
 * (POLLIN while the guest has RX buffers, POLLOUT while a TX frame waits for room) and a
 * wake-up eventfd of the loop's. ppoll, not io_uring: these are a handful of fds whose
 * readiness is all we want (no I/O to submit), the set changes with the flow control
 * (TAP in or out), and readv/writev on a TAP complete at once; a poll array rebuilt
 * per wait costs nothing beside the frames.
 *
 * Flow control: RX with no buffers (AVMM_NET_RX_NO_BUFFERS) stops polling that TAP until
 * the RX doorbell; TX that the TAP refused (AVMM_NET_TX_BLOCKED) leaves the frame in the
 * ring and waits for POLLOUT; a batch that spent its budget comes round again at once.
 * After a batch it may busy-poll (avmm_net_poll) for the next frame either way, for an
 * adaptive window (KVM's halt polling rule, as blk_thread.h) of at most poll_max_ns (0:
 * never; the caller gives 0 when the host has no CPU to spare, asyncvmm.poll).
 *
 * The loop talks to it through park/unpark (nesting; park returns once the thread sleeps
 * on a condition variable and touches neither the device nor the TAP), as blk_thread.h.
 * After an unpark it serves every pair once (doorbells rung meanwhile). A ring that breaks
 * stops the thread serving (it waits for a park) and signals notify_fd: the loop sets
 * DEVICE_NEEDS_RESET. The thread installs its own seccomp filter (AVMM_SECCOMP_IOTHREAD).
 */
#ifndef AVMM_NET_THREAD_H
#define AVMM_NET_THREAD_H

#include <stdint.h>

#include "net.h"

struct avmm_net_thread_config {
    uint64_t poll_max_ns;   /* the longest busy poll after a batch; 0: never poll */
    int32_t notify_fd;      /* an eventfd the loop reads: a ring broke */
    int32_t seccomp_action; /* enum avmm_seccomp_action for the thread's own filter */
    uint32_t npairs;        /* the device's queue pairs (their TAPs: avmm_net_fd, read after each park) */
    char name[16];          /* the thread's name (15 characters) */
};

struct avmm_net_thread_stats {
    uint64_t turns;     /* wake-ups that moved frames */
    uint64_t waits;     /* sleeps in ppoll */
    uint64_t polls;     /* busy polls started */
    uint64_t poll_hits; /* polls that found work */
    uint64_t poll_ns;   /* the current window */
    uint64_t parks;
    uint64_t rx_stops;  /* times the TAP was left unpolled for want of RX buffers */
    uint64_t tx_waits;  /* times a TX frame waited for the TAP to take more */
    uint32_t broken;    /* a ring broke: the thread serves nothing until parked */
    uint32_t seccomp_failed;
};

struct avmm_net_thread;

/* Start serving `n` (queues set up, or not yet: it serves what is set up) in a new thread.
 * NULL on failure (errno set). */
struct avmm_net_thread *avmm_net_thread_start(struct avmm_net *n, const struct avmm_net_thread_config *cfg);
void avmm_net_thread_park(struct avmm_net_thread *t);
void avmm_net_thread_unpark(struct avmm_net_thread *t);
/* Stop, join and free (the device and the TAPs stay the caller's). */
void avmm_net_thread_stop(struct avmm_net_thread *t);
struct avmm_net_thread_stats *avmm_net_thread_stats(struct avmm_net_thread *t);

#endif
