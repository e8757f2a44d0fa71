/* virtio-blk's data path: see blk.h. Request layout: virtio 1.2, 5.2.6. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <linux/virtio_blk.h>
#include <stdlib.h>
#include <string.h>

#include "blk.h"
#include "util.h"

#define SECTOR 512u
#define HDR_BYTES sizeof(struct virtio_blk_outhdr)
#define SEG_BYTES sizeof(struct virtio_blk_discard_write_zeroes)
#define REAP_BATCH 256
#define BUDGET 128 /* requests popped per call: the loop gets its turn between batches (blk.h) */
#define NO_SLOT UINT32_MAX

struct blk_req {
    uint32_t gen; /* its queue's generation when it was popped (a reset or set-up moves on) */
    uint16_t qi;
    uint16_t head;
    uint32_t type;
    uint8_t *status;
    uint32_t used_len; /* bytes written into the guest's buffers, status byte excluded */
    struct iovec *data;
    uint32_t ndata;
    uint32_t opcode; /* enum avmm_io_opcode, for a continued partial transfer */
    int32_t fd;
    int32_t rwflags;
    uint64_t off;
    uint64_t remaining; /* bytes left to transfer */
    uint32_t next_free;
    struct iovec *iov;
};

struct avmm_blk {
    struct avmm_blk_config cfg;
    const struct avmm_gmem *mem;
    struct avmm_engine *engine;
    uint32_t flags;
    uint32_t gen[AVMM_BLK_MAX_QUEUES]; /* per queue: a request of an older one completes into nothing */
    int needs_reset;
    uint32_t iov_cap;
    uint32_t nslots;
    uint32_t free_head;
    unsigned inflight;
    struct blk_req *slots;
    struct iovec *iov_pool;
    struct avmm_vq q[AVMM_BLK_MAX_QUEUES];
    uint8_t stalled[AVMM_BLK_MAX_QUEUES]; /* ran out of slots: served again on completion */
    uint8_t again[AVMM_BLK_MAX_QUEUES];   /* spent its budget: served again by avmm_blk_resume */
    int watching;                         /* io_uring watches the doorbells (avmm_blk_watch_kicks) */
    int doorbells_off_when_idle;          /* within avmm_blk_serve only: see blk.h */
    int doorbells_off;                    /* avmm_blk_doorbells_off ran, avmm_blk_doorbells_on not yet */
    struct avmm_io_cqe cqes[REAP_BATCH];
    struct avmm_blk_stats stats;
};

struct avmm_blk *avmm_blk_new(const struct avmm_blk_config *cfg, const struct avmm_gmem *mem,
                              struct avmm_engine *engine)
{
    if (!cfg->nqueues || cfg->nqueues > AVMM_BLK_MAX_QUEUES || !cfg->queue_size_max || !cfg->seg_max) {
        errno = EINVAL;
        return NULL;
    }
    struct avmm_blk *b = calloc(1, sizeof(*b));
    if (!b)
        return NULL;
    b->cfg = *cfg;
    b->mem = mem;
    b->engine = engine;
    b->flags = cfg->flags;
    /* header + seg_max data buffers + status, and slack for drivers that split them */
    b->iov_cap = cfg->seg_max + 8;
    if (b->iov_cap > AVMM_CHAIN_MAX_IOV)
        b->iov_cap = AVMM_CHAIN_MAX_IOV;
    /* A queue can have at most its size of chains outstanding. */
    b->nslots = (uint32_t)cfg->nqueues * cfg->queue_size_max;
    b->slots = calloc(b->nslots, sizeof(*b->slots));
    b->iov_pool = calloc((size_t)b->nslots * b->iov_cap, sizeof(struct iovec));
    if (!b->slots || !b->iov_pool) {
        avmm_blk_free(b);
        errno = ENOMEM;
        return NULL;
    }
    for (uint32_t i = 0; i < b->nslots; i++) {
        b->slots[i].iov = &b->iov_pool[(size_t)i * b->iov_cap];
        b->slots[i].next_free = i + 1 < b->nslots ? i + 1 : NO_SLOT;
    }
    b->free_head = 0;
    for (int i = 0; i < AVMM_BLK_MAX_QUEUES; i++)
        b->q[i].kick_fd = -1;
    return b;
}

