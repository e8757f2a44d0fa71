/*
 * Storage engines: where a device's reads, writes, flushes and fallocates go.
 *
 * One interface, two engines, so every device test runs against both and a bug in one
 * shows (kvmtool disk/, Firecracker's FileEngine):
 *   URING  io_uring: ops are queued as SQEs, one io_uring_enter per batch; completions
 *          signal the engine's eventfd (a reader on the loop).
 *   SYNC   the same ops done with preadv2/pwritev2/fdatasync/fallocate at submit time;
 *          their completions are queued and the eventfd signalled, so the device's
 *          completion path is the same code.
 *   EXTERNAL the ops are done by someone else (Python coroutines: a block backend
 *          object, devices/virtio/block/backend.py): submit hands the batch over
 *          (avmm_engine_take), and its results come back with avmm_engine_complete,
 *          then reaped as the others' are (the taker calls the reap itself).
 * The engine never touches the buffers' contents: iovecs point into guest memory.
 * Thread ownership: the loop's thread, or the device's own thread (avmm_engine_set_threaded).
 */
#ifndef AVMM_IOENGINE_H
#define AVMM_IOENGINE_H

#include <stdint.h>
#include <sys/uio.h>

enum avmm_engine_kind {
    AVMM_ENGINE_URING = 1,
    AVMM_ENGINE_SYNC = 2,
    AVMM_ENGINE_EXTERNAL = 3,
};

enum avmm_io_opcode {
    AVMM_IO_READV = 1,
    AVMM_IO_WRITEV = 2,
    AVMM_IO_FSYNC = 3,     /* fdatasync */
    AVMM_IO_FALLOCATE = 4, /* `flags` is the fallocate mode */
};

struct avmm_io_op {
    uint32_t opcode; /* enum avmm_io_opcode */
    int32_t fd;
    const struct iovec *iov;
    uint32_t niov;
    int32_t flags; /* RWF_* for readv/writev, the mode for fallocate */
    uint64_t off;
    uint64_t len; /* fallocate */
    uint64_t user_data;
};

struct avmm_io_cqe {
    uint64_t user_data;
    int64_t res; /* bytes, or -errno */
};

struct avmm_engine_stats {
    uint64_t ops;       /* ops queued */
    uint64_t submits;   /* submit calls that had ops (one io_uring_enter each) */
    uint64_t reaps;     /* completions reaped */
    uint64_t reap_calls;
    /* io_uring: the integral over time of the requests submitted and not yet reaped (ns ×
     * requests); its growth over a span, divided by the span, is the mean depth the disk had. */
    uint64_t depth_ns;
};

struct avmm_engine;

/* entries: the most ops in flight. NULL on failure (errno set). */
struct avmm_engine *avmm_engine_new(int kind, unsigned entries);
void avmm_engine_free(struct avmm_engine *e);
/* The eventfd signalled when completions are ready. */
int avmm_engine_fd(const struct avmm_engine *e);
/* Queue one op: 0, or -EBUSY when the submission queue is full (submit, then retry). */
int avmm_engine_queue(struct avmm_engine *e, const struct avmm_io_op *op);
/* Start everything queued: ops submitted, or -errno. On a threaded engine the syscall waits
 * for the thread's next avmm_engine_wait (submit and wait in one io_uring_enter);
 * avmm_engine_flush submits now whatever the mode. */
int avmm_engine_submit(struct avmm_engine *e);
int avmm_engine_flush(struct avmm_engine *e);
/* io_uring only: a device thread of its own owns the engine from now on (on = 1): no
 * eventfd (the thread waits in io_uring itself, avmm_engine_wait), submits deferred to that
 * wait. on = 0: back to the loop's eventfd. 0 or -errno. Only while no thread runs it. */
int avmm_engine_set_threaded(struct avmm_engine *e, int on);
/* Take up to max completions (resets the eventfd first). */
int avmm_engine_reap(struct avmm_engine *e, struct avmm_io_cqe *out, int max);
/* Completions waiting to be reaped (a cheap check: no syscall). */
unsigned avmm_engine_ready(struct avmm_engine *e);
/* Wait until nothing is in flight (teardown: buffers in guest RAM must outlive the I/O). */
void avmm_engine_drain(struct avmm_engine *e);
struct avmm_engine_stats *avmm_engine_stats(struct avmm_engine *e);

/* EXTERNAL: the ops submitted since the last call (up to max, in order): their iovecs stay
 * valid until each is completed. Then each op's result (bytes, or -errno): 0, or -EINVAL
 * (not an EXTERNAL engine, or no room). */
int avmm_engine_take(struct avmm_engine *e, struct avmm_io_op *out, int max);
int avmm_engine_complete(struct avmm_engine *e, uint64_t user_data, int64_t res);

/* One wait for doorbells and completions (io_uring only), as QEMU's fdmon-io_uring:
 * io_uring watches `fd` (multishot POLL_ADD) beside the I/O, so its readiness is a CQE:
 * it signals the engine's eventfd like a completion, and it ends avmm_engine_wait.
 * avmm_engine_reap() keeps such CQEs out of `out` and notes their tag (< 64) for
 * avmm_engine_woken(), which returns the tags seen since the last call and clears them.
 * avmm_engine_wait() submits what is queued and sleeps in io_uring until a CQE is there
 * or max_ns passed: 1 when there is one, 0 on timeout, -errno. */
#define AVMM_ENGINE_MAX_WATCH 65
#define AVMM_ENGINE_TAG_WAKE 64 /* a watch whose CQE only ends a wait (a device thread's control eventfd) */
#define AVMM_ENGINE_FOREVER UINT64_MAX /* avmm_engine_wait's max_ns: no timeout */
int avmm_engine_watch(struct avmm_engine *e, int fd, unsigned tag);
uint64_t avmm_engine_woken(struct avmm_engine *e);
int avmm_engine_wait(struct avmm_engine *e, uint64_t max_ns);

#endif
