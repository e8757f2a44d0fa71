/*
 * virtio-blk's own thread (QEMU's iothread model): it serves one device's doorbells and
 * completions with no loop and no Python in between.
 *
 * io_uring watches every queue's doorbell (a multishot POLL_ADD on its ioeventfd,
 * avmm_blk_watch_kicks) beside the I/O, so the thread waits for both in one io_uring_enter,
 * which also submits what the last batch queued. After a batch that left nothing in flight
 * it may busy-poll the avail rings (and the completion queue) for a while before it
 * sleeps, for the guest's next request: the window adapts to what
 * the polls find (KVM's halt polling rule: it grows while an event came soon after the
 * thread went to sleep, and shrinks, down to not polling at all, when the waits are long),
 * and is at most poll_max_ns (0: never poll; the caller gives 0 when the host has no CPU to
 * spare for it).
 *
 * The loop talks to the thread only through park/unpark: park returns once the thread
 * touches neither the device nor the engine (it sleeps on a condition variable), so the
 * loop may then call anything (reset, queue set-up, state, a snapshot's hold); unpark lets
 * it go on. Parks nest. A ring that breaks or a refused guest write (the device's
 * format_writes) signals notify_fd, once per change: the loop looks at the device then.
 * The thread installs its own seccomp filter (AVMM_SECCOMP_IOTHREAD) when asked.
 */
#ifndef AVMM_BLK_THREAD_H
#define AVMM_BLK_THREAD_H

#include <stdint.h>

#include "blk.h"
#include "ioengine.h"

struct avmm_blk_thread_config {
    uint64_t poll_max_ns;   /* the longest busy poll after a batch; 0: never poll */
    int32_t notify_fd;      /* an eventfd the loop reads: a ring broke, a write was refused */
    int32_t seccomp_action; /* enum avmm_seccomp_action for the thread's own filter */
    char name[16];          /* the thread's name (15 characters) */
};

struct avmm_blk_thread_stats {
    uint64_t turns;     /* turns that served something */
    uint64_t waits;     /* sleeps in io_uring */
    uint64_t polls;     /* busy polls started */
    uint64_t poll_hits; /* polls that found work */
    uint64_t poll_ns;   /* the current window */
    uint64_t parks;
    uint32_t seccomp_failed;
    uint32_t unused;
    uint64_t poll_preempted; /* polls cut short: the thread lost its CPU while spinning */
};

struct avmm_blk_thread;

/* Start serving `b` (its engine `e` set threaded by the caller) in a new thread, which arms
 * io_uring's watches on the doorbells itself (and again after each park, for queues set up
 * meanwhile). NULL on failure (errno set). */
struct avmm_blk_thread *avmm_blk_thread_start(struct avmm_blk *b, struct avmm_engine *e,
                                              const struct avmm_blk_thread_config *cfg);
void avmm_blk_thread_park(struct avmm_blk_thread *t);
void avmm_blk_thread_unpark(struct avmm_blk_thread *t);
/* Stop, join and free (the device and the engine stay the caller's). */
void avmm_blk_thread_stop(struct avmm_blk_thread *t);
struct avmm_blk_thread_stats *avmm_blk_thread_stats(struct avmm_blk_thread *t);

#endif