void avmm_blk_free(struct avmm_blk *b)
{
    if (!b)
        return;
    if (b->engine && b->inflight) {
        /* Guest RAM must outlive the I/O that points into it. */
        avmm_engine_drain(b->engine);
        b->inflight = 0;
    }
    free(b->slots);
    free(b->iov_pool);
    free(b);
}

void avmm_blk_set_flags(struct avmm_blk *b, uint32_t flags)
{
    b->flags = (flags & ~AVMM_BLK_RO) | (b->cfg.flags & AVMM_BLK_RO);
}

int avmm_blk_queue_setup(struct avmm_blk *b, int qi, uint16_t size, uint64_t desc, uint64_t avail, uint64_t used,
                         uint32_t vq_flags, struct avmm_irq *irq, int kick_fd)
{
    if (qi < 0 || qi >= b->cfg.nqueues || size > b->cfg.queue_size_max)
        return -EINVAL;
    int r = avmm_vq_setup(&b->q[qi], b->mem, size, desc, avail, used, vq_flags, irq, kick_fd);
    b->q[qi].index = (uint16_t)qi;
    b->gen[qi]++; /* the old ring's requests still in flight must not land in this one */
    return r;
}

void avmm_blk_reset(struct avmm_blk *b)
{
    b->needs_reset = 0;
    b->watching = 0; /* the watches stay armed in the engine; woken queues of size 0 are skipped */
    b->doorbells_off = 0; /* the queues' rings are forgotten with them */
    for (int i = 0; i < AVMM_BLK_MAX_QUEUES; i++) {
        memset(&b->q[i], 0, sizeof(b->q[i]));
        b->q[i].kick_fd = -1;
        b->gen[i]++;
        b->stalled[i] = 0;
        b->again[i] = 0;
    }
}

/* Read by the loop while a device thread serves (quiesced(), a breakdown): atomic loads. */
unsigned avmm_blk_inflight(const struct avmm_blk *b) { return __atomic_load_n(&b->inflight, __ATOMIC_ACQUIRE); }
int avmm_blk_needs_reset(const struct avmm_blk *b) { return __atomic_load_n(&b->needs_reset, __ATOMIC_ACQUIRE); }
struct avmm_blk_stats *avmm_blk_stats(struct avmm_blk *b) { return &b->stats; }

struct avmm_vq *avmm_blk_queue(struct avmm_blk *b, int qi)
{
    return qi >= 0 && qi < AVMM_BLK_MAX_QUEUES ? &b->q[qi] : NULL;
}

/* ---- requests ----------------------------------------------------------------------- */

static struct blk_req *slot_get(struct avmm_blk *b)
{
    if (b->free_head == NO_SLOT)
        return NULL;
    struct blk_req *r = &b->slots[b->free_head];
    b->free_head = r->next_free;
    return r;
}

static void slot_put(struct avmm_blk *b, struct blk_req *r)
{
    r->next_free = b->free_head;
    b->free_head = (uint32_t)(r - b->slots);
}

/* Answer a request: its status byte, then its used entry. */
static void finish(struct avmm_blk *b, struct blk_req *r, uint8_t status)
{
    if (r->gen == b->gen[r->qi]) {
        struct avmm_vq *q = &b->q[r->qi];
        uint32_t len = r->used_len;
        if (r->status) {
            *r->status = status;
            len += 1;
            avmm_gmem_mark_iov(b->mem, &(struct iovec){r->status, 1}, 1, 0, 1); /* written now, not at the pop */
        }
        if (q->size)
            avmm_vq_push(q, r->head, len);
    }
    slot_put(b, r);
}

/* Drop `skip` bytes from the front of an iovec array, in place. */
static void iov_advance(struct iovec **iov, uint32_t *n, uint64_t skip)
{
    while (*n && skip) {
        if ((*iov)->iov_len <= skip) {
            skip -= (*iov)->iov_len;
            (*iov)++;
            (*n)--;
        } else {
            (*iov)->iov_base = (uint8_t *)(*iov)->iov_base + skip;
            (*iov)->iov_len -= skip;
            skip = 0;
        }
    }
}

