/* virtio-blk's own thread: see blk_thread.h. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>

#include "blk_thread.h"
#include "devthread.h"
#include "util.h"

/* 16 looks at the rings take ~1-2 µs: a gap this long between two clock reads of the spin
 * means the thread was not running. */
#define PREEMPTED_NS 20000u

struct avmm_blk_thread {
    struct avmm_devthread d; /* wake_fd is watched by io_uring (AVMM_ENGINE_TAG_WAKE) */
    struct avmm_blk *b;
    struct avmm_engine *e;
    struct avmm_blk_thread_config cfg;
    struct avmm_blk_thread_stats stats;
};

/* Spin up to the window for work: the queues found with buffers (a mask), ~0 for
 * completions or a control request, 0 if nothing came. */
static uint64_t poll_for_work(struct avmm_blk_thread *t)
{
    uint64_t now = avmm_now_ns(), deadline = now + t->stats.poll_ns;
    do {
        for (int spin = 0; spin < 16; spin++) {
            if (avmm_engine_ready(t->e) || avmm_devthread_called(&t->d))
                return ~0ull;
            uint64_t q = avmm_blk_pending(t->b);
            if (q)
                return q;
            __builtin_ia32_pause();
        }
        uint64_t last = now;
        now = avmm_now_ns();
        if (now - last > PREEMPTED_NS) {
            /* The CPU was taken from the spin: another task wanted it (KVM's halt polling stops
             * as soon as another task is runnable on the CPU). Spinning on would take it again
             * from whoever has to run for the guest's next request (the guest itself, on a
             * loaded host): stop, and start the window again from 0. */
            t->stats.poll_preempted++;
            __atomic_store_n(&t->stats.poll_ns, 0, __ATOMIC_RELAXED);
            return 0;
        }
    } while (now < deadline);
    return 0;
}

static void *thread_main(void *arg)
{
    struct avmm_blk_thread *t = arg;
    if (avmm_devthread_enter(t->cfg.seccomp_action) < 0)
        t->stats.seccomp_failed = 1;
    /* The watches are armed here, not by the loop: io_uring runs a poll's wake-up (the task
     * work that posts its CQE) in the task that armed it, and a loop that had armed them
     * would be interrupted out of its epoll_wait for every doorbell (measured: one EINTR per
     * request, a wake-up of the loop's idle CPU before the thread could see the CQE). */
    avmm_engine_watch(t->e, t->d.wake_fd, AVMM_ENGINE_TAG_WAKE);
    avmm_blk_watch_kicks(t->b);
    int said_broken = 0;
    /* Every queue once at the start: doorbells rung before DRIVER_OK. */
    uint64_t said_format = avmm_blk_format_writes(t->b), queues = ~0ull;
    for (;;) {
        if (avmm_devthread_called(&t->d)) {
            avmm_blk_doorbells_on(t->b); /* whoever serves next (the loop, a restore) is kicked */
            if (avmm_devthread_parked(&t->d, &t->stats.parks))
                break;
            avmm_blk_watch_kicks(t->b); /* queues the loop set up meanwhile (the others are watched) */
            said_broken = avmm_blk_needs_reset(t->b); /* a reset while parked clears it */
            said_format = avmm_blk_format_writes(t->b);
            queues = ~0ull; /* look at every queue: the loop may have set them up */
        }
        int n = avmm_blk_serve(t->b, queues, t->stats.poll_ns != 0); /* a poll follows the last completion */
        queues = 0;
        if (n > 0)
            t->stats.turns++;
        int broken = avmm_blk_needs_reset(t->b);
        uint64_t format = avmm_blk_format_writes(t->b);
        if ((broken && !said_broken) || format != said_format)
            avmm_efd_signal(t->cfg.notify_fd);
        said_broken = broken;
        said_format = format;
        if (avmm_blk_again(t->b))
            continue; /* a queue spent its budget: round again (the control word first) */
        /* Poll for the guest's next request, not for the disk: with I/O in flight the
         * completions come at the disk's pace (tens of µs here, beyond the window), and a
         * spinning thread takes the CPU io_uring's workers and the guest need then (direct
         * writes at QD32 measured slower with it). */
        uint64_t t0 = 0; /* the wait for the guest starts with the poll that missed */
        if (n > 0 && t->stats.poll_ns && !avmm_blk_inflight(t->b)) {
            avmm_engine_flush(t->e); /* the batch's I/O starts now, not at the next wait */
            t->stats.polls++;
            t0 = avmm_now_ns();
            /* A doorbell rung while the thread spins costs the driver an exit (a vCPU) and
             * this thread an interrupt to post the doorbell's CQE (task work): the poll sees
             * the ring itself, so none is wanted until the thread sleeps again. The last
             * completion batch turned them off already, before the driver saw it; this is for
             * requests answered without one (a bad request's status), and costs a store. */
            avmm_blk_doorbells_off(t->b);
            queues = poll_for_work(t);
            /* On again for every queue, the one found too: the thread may sleep after this
             * turn (I/O in flight, another queue's doorbell); and the buffers that came as the
             * poll ended. */
            queues |= avmm_blk_doorbells_on(t->b);
            if (queues) {
                t->stats.poll_hits++;
                continue;
            }
        }
        /* The window is for the guest's next request, so only a wait for it (nothing in
         * flight) adapts it: a wait for the disk says nothing about the guest, and this disk's
         * completions (~50-60 µs, beyond the window) had shrunk it to 0 after every request —
         * the thread then slept for every doorbell (measured at QD1: 2 wake-ups per request). */
        if ((queues = avmm_blk_doorbells_on(t->b)))
            continue; /* a completion turned them off, and buffers came meanwhile */
        int for_guest = !avmm_blk_inflight(t->b) && !avmm_engine_ready(t->e);
        if (!t0)
            t0 = avmm_now_ns();
        avmm_engine_wait(t->e, AVMM_ENGINE_FOREVER); /* submits the batch and sleeps, one call */
        t->stats.waits++;
        if (for_guest)
            avmm_devthread_adapt(&t->stats.poll_ns, t->cfg.poll_max_ns, avmm_now_ns() - t0);
    }
    return NULL;
}

struct avmm_blk_thread *avmm_blk_thread_start(struct avmm_blk *b, struct avmm_engine *e,
                                              const struct avmm_blk_thread_config *cfg)
{
    struct avmm_blk_thread *t = calloc(1, sizeof(*t));
    if (!t)
        return NULL;
    t->b = b;
    t->e = e;
    t->cfg = *cfg;
    return avmm_devthread_start(&t->d, thread_main, t, t->cfg.name, sizeof(t->cfg.name));
}

void avmm_blk_thread_park(struct avmm_blk_thread *t) { avmm_devthread_park(&t->d); }
void avmm_blk_thread_unpark(struct avmm_blk_thread *t) { avmm_devthread_unpark(&t->d); }

void avmm_blk_thread_stop(struct avmm_blk_thread *t)
{
    if (t)
        avmm_devthread_stop(&t->d, t);
}

struct avmm_blk_thread_stats *avmm_blk_thread_stats(struct avmm_blk_thread *t) { return &t->stats; }
