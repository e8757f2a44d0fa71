/*
 * virtio-blk's data path (virtio 1.2, 5.2.6): requests from the queues to an I/O engine
 * and back, with no Python per request.
 *
 *   avmm_blk_kick(q)     the queue's ioeventfd fired: pop every chain, turn each request
 *                        into engine ops, one submit for the batch
 *   avmm_blk_complete()  the engine's eventfd fired: reap every completion, write status
 *                        bytes and used entries, one interrupt per queue per batch
 *
 * A request the guest got wrong (a bad buffer, a sector past the end, an unknown type, a
 * write to a read-only disk) gets the status the spec says and is counted; a ring that
 * breaks the rules makes the device ask for a reset (a kick or completion returns < 0; avmm_blk_needs_reset). Data reaches
 * the image through the engine only: a completed write is in the host's page cache (or on
 * the device with `direct`), a completed FLUSH on stable storage.
 *
 * Thread ownership: the loop's thread, or the device's own thread while it runs
 * (blk_thread.h): then the loop reads only avmm_blk_inflight, avmm_blk_needs_reset and the
 * counters, and parks the thread for anything else.
 */
#ifndef AVMM_BLK_H
#define AVMM_BLK_H

#include <stdint.h>

#include "ioengine.h"
#include "virtq.h"

#define AVMM_BLK_MAX_QUEUES 64
#define AVMM_BLK_ID_BYTES 20 /* VIRTIO_BLK_ID_BYTES */

enum avmm_blk_flags {
    AVMM_BLK_RO = 1,           /* VIRTIO_BLK_F_RO: writes fail */
    AVMM_BLK_WRITETHROUGH = 2, /* FLUSH not negotiated: every write is durable (RWF_DSYNC) */
};

#define AVMM_BLK_MAX_MAGICS 16
#define AVMM_BLK_MAGIC_BYTES 48

/* Another image format's magic: `len` bytes at `offset` in the disk's first sector, or with
 * `tail` in its last one (formats.py's table). */
struct avmm_blk_magic {
    uint16_t offset;
    uint8_t tail;
    uint8_t len;
    uint8_t bytes[AVMM_BLK_MAGIC_BYTES];
};

struct avmm_blk_config {
    int32_t fd;          /* the image (O_DIRECT with `direct`) */
    int32_t fd_buffered; /* the same image without O_DIRECT, for unaligned buffers; or -1 */
    uint32_t dio_align;  /* with O_DIRECT: the alignment buffers and offsets need; else 0 */
    uint32_t flags;      /* enum avmm_blk_flags */
    uint64_t capacity;   /* 512-byte sectors */
    uint32_t seg_max;    /* data buffers per request (config seg_max) */
    uint32_t max_discard_sectors;
    uint32_t max_write_zeroes_sectors;
    uint16_t nqueues;
    uint16_t queue_size_max;
    uint8_t serial[AVMM_BLK_ID_BYTES];
    /* A disk probed raw: writes that would put one of these magics in place fail (the next
     * probe would call it another format), counted in *format_writes. nmagics 0: none. */
    uint32_t nmagics;
    struct avmm_blk_magic magics[AVMM_BLK_MAX_MAGICS];
    uint64_t *format_writes;
};

struct avmm_blk_stats {
    uint64_t reads, writes, flushes, get_ids, discards, write_zeroes;
    uint64_t bytes_read, bytes_written;
    uint64_t unsupported;   /* unknown request types or flags: VIRTIO_BLK_S_UNSUPP */
    uint64_t bad_requests;  /* malformed: no header, no status byte, bad buffers, misaligned */
    uint64_t out_of_range;  /* sectors past the end of the disk */
    uint64_t ro_writes;     /* writes to a read-only disk */
    uint64_t host_errors;   /* the host's I/O failed: VIRTIO_BLK_S_IOERR */
    uint64_t short_retries; /* partial transfers continued */
    uint64_t bounced;       /* unaligned requests on a `direct` disk served through the page cache */
    uint64_t batches;       /* kicks that submitted something */
    uint64_t completion_batches;
};

struct avmm_blk;

struct avmm_blk *avmm_blk_new(const struct avmm_blk_config *cfg, const struct avmm_gmem *mem,
                              struct avmm_engine *engine);