static int aligned(const struct iovec *iov, uint32_t n, uint64_t off, uint32_t align)
{
    if (!align)
        return 1;
    uint64_t mask = align - 1;
    if (off & mask)
        return 0;
    for (uint32_t i = 0; i < n; i++)
        if (((uintptr_t)iov[i].iov_base | iov[i].iov_len) & mask)
            return 0;
    return 1;
}

static void queue_op(struct avmm_blk *b, struct blk_req *r, const struct avmm_io_op *op)
{
    int e = avmm_engine_queue(b->engine, op);
    if (e == -EBUSY) {
        avmm_engine_flush(b->engine);
        e = avmm_engine_queue(b->engine, op);
    }
    if (e < 0) {
        b->stats.host_errors++;
        finish(b, r, VIRTIO_BLK_S_IOERR);
        return;
    }
    __atomic_store_n(&b->inflight, b->inflight + 1, __ATOMIC_RELEASE); /* one writer: the owner */
}

static void start_transfer(struct avmm_blk *b, struct blk_req *r)
{
    struct avmm_io_op op = {
        .opcode = r->opcode,
        .fd = r->fd,
        .iov = r->data,
        .niov = r->ndata,
        .flags = r->rwflags,
        .off = r->off,
        .user_data = (uint64_t)(r - b->slots),
    };
    queue_op(b, r, &op);
}

/* A write to a disk probed raw: would it give the first or the last sector another
 * format's magic? Only requests that touch either sector are read. */
static int changes_format(struct avmm_blk *b, struct blk_req *r, uint64_t sector, uint64_t len)
{
    uint64_t nsec = len / SECTOR, last = b->cfg.capacity - 1;
    if (!b->cfg.nmagics || !nsec || (sector != 0 && last - sector >= nsec))
        return 0;
    uint8_t buf[SECTOR];
    for (uint32_t i = 0; i < b->cfg.nmagics && i < AVMM_BLK_MAX_MAGICS; i++) {
        const struct avmm_blk_magic *m = &b->cfg.magics[i];
        uint64_t at = m->tail ? last : 0;
        if (at < sector || at - sector >= nsec || (size_t)m->offset + m->len > SECTOR)
            continue;
        if (avmm_iov_to_buf(r->data, r->ndata, (at - sector) * SECTOR, buf, SECTOR) == SECTOR &&
            !memcmp(buf + m->offset, m->bytes, m->len))
            return 1;
    }
    return 0;
}

/* IN/OUT: data buffers, sector range, alignment, then one readv/writev. */
static void start_rw(struct avmm_blk *b, struct blk_req *r, uint64_t sector, int write, struct avmm_chain *c)
{
    uint64_t len;
    if (write) {
        r->data = r->iov;
        r->ndata = c->nout;
        iov_advance(&r->data, &r->ndata, HDR_BYTES);
        len = c->out_len - HDR_BYTES;
    } else {
        r->data = &r->iov[c->nout];
        r->ndata = c->nin;
        len = c->in_len - 1;
        struct iovec *last = &r->data[r->ndata - 1];
        if (--last->iov_len == 0)
            r->ndata--;
    }
    if (write && (b->flags & AVMM_BLK_RO)) {
        b->stats.ro_writes++;
        finish(b, r, VIRTIO_BLK_S_IOERR);
        return;
    }
    if (len % SECTOR || r->ndata > b->cfg.seg_max) {
        b->stats.bad_requests++;
        finish(b, r, VIRTIO_BLK_S_IOERR);
        return;
    }
    if (sector > b->cfg.capacity || len / SECTOR > b->cfg.capacity - sector) {
        b->stats.out_of_range++;
        finish(b, r, VIRTIO_BLK_S_IOERR);
        return;
    }
    if (write && b->cfg.nmagics && changes_format(b, r, sector, len)) {
        if (b->cfg.format_writes)
            (*b->cfg.format_writes)++;
        finish(b, r, VIRTIO_BLK_S_IOERR);
        return;
    }
    if (len == 0) {
        finish(b, r, VIRTIO_BLK_S_OK);
        return;
    }
    r->opcode = write ? AVMM_IO_WRITEV : AVMM_IO_READV;
    r->off = sector * SECTOR;
    r->remaining = len;
    r->fd = b->cfg.fd;
    r->rwflags = write && (b->flags & AVMM_BLK_WRITETHROUGH) ? RWF_DSYNC : 0;
    if (!aligned(r->data, r->ndata, r->off, b->cfg.dio_align) && b->cfg.fd_buffered >= 0) {
        r->fd = b->cfg.fd_buffered;
        b->stats.bounced++;
        if (write)
            r->rwflags = RWF_DSYNC; /* the O_DIRECT fd's writes are not cached: neither are these */
    }
    if (write) {
        b->stats.writes++;
        b->stats.bytes_written += len;
    } else {
        b->stats.reads++;
        b->stats.bytes_read += len;
        r->used_len = (uint32_t)len;
    }
    start_transfer(b, r);
}

