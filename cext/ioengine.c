/* Storage engines: io_uring and synchronous syscalls behind one interface (ioengine.h). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <unistd.h>

#include "ioengine.h"
#include "util.h"

struct avmm_engine {
    int kind;
    int efd;
    unsigned entries;
    unsigned inflight; /* queued + submitted, not yet reaped */
    struct avmm_engine_stats stats;
    /* URING */
    struct io_uring ring;
    int ring_ok;
    unsigned unsubmitted;
    unsigned depth;   /* requests submitted, not yet reaped (stats.depth_ns integrates it) */
    uint64_t depth_t; /* when depth last changed */
    /* URING: fds io_uring watches (multishot POLL_ADD), so that one wait in io_uring
     * serves both the device's doorbells and its completions (avmm_engine_watch). */
    struct { int fd; uint32_t tag; uint32_t rearm; } watch[AVMM_ENGINE_MAX_WATCH];
    unsigned nwatch;
    uint64_t woken; /* tags whose fd became readable since avmm_engine_woken() */
    /* A device thread owns the engine (avmm_engine_set_threaded): no eventfd, and submits
     * wait for the thread's next io_uring_enter, which submits and waits in one call. */
    int threaded;
    /* SYNC and EXTERNAL: ops waiting for submit, completions waiting for reap */
    struct avmm_io_op *sq;
    unsigned sq_n;
    /* EXTERNAL: ops submitted, waiting for avmm_engine_take (from xq_head, xq_n of them) */
    struct avmm_io_op *xq;
    unsigned xq_head, xq_n;
    struct avmm_io_cqe *cq;
    unsigned cq_head, cq_n;
};

struct avmm_engine *avmm_engine_new(int kind, unsigned entries)
{
    if (entries == 0 || entries > 32768 || (kind != AVMM_ENGINE_URING && kind != AVMM_ENGINE_SYNC &&
                                                    kind != AVMM_ENGINE_EXTERNAL)) {
        errno = EINVAL;
        return NULL;
    }
    struct avmm_engine *e = calloc(1, sizeof(*e));
    if (!e)
        return NULL;
    e->kind = kind;
    e->entries = entries;
    e->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (e->efd < 0)
        goto fail;
    if (kind == AVMM_ENGINE_URING) {
        struct io_uring_params p;
        memset(&p, 0, sizeof(p));
        /* Completions may outnumber the SQ while a batch is reaped: twice as many CQEs. */
        p.flags = IORING_SETUP_CQSIZE;
        p.cq_entries = entries * 2;
        int r = io_uring_queue_init_params(entries, &e->ring, &p);
        if (r < 0) {
            errno = -r;
            goto fail;
        }
        e->ring_ok = 1;
        r = io_uring_register_eventfd(&e->ring, e->efd);
        if (r < 0) {
            errno = -r;
            goto fail;
        }
    } else {
        e->sq = calloc(entries, sizeof(*e->sq));
        e->cq = calloc(entries, sizeof(*e->cq));
        if (kind == AVMM_ENGINE_EXTERNAL)
            e->xq = calloc(entries, sizeof(*e->xq));
        if (!e->sq || !e->cq || (kind == AVMM_ENGINE_EXTERNAL && !e->xq))
            goto fail;
    }
    return e;
fail: {
    int saved = errno;
    avmm_engine_free(e);
    errno = saved;
    return NULL;
}
}

void avmm_engine_free(struct avmm_engine *e)
{
    if (!e)
        return;
    avmm_engine_drain(e);
    if (e->ring_ok)
        io_uring_queue_exit(&e->ring);
    if (e->efd >= 0)
        close(e->efd);
    free(e->sq);
    free(e->cq);
    free(e->xq);
    free(e);
}

/* The depth changes by `delta` now: its integral takes the span at the old depth. */
static void depth_change(struct avmm_engine *e, int delta)
{
    if (!delta)
        return;
    uint64_t t = avmm_now_ns();
    if (e->depth)
        e->stats.depth_ns += (uint64_t)e->depth * (t - e->depth_t);
    e->depth_t = t;
    e->depth = (unsigned)((int)e->depth + delta);
}