/* Waits for in-flight I/O, then frees (the engine is the caller's). */
void avmm_blk_free(struct avmm_blk *b);
/* Driver features that change the data path (enum avmm_blk_flags bits; RO stays). */
void avmm_blk_set_flags(struct avmm_blk *b, uint32_t flags);
/* Configure queue qi (avmm_vq_setup's arguments); 0 or -errno. */
int avmm_blk_queue_setup(struct avmm_blk *b, int qi, uint16_t size, uint64_t desc, uint64_t avail, uint64_t used,
                         uint32_t vq_flags, struct avmm_irq *irq, int kick_fd);
/* Serve queue qi's available requests, at most a budget of them: requests started, or -1
 * if the ring is broken. A queue that spent its budget is left for avmm_blk_resume, so a
 * guest that keeps posting cannot keep the loop's thread to itself. */
int avmm_blk_kick(struct avmm_blk *b, int qi);
/* Finish completed I/O, and serve queues that waited for the slots it frees: requests
 * completed, or -1 if a ring broke. */
int avmm_blk_complete(struct avmm_blk *b);
/* 1 if some queue spent its budget with requests maybe left: call avmm_blk_resume soon. */
int avmm_blk_again(const struct avmm_blk *b);
/* Serve those queues (a budget each): requests started, or -1 if a ring broke. */
int avmm_blk_resume(struct avmm_blk *b);
/* Busy-poll up to max_ns for work — completions, or buffers on an active queue — and
 * serve the first that comes: requests handled, 0 if nothing came, -1 if a ring broke.
 * (QEMU's iothreads poll the same way: a wake-up through an eventfd costs more than
 * the microseconds a busy device takes to come back.) */
int avmm_blk_poll(struct avmm_blk *b, uint64_t max_ns);
/* One wait for the doorbells and the completions: io_uring watches every set-up queue's
 * kick_fd (call after the queues are set up; the loop then needs no reader on them: a
 * doorbell is a CQE, which signals avmm_engine_fd like a completion, and
 * avmm_blk_complete serves both). avmm_blk_wait sleeps in io_uring up to max_ns for
 * either and serves what came: requests served, 0 on timeout, -1 broken ring. */
int avmm_blk_watch_kicks(struct avmm_blk *b);
int avmm_blk_wait(struct avmm_blk *b, uint64_t max_ns);
/* A device thread's turn (blk_thread.c): completions, the doorbells io_uring saw, the
 * queues in `queues` (a bit per queue, found pending by polling), and a budget for each
 * queue that spent its last one: requests served, -1 if a ring broke.
 * doorbells_off_when_idle: the thread polls next, so the completions that leave nothing in
 * flight turn the doorbells off before the driver sees them (avmm_blk_doorbells_off); the
 * thread then turns them on (avmm_blk_doorbells_on) before it sleeps or parks. */
int avmm_blk_serve(struct avmm_blk *b, uint64_t queues, int doorbells_off_when_idle);
/* Active queues with buffers available (a bit per queue): what a poll looks for. */
uint64_t avmm_blk_pending(const struct avmm_blk *b);
/* Doorbells off on every queue while a thread polls them (a doorbell then costs the driver
 * an exit and wakes the poller's task work for nothing), or on again before it sleeps:
 * then the queues that have buffers (the re-check after enabling: serve them, do not sleep).
 * On does nothing (0) unless off ran since the last on. */
void avmm_blk_doorbells_off(struct avmm_blk *b);
uint64_t avmm_blk_doorbells_on(struct avmm_blk *b);
/* Writes refused for another format's magic so far (cfg.format_writes; 0 without one). */
uint64_t avmm_blk_format_writes(const struct avmm_blk *b);
/* Device reset: forget the queues; I/O in flight completes into nothing. */
void avmm_blk_reset(struct avmm_blk *b);
unsigned avmm_blk_inflight(const struct avmm_blk *b);
/* The device asked for a reset (the fuzz targets check it against what they fed it). */
int avmm_blk_needs_reset(const struct avmm_blk *b);
struct avmm_blk_stats *avmm_blk_stats(struct avmm_blk *b);
struct avmm_vq *avmm_blk_queue(struct avmm_blk *b, int qi);

#endif