/* DISCARD / WRITE_ZEROES: one segment (max_discard_seg = max_write_zeroes_seg = 1). */
static void start_zeroing(struct avmm_blk *b, struct blk_req *r, uint32_t type, struct avmm_chain *c)
{
    struct virtio_blk_discard_write_zeroes seg;
    uint64_t seg_bytes = c->out_len - HDR_BYTES;
    int discard = type == VIRTIO_BLK_T_DISCARD;
    if (discard)
        b->stats.discards++;
    else
        b->stats.write_zeroes++;
    if (seg_bytes != SEG_BYTES || avmm_iov_to_buf(r->iov, c->nout, HDR_BYTES, &seg, sizeof(seg)) != sizeof(seg)) {
        b->stats.bad_requests++;
        finish(b, r, VIRTIO_BLK_S_IOERR);
        return;
    }
    /* 5.2.6.2: unknown flag bits, or UNMAP on a discard, are UNSUPP. */
    uint32_t allowed = discard ? 0 : VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    if (seg.flags & ~allowed) {
        b->stats.unsupported++;
        finish(b, r, VIRTIO_BLK_S_UNSUPP);
        return;
    }
    if (b->flags & AVMM_BLK_RO) {
        b->stats.ro_writes++;
        finish(b, r, VIRTIO_BLK_S_IOERR);
        return;
    }
    uint32_t max = discard ? b->cfg.max_discard_sectors : b->cfg.max_write_zeroes_sectors;
    if (seg.sector > b->cfg.capacity || seg.num_sectors > b->cfg.capacity - seg.sector || seg.num_sectors > max) {
        b->stats.out_of_range++;
        finish(b, r, VIRTIO_BLK_S_IOERR);
        return;
    }
    if (!seg.num_sectors) {
        finish(b, r, VIRTIO_BLK_S_OK);
        return;
    }
    /* A discard may free the blocks (reads then return zeros on a raw image); writing
     * zeros keeps them allocated unless the driver allowed unmapping. */
    int mode = FALLOC_FL_KEEP_SIZE |
               (discard || (seg.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) ? FALLOC_FL_PUNCH_HOLE
                                                                            : FALLOC_FL_ZERO_RANGE);
    struct avmm_io_op op = {
        .opcode = AVMM_IO_FALLOCATE,
        .fd = b->cfg.fd_buffered >= 0 ? b->cfg.fd_buffered : b->cfg.fd,
        .flags = mode,
        .off = seg.sector * SECTOR,
        .len = (uint64_t)seg.num_sectors * SECTOR,
        .user_data = (uint64_t)(r - b->slots),
    };
    r->opcode = AVMM_IO_FALLOCATE;
    r->remaining = 0;
    queue_op(b, r, &op);
}