int avmm_engine_fd(const struct avmm_engine *e) { return e->efd; }
struct avmm_engine_stats *avmm_engine_stats(struct avmm_engine *e) { return &e->stats; }

unsigned avmm_engine_ready(struct avmm_engine *e)
{
    return e->kind != AVMM_ENGINE_URING ? e->cq_n : io_uring_cq_ready(&e->ring);
}

int avmm_engine_queue(struct avmm_engine *e, const struct avmm_io_op *op)
{
    if (e->inflight >= e->entries)
        return -EBUSY;
    if (op->opcode != AVMM_IO_READV && op->opcode != AVMM_IO_WRITEV && op->opcode != AVMM_IO_FSYNC &&
        op->opcode != AVMM_IO_FALLOCATE)
        return -EINVAL; /* before an SQE is taken: one left unfilled would still be submitted */
    if (e->kind != AVMM_ENGINE_URING) {
        e->sq[e->sq_n++] = *op;
    } else {
        struct io_uring_sqe *sqe = io_uring_get_sqe(&e->ring);
        if (!sqe)
            return -EBUSY;
        switch (op->opcode) {
        case AVMM_IO_READV:
            io_uring_prep_readv2(sqe, op->fd, op->iov, op->niov, op->off, op->flags);
            break;
        case AVMM_IO_WRITEV:
            io_uring_prep_writev2(sqe, op->fd, op->iov, op->niov, op->off, op->flags);
            break;
        case AVMM_IO_FSYNC:
            io_uring_prep_fsync(sqe, op->fd, IORING_FSYNC_DATASYNC);
            break;
        case AVMM_IO_FALLOCATE:
            io_uring_prep_fallocate(sqe, op->fd, op->flags, (off_t)op->off, (off_t)op->len);
            break;
        }
        io_uring_sqe_set_data64(sqe, op->user_data);
        e->unsubmitted++;
    }
    e->inflight++;
    e->stats.ops++;
    return 0;
}

static int64_t run_sync(const struct avmm_io_op *op)
{
    ssize_t r;
    switch (op->opcode) {
    case AVMM_IO_READV:
        r = preadv2(op->fd, op->iov, (int)op->niov, (off_t)op->off, op->flags);
        break;
    case AVMM_IO_WRITEV:
        r = pwritev2(op->fd, op->iov, (int)op->niov, (off_t)op->off, op->flags);
        break;
    case AVMM_IO_FSYNC:
        r = fdatasync(op->fd);
        break;
    case AVMM_IO_FALLOCATE:
        r = fallocate(op->fd, op->flags, (off_t)op->off, (off_t)op->len);
        break;
    default:
        errno = EINVAL;
        r = -1;
    }
    return r < 0 ? -(int64_t)errno : (int64_t)r;
}

int avmm_engine_submit(struct avmm_engine *e)
{
    if (e->kind == AVMM_ENGINE_EXTERNAL) {
        unsigned n = e->sq_n;
        for (unsigned i = 0; i < n; i++) /* room: queued + in the hands of the taker <= entries */
            e->xq[(e->xq_head + e->xq_n++) % e->entries] = e->sq[i];
        e->sq_n = 0;
        if (n)
            e->stats.submits++;
        return (int)n;
    }
    if (e->kind == AVMM_ENGINE_SYNC) {
        unsigned n = e->sq_n;
        if (!n)
            return 0;
        for (unsigned i = 0; i < n; i++) {
            struct avmm_io_cqe *c = &e->cq[(e->cq_head + e->cq_n++) % e->entries];
            c->user_data = e->sq[i].user_data;
            c->res = run_sync(&e->sq[i]);
        }
        e->sq_n = 0;
        e->stats.submits++;
        avmm_efd_signal(e->efd);
        return (int)n;
    }
    if (e->threaded)
        return (int)e->unsubmitted; /* the thread's next wait submits them (avmm_engine_wait) */
    return avmm_engine_flush(e);
}

/* io_uring_submit, and what it did to the counts */
static int submit_now(struct avmm_engine *e)
{
    unsigned io = e->inflight - e->depth; /* requests queued (the rest of unsubmitted: watches) */
    int r = io_uring_submit(&e->ring);
    if (r < 0)
        return r;
    depth_change(e, (int)((unsigned)r < io ? (unsigned)r : io));
    e->unsubmitted -= (unsigned)r;
    return r;
}

