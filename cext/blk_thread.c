/* virtio-blk's own thread: see blk_thread.h. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "blk_thread.h"
#include "seccomp.h"
#include "util.h"

#define POLL_MIN_NS 4000u /* the first window once polling pays */

struct avmm_blk_thread {
    struct avmm_blk *b;
    struct avmm_engine *e;
    struct avmm_blk_thread_config cfg;
    pthread_t tid;
    int wake_fd; /* watched by io_uring (AVMM_ENGINE_TAG_WAKE): ends the thread's wait */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int control; /* atomic: the loop wants the thread's attention (park or stop) */
    unsigned parks; /* under lock */
    int parked;     /* under lock: the thread sleeps on cond */
    int stop;       /* under lock */
    struct avmm_blk_thread_stats stats;
};

/* The window after a sleep of `slept` ns: KVM's halt-polling rule. */
static void adapt(struct avmm_blk_thread *t, uint64_t slept)
{
    uint64_t w = t->stats.poll_ns, max = t->cfg.poll_max_ns;
    if (!max)
        return;
    if (slept <= max) /* the event came soon after the poll gave up: poll longer */
        w = w * 2 < POLL_MIN_NS ? POLL_MIN_NS : w * 2 > max ? max : w * 2;
    else /* a long wait: polling would not have caught it */
        w = w / 2 < POLL_MIN_NS ? 0 : w / 2;
    __atomic_store_n(&t->stats.poll_ns, w, __ATOMIC_RELAXED);
}

/* Spin up to the window for work: the queues found with buffers (a mask), ~0 for
 * completions or a control request, 0 if nothing came. */
static uint64_t poll_for_work(struct avmm_blk_thread *t)
{
    uint64_t deadline = avmm_now_ns() + t->stats.poll_ns;
    do {
        for (int spin = 0; spin < 16; spin++) {
            if (avmm_engine_ready(t->e) || __atomic_load_n(&t->control, __ATOMIC_ACQUIRE))
                return ~0ull;
            uint64_t q = avmm_blk_pending(t->b);
            if (q)
                return q;
            __builtin_ia32_pause();
        }
    } while (avmm_now_ns() < deadline);
    return 0;
}

/* Sleep while parked; 1 when told to stop. */
static int parked(struct avmm_blk_thread *t)
{
    pthread_mutex_lock(&t->lock);
    while (t->parks && !t->stop) {
        if (!t->parked)
            t->stats.parks++;
        t->parked = 1;
        pthread_cond_broadcast(&t->cond);
        pthread_cond_wait(&t->cond, &t->lock);
    }
    t->parked = 0;
    int stop = t->stop;
    if (!stop)
        __atomic_store_n(&t->control, 0, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&t->lock);
    uint64_t drained;
    if (read(t->wake_fd, &drained, sizeof(drained)) < 0) {
        /* EAGAIN: the wake-up was not needed (the thread was polling) */
    }
    return stop;
}

static void *thread_main(void *arg)
{
    struct avmm_blk_thread *t = arg;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL); /* signals are the loop's */
    if (t->cfg.seccomp_action && avmm_seccomp_install(AVMM_SECCOMP_IOTHREAD, t->cfg.seccomp_action, 0) < 0)
        t->stats.seccomp_failed = 1;
    /* The watches are armed here, not by the loop: io_uring runs a poll's wake-up (the task
     * work that posts its CQE) in the task that armed it, and a loop that had armed them
     * would be interrupted out of its epoll_wait for every doorbell (measured: one EINTR per
     * request, a wake-up of the loop's idle CPU before the thread could see the CQE). */
    avmm_engine_watch(t->e, t->wake_fd, AVMM_ENGINE_TAG_WAKE);
    avmm_blk_watch_kicks(t->b);
    int said_broken = 0;
    /* Every queue once at the start: doorbells rung before DRIVER_OK. */
    uint64_t said_format = avmm_blk_format_writes(t->b), queues = ~0ull;
    for (;;) {
        if (__atomic_load_n(&t->control, __ATOMIC_ACQUIRE)) {
            if (parked(t))
                break;
            avmm_blk_watch_kicks(t->b); /* queues the loop set up meanwhile (the others are watched) */
            said_broken = avmm_blk_needs_reset(t->b); /* a reset while parked clears it */
            said_format = avmm_blk_format_writes(t->b);
            queues = ~0ull; /* look at every queue: the loop may have set them up */
        }
        int n = avmm_blk_serve(t->b, queues);
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
        if (n > 0 && t->stats.poll_ns && !avmm_blk_inflight(t->b)) {
            avmm_engine_flush(t->e); /* the batch's I/O starts now, not at the next wait */
            t->stats.polls++;
            queues = poll_for_work(t);
            if (queues) {
                t->stats.poll_hits++;
                continue;
            }
        }
        uint64_t t0 = avmm_now_ns();
        avmm_engine_wait(t->e, AVMM_ENGINE_FOREVER); /* submits the batch and sleeps, one call */
        t->stats.waits++;
        adapt(t, avmm_now_ns() - t0);
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
    t->cfg.name[sizeof(t->cfg.name) - 1] = 0;
    t->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    int r = t->wake_fd < 0 ? -errno : 0;
    if (r == 0) {
        pthread_mutex_init(&t->lock, NULL);
        pthread_cond_init(&t->cond, NULL);
        r = -pthread_create(&t->tid, NULL, thread_main, t);
        if (r == 0) {
            if (t->cfg.name[0])
                pthread_setname_np(t->tid, t->cfg.name);
            return t;
        }
        pthread_cond_destroy(&t->cond);
        pthread_mutex_destroy(&t->lock);
    }
    if (t->wake_fd >= 0)
        close(t->wake_fd);
    free(t);
    errno = -r;
    return NULL;
}

void avmm_blk_thread_park(struct avmm_blk_thread *t)
{
    pthread_mutex_lock(&t->lock);
    t->parks++;
    __atomic_store_n(&t->control, 1, __ATOMIC_RELEASE);
    avmm_efd_signal(t->wake_fd);
    while (!t->parked)
        pthread_cond_wait(&t->cond, &t->lock);
    pthread_mutex_unlock(&t->lock);
}

void avmm_blk_thread_unpark(struct avmm_blk_thread *t)
{
    pthread_mutex_lock(&t->lock);
    if (t->parks && --t->parks == 0)
        pthread_cond_broadcast(&t->cond);
    pthread_mutex_unlock(&t->lock);
}

void avmm_blk_thread_stop(struct avmm_blk_thread *t)
{
    if (!t)
        return;
    pthread_mutex_lock(&t->lock);
    t->stop = 1;
    __atomic_store_n(&t->control, 1, __ATOMIC_RELEASE);
    avmm_efd_signal(t->wake_fd);
    pthread_cond_broadcast(&t->cond);
    pthread_mutex_unlock(&t->lock);
    pthread_join(t->tid, NULL);
    pthread_cond_destroy(&t->cond);
    pthread_mutex_destroy(&t->lock);
    close(t->wake_fd);
    free(t);
}

struct avmm_blk_thread_stats *avmm_blk_thread_stats(struct avmm_blk_thread *t) { return &t->stats; }