static void start_request(struct avmm_blk *b, struct blk_req *r, struct avmm_chain *c)
{
    struct virtio_blk_outhdr hdr;
    r->status = c->last_in;
    r->used_len = 0;
    /* No status byte, no header, or unusable buffers: fail it the best we can. */
    if (c->err || !c->nin || c->out_len < HDR_BYTES ||
        avmm_iov_to_buf(r->iov, c->nout, 0, &hdr, sizeof(hdr)) != sizeof(hdr)) {
        b->stats.bad_requests++;
        finish(b, r, VIRTIO_BLK_S_IOERR);
        return;
    }
    r->type = hdr.type;
    switch (hdr.type) {
    case VIRTIO_BLK_T_IN:
    case VIRTIO_BLK_T_OUT:
        start_rw(b, r, hdr.sector, hdr.type == VIRTIO_BLK_T_OUT, c);
        return;
    case VIRTIO_BLK_T_FLUSH: {
        b->stats.flushes++;
        struct avmm_io_op op = {
            .opcode = AVMM_IO_FSYNC,
            .fd = b->cfg.fd,
            .user_data = (uint64_t)(r - b->slots),
        };
        r->opcode = AVMM_IO_FSYNC;
        r->remaining = 0;
        queue_op(b, r, &op);
        return;
    }
    case VIRTIO_BLK_T_GET_ID: {
        b->stats.get_ids++;
        /* The serial, NUL-padded; as much of it as the buffer holds. */
        size_t room = c->in_len - 1 < AVMM_BLK_ID_BYTES ? c->in_len - 1 : AVMM_BLK_ID_BYTES;
        r->used_len = (uint32_t)avmm_buf_to_iov(&r->iov[c->nout], c->nin, 0, b->cfg.serial, room);
        avmm_chain_mark_written(b->mem, c, r->used_len);
        finish(b, r, VIRTIO_BLK_S_OK);
        return;
    }
    case VIRTIO_BLK_T_DISCARD:
    case VIRTIO_BLK_T_WRITE_ZEROES:
        start_zeroing(b, r, hdr.type, c);
        return;
    default:
        b->stats.unsupported++;
        finish(b, r, VIRTIO_BLK_S_UNSUPP);
        return;
    }
}

/* Pop and start up to `budget` of queue qi's requests, one submit for them: requests
 * started, -1 if the ring broke. Marks the queue stalled (out of slots) or again (budget
 * spent). Completes nothing: kick and complete never call each other, so a guest that
 * keeps the ring full cannot grow the stack. */
static int serve_queue(struct avmm_blk *b, int qi, int budget)
{
    struct avmm_vq *q = &b->q[qi];
    int popped = 0, got = 0;
    b->stalled[qi] = 0;
    b->again[qi] = 0;
    for (;;) {
        while (popped < budget) {
            struct blk_req *r = slot_get(b);
            if (!r) {
                b->stalled[qi] = 1;
                goto out;
            }
            struct avmm_chain c = {.iov = r->iov, .iov_cap = b->iov_cap};
            got = avmm_vq_pop(q, b->mem, &c);
            if (got <= 0) {
                slot_put(b, r);
                break;
            }
            r->gen = b->gen[qi];
            r->qi = (uint16_t)qi;
            r->head = c.head;
            popped++;
            start_request(b, r, &c);
        }
        if (got < 0) {
            __atomic_store_n(&b->needs_reset, 1, __ATOMIC_RELEASE);
            goto out;
        }
        if (popped >= budget) {
            b->again[qi] = 1;
            goto out;
        }
        if (!avmm_vq_enable_notify(q))
            goto out;
    }
out:
    if (popped) {
        b->stats.batches++;
        avmm_engine_submit(b->engine);
    }
    avmm_vq_publish(q);
    return q->broken ? -1 : popped;
}

static int complete_batch(struct avmm_blk *b);

int avmm_blk_kick(struct avmm_blk *b, int qi)
{
    if (qi < 0 || qi >= b->cfg.nqueues || !b->q[qi].size)
        return 0;
    avmm_vq_drain_kick(&b->q[qi]);
    int total = 0;
    for (;;) {
        int n = serve_queue(b, qi, BUDGET - total);
        if (n < 0)
            return -1;
        total += n;
        /* Reads the page cache holds (and errors) complete inside the submit: answer them
         * now, not one trip around the loop later through the engine's eventfd; their
         * slots then serve what is left in the ring. */
        if (!n || !avmm_engine_ready(b->engine))
            break;
        complete_batch(b);
        if (!b->stalled[qi])
            break;
        if (total >= BUDGET) {
            b->again[qi] = 1;
            break;
        }
    }
    return total;
}