int avmm_engine_flush(struct avmm_engine *e)
{
    if (e->kind != AVMM_ENGINE_URING)
        return avmm_engine_submit(e);
    if (!e->unsubmitted)
        return 0;
    int r = submit_now(e);
    if (r >= 0)
        e->stats.submits++;
    return r;
}

int avmm_engine_set_threaded(struct avmm_engine *e, int on)
{
    if (e->kind != AVMM_ENGINE_URING)
        return on ? -EINVAL : 0;
    on = !!on;
    if (on == e->threaded)
        return 0;
    int r = on ? io_uring_unregister_eventfd(&e->ring) : io_uring_register_eventfd(&e->ring, e->efd);
    if (r < 0)
        return r;
    if (!on) {
        avmm_engine_flush(e);
        avmm_efd_signal(e->efd); /* the loop's reader looks once: completions may be waiting */
    }
    e->threaded = on;
    return 0;
}

/* Watch CQEs carry this bit in user_data; requests' user_data are slot numbers. */
#define WATCH_BIT (1ull << 63)

static int arm_watch(struct avmm_engine *e, int fd, uint32_t tag)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&e->ring);
    if (!sqe)
        return -EBUSY;
    io_uring_prep_poll_multishot(sqe, fd, POLLIN);
    io_uring_sqe_set_data64(sqe, WATCH_BIT | tag);
    e->unsubmitted++;
    return 0;
}

int avmm_engine_watch(struct avmm_engine *e, int fd, unsigned tag)
{
    if (e->kind != AVMM_ENGINE_URING || tag > AVMM_ENGINE_TAG_WAKE || e->nwatch >= AVMM_ENGINE_MAX_WATCH)
        return -EINVAL;
    for (unsigned i = 0; i < e->nwatch; i++)
        if (e->watch[i].fd == fd)
            return 0; /* already watched */
    int r = arm_watch(e, fd, tag);
    if (r < 0)
        return r;
    e->watch[e->nwatch].fd = fd;
    e->watch[e->nwatch].tag = tag;
    e->watch[e->nwatch].rearm = 0;
    e->nwatch++;
    r = submit_now(e);
    return r < 0 ? r : 0;
}

uint64_t avmm_engine_woken(struct avmm_engine *e)
{
    uint64_t w = e->woken;
    e->woken = 0;
    return w;
}

int avmm_engine_wait(struct avmm_engine *e, uint64_t max_ns)
{
    if (e->kind != AVMM_ENGINE_URING)
        return avmm_engine_ready(e) ? 1 : 0;
    if (io_uring_cq_ready(&e->ring)) {
        avmm_engine_flush(e);
        return 1;
    }
    struct __kernel_timespec ts = {.tv_sec = (long long)(max_ns / 1000000000u), .tv_nsec = (long long)(max_ns % 1000000000u)};
    struct io_uring_cqe *cqe;
    if (e->unsubmitted)
        depth_change(e, (int)(e->inflight - e->depth)); /* submitted as the call starts */
    int r = io_uring_submit_and_wait_timeout(&e->ring, &cqe, 1, max_ns == AVMM_ENGINE_FOREVER ? NULL : &ts, NULL);
    if (r >= 0 && e->unsubmitted) {
        e->unsubmitted = 0; /* submit_and_wait submitted them */
        e->stats.submits++;
    }
    if (r == -ETIME || r == -EINTR)
        return 0;
    return r < 0 ? r : (io_uring_cq_ready(&e->ring) ? 1 : 0);
}