int avmm_blk_again(const struct avmm_blk *b)
{
    for (int i = 0; i < b->cfg.nqueues; i++)
        if (b->again[i])
            return 1;
    return 0;
}

/* Kick the queues in `queues` and those a budget left work in: the requests taken, or -1. */
static int kick_queues(struct avmm_blk *b, uint64_t queues)
{
    int total = 0;
    for (int qi = 0; qi < b->cfg.nqueues && qi < 64; qi++) {
        if (!(queues & (1ull << qi)) && !b->again[qi])
            continue;
        int n = avmm_blk_kick(b, qi);
        if (n < 0)
            return -1;
        total += n;
    }
    return total;
}

int avmm_blk_resume(struct avmm_blk *b)
{
    return kick_queues(b, 0);
}

static void complete_one(struct avmm_blk *b, const struct avmm_io_cqe *cqe)
{
    if (cqe->user_data >= b->nslots)
        return;
    struct blk_req *r = &b->slots[cqe->user_data];
    __atomic_store_n(&b->inflight, b->inflight - 1, __ATOMIC_RELEASE);
    if (r->opcode == AVMM_IO_READV) {
        /* The engine wrote guest RAM after the pop (the kernel, or a backend's coroutines):
         * mark what it wrote now; a failed read may have written any of it. */
        uint64_t written = cqe->res < 0 || (uint64_t)cqe->res > r->remaining ? r->remaining : (uint64_t)cqe->res;
        avmm_gmem_mark_iov(b->mem, r->data, r->ndata, 0, written);
    }
    if (cqe->res < 0) {
        b->stats.host_errors++;
        finish(b, r, VIRTIO_BLK_S_IOERR);
        return;
    }
    if (r->opcode == AVMM_IO_READV || r->opcode == AVMM_IO_WRITEV) {
        uint64_t done = (uint64_t)cqe->res;
        if (done < r->remaining) {
            if (done == 0 || r->gen != b->gen[r->qi]) { /* no progress (EOF): an error, not a loop */
                b->stats.host_errors++;
                finish(b, r, VIRTIO_BLK_S_IOERR);
                return;
            }
            b->stats.short_retries++;
            iov_advance(&r->data, &r->ndata, done);
            r->off += done;
            r->remaining -= done;
            start_transfer(b, r);
            return;
        }
    }
    finish(b, r, VIRTIO_BLK_S_OK);
}

/* Reap and finish what the engine completed: requests finished. */
static int complete_batch(struct avmm_blk *b)
{
    int total = 0, n;
    do {
        n = avmm_engine_reap(b->engine, b->cqes, REAP_BATCH);
        for (int i = 0; i < n; i++)
            complete_one(b, &b->cqes[i]);
        total += n;
    } while (n == REAP_BATCH && total < (int)b->nslots);
    if (!total)
        return 0;
    b->stats.completion_batches++;
    avmm_engine_submit(b->engine); /* continued partial transfers */
    /* The driver that sees these used entries may publish its next request at once: off
     * before, not after, or its doorbell is already rung when the poll starts. */
    if (b->doorbells_off_when_idle && !b->inflight)
        avmm_blk_doorbells_off(b);
    for (int i = 0; i < b->cfg.nqueues; i++)
        avmm_vq_publish(&b->q[i]);
    return total;
}

/* Doorbells io_uring saw (avmm_blk_watch_kicks): serve those queues. */
static int serve_woken(struct avmm_blk *b)
{
    int total = 0;
    uint64_t woken;
    /* Serving a queue reaps, which may note more doorbells: until none is left. */
    while ((woken = avmm_engine_woken(b->engine))) {
        for (int qi = 0; qi < b->cfg.nqueues && qi < 64; qi++) {
            if (!(woken & (1ull << qi)))
                continue;
            int n = avmm_blk_kick(b, qi);
            if (n < 0)
                return -1;
            total += n;
        }
    }
    return total;
}