int avmm_engine_reap(struct avmm_engine *e, struct avmm_io_cqe *out, int max)
{
    uint64_t counter;
    int n = 0;
    e->stats.reap_calls++;
    if (!e->threaded && read(e->efd, &counter, sizeof(counter)) < 0) {
        /* EAGAIN: nothing signalled; completions may still be there */
    }
    if (e->kind != AVMM_ENGINE_URING) {
        while (e->cq_n && n < max) {
            out[n++] = e->cq[e->cq_head];
            e->cq_head = (e->cq_head + 1) % e->entries;
            e->cq_n--;
        }
        if (e->cq_n)
            avmm_efd_signal(e->efd); /* more than max: come back */
    } else {
        struct io_uring_cqe *cqe;
        unsigned head, seen = 0;
        int rearm = 0;
        io_uring_for_each_cqe(&e->ring, head, cqe)
        {
            if (n == max)
                break;
            uint64_t ud = io_uring_cqe_get_data64(cqe);
            if (ud & WATCH_BIT) {
                unsigned tag = (unsigned)(ud & 127);
                if (tag < 64)
                    e->woken |= 1ull << tag;
                if (!(cqe->flags & IORING_CQE_F_MORE)) { /* the kernel ended this multishot poll */
                    for (unsigned i = 0; i < e->nwatch; i++)
                        if (e->watch[i].tag == tag)
                            e->watch[i].rearm = 1;
                    rearm = 1;
                }
                seen++;
                continue;
            }
            out[n].user_data = ud;
            out[n].res = cqe->res;
            n++;
            seen++;
        }
        io_uring_cq_advance(&e->ring, seen);
        if (rearm) {
            /* Re-arm the watches whose poll the kernel ended (on overflow or an error). */
            for (unsigned i = 0; i < e->nwatch; i++)
                if (e->watch[i].rearm && arm_watch(e, e->watch[i].fd, e->watch[i].tag) == 0)
                    e->watch[i].rearm = 0;
            avmm_engine_flush(e);
        }
        /* A doorbell noted here but served later (the device may be reaping inside a
         * kick) must not be lost: keep the eventfd readable until it is taken. */
        if (!e->threaded && ((n == max && io_uring_cq_ready(&e->ring)) || e->woken))
            avmm_efd_signal(e->efd);
    }
    if (e->kind == AVMM_ENGINE_URING)
        depth_change(e, -(int)((unsigned)n < e->depth ? (unsigned)n : e->depth));
    e->inflight -= (unsigned)n;
    e->stats.reaps += (uint64_t)n;
    return n;
}

int avmm_engine_take(struct avmm_engine *e, struct avmm_io_op *out, int max)
{
    if (e->kind != AVMM_ENGINE_EXTERNAL || max < 0)
        return -EINVAL;
    int n = 0;
    while (e->xq_n && n < max) {
        out[n++] = e->xq[e->xq_head];
        e->xq_head = (e->xq_head + 1) % e->entries;
        e->xq_n--;
    }
    return n;
}

int avmm_engine_complete(struct avmm_engine *e, uint64_t user_data, int64_t res)
{
    if (e->kind != AVMM_ENGINE_EXTERNAL || e->cq_n >= e->entries)
        return -EINVAL;
    struct avmm_io_cqe *c = &e->cq[(e->cq_head + e->cq_n++) % e->entries];
    c->user_data = user_data;
    c->res = res;
    return 0;
}

void avmm_engine_drain(struct avmm_engine *e)
{
    if (e->kind == AVMM_ENGINE_EXTERNAL) {
        /* The taker's work cannot be waited for here: it stops touching the buffers
         * before the device is freed (the Python side cancels it first). */
        e->inflight = 0;
        e->sq_n = e->xq_n = e->cq_n = 0;
        return;
    }
    if (e->kind == AVMM_ENGINE_SYNC) {
        avmm_engine_submit(e);
        e->inflight -= e->cq_n;
        e->cq_n = 0;
        return;
    }
    if (!e->ring_ok)
        return;
    while (e->inflight) {
        /* Everything queued must be submitted, or the wait below never ends. */
        if (e->unsubmitted) {
            int n = submit_now(e);
            if (n < 0 && n != -EAGAIN && n != -EINTR && n != -EBUSY)
                break;
        }
        struct io_uring_cqe *cqe;
        if (io_uring_wait_cqe(&e->ring, &cqe) < 0)
            break;
        int watch = (io_uring_cqe_get_data64(cqe) & WATCH_BIT) != 0;
        io_uring_cqe_seen(&e->ring, cqe);
        if (!watch)
            e->inflight--;
    }
    if (e->depth > e->inflight)
        depth_change(e, (int)e->inflight - (int)e->depth);
}