int avmm_blk_complete(struct avmm_blk *b)
{
    int total = complete_batch(b), broken = 0;
    if (!b->watching) {
        avmm_engine_woken(b->engine); /* watches a device thread armed before a reset: the loop's readers have those doorbells */
    } else {
        int k = serve_woken(b);
        if (k < 0)
            return -1;
        if (!total)
            return k;
    }
    if (!total)
        return 0;
    for (int i = 0; i < b->cfg.nqueues; i++)
        if (b->stalled[i] && b->q[i].size && serve_queue(b, i, BUDGET) < 0)
            broken = 1;
    return broken ? -1 : total;
}

int avmm_blk_watch_kicks(struct avmm_blk *b)
{
    for (int qi = 0; qi < b->cfg.nqueues && qi < 64; qi++) {
        if (!b->q[qi].size || b->q[qi].kick_fd < 0)
            continue;
        int r = avmm_engine_watch(b->engine, b->q[qi].kick_fd, (unsigned)qi);
        if (r < 0)
            return r;
    }
    b->watching = 1;
    return 0;
}

int avmm_blk_serve(struct avmm_blk *b, uint64_t queues, int doorbells_off_when_idle)
{
    /* For this call only: the loop, which may serve the device after the thread (a reset
     * to INTx), never turns doorbells off, since nothing of it would turn them on again. */
    b->doorbells_off_when_idle = doorbells_off_when_idle;
    int done = avmm_blk_complete(b);
    int kicked = done < 0 ? -1 : kick_queues(b, queues);
    b->doorbells_off_when_idle = 0;
    return kicked < 0 ? -1 : done + kicked;
}

uint64_t avmm_blk_pending(const struct avmm_blk *b)
{
    uint64_t mask = 0;
    for (int qi = 0; qi < b->cfg.nqueues && qi < 64; qi++) {
        const struct avmm_vq *q = &b->q[qi];
        if (q->size && !q->broken && avmm_vq_pending(q))
            mask |= 1ull << qi;
    }
    return mask;
}

void avmm_blk_doorbells_off(struct avmm_blk *b)
{
    for (int qi = 0; qi < b->cfg.nqueues; qi++)
        avmm_vq_disable_notify(&b->q[qi]);
    b->doorbells_off = 1;
}

uint64_t avmm_blk_doorbells_on(struct avmm_blk *b)
{
    if (!b->doorbells_off)
        return 0; /* on since serve_queue's enable and its re-check */
    b->doorbells_off = 0;
    uint64_t mask = 0;
    for (int qi = 0; qi < b->cfg.nqueues && qi < 64; qi++) {
        struct avmm_vq *q = &b->q[qi];
        if (q->size && !q->broken && avmm_vq_enable_notify(q))
            mask |= 1ull << qi;
    }
    return mask;
}

uint64_t avmm_blk_format_writes(const struct avmm_blk *b)
{
    return b->cfg.format_writes ? __atomic_load_n(b->cfg.format_writes, __ATOMIC_RELAXED) : 0;
}

int avmm_blk_wait(struct avmm_blk *b, uint64_t max_ns)
{
    int r = avmm_engine_wait(b->engine, max_ns);
    if (r <= 0)
        return 0; /* a timeout (an error of the wait itself counts as one) */
    return avmm_blk_complete(b);
}

int avmm_blk_poll(struct avmm_blk *b, uint64_t max_ns)
{
    uint64_t deadline = avmm_now_ns() + max_ns;
    do {
        for (int spin = 0; spin < 16; spin++) {
            if (avmm_engine_ready(b->engine))
                return avmm_blk_complete(b);
            for (int i = 0; i < b->cfg.nqueues; i++) {
                struct avmm_vq *q = &b->q[i];
                if (q->size && !q->broken && avmm_vq_pending(q))
                    return avmm_blk_kick(b, i);
            }
            __builtin_ia32_pause();
        }
    } while (avmm_now_ns() < deadline);
    return 0;
}
