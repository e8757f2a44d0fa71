/*
 * Guest memory, interrupt vectors and the split virtqueue, as the C data path sees them.
 *
 * Nothing here knows a device. A device (blk.c, net.c) pops chains of descriptors, turns
 * them into I/O, and pushes used entries; the queue decides when the driver must be
 * interrupted. Every guest address a descriptor names is translated through
 * avmm_gmem_ptr(), which refuses ranges that are not wholly inside one RAM region or that
 * wrap: a guest can make a request fail, never make the VMM touch memory outside the guest.
 *
 * Thread ownership: a queue belongs to the loop's thread (all calls come from it). The
 * driver side (a vCPU, or the test harness) writes the avail ring and reads the used ring
 * concurrently; the barriers are the ones the virtio spec asks for (2.7.13, 2.7.7.2).
 */
#ifndef AVMM_VIRTQ_H
#define AVMM_VIRTQ_H

#include <stdint.h>
#include <stddef.h>
#include <sys/uio.h>
#include <linux/virtio_ring.h>

/* ---- guest memory ------------------------------------------------------------------ */

#define AVMM_GMEM_MAX_REGIONS 8

struct avmm_gmem_region {
    uint64_t gpa;
    uint64_t size;
    uint8_t *hva;
    uint64_t *dirty; /* a bit per 4 KiB page the data path wrote (snapshots); NULL: not kept */
};

struct avmm_gmem {
    uint32_t nregions;
    struct avmm_gmem_region r[AVMM_GMEM_MAX_REGIONS];
};

/* The host address of guest [gpa, gpa+len), or NULL if that is not all guest RAM. */
static inline void *avmm_gmem_ptr(const struct avmm_gmem *m, uint64_t gpa, uint64_t len)
{
    if (len > UINT64_MAX - gpa)
        return NULL;
    for (uint32_t i = 0; i < m->nregions; i++) {
        const struct avmm_gmem_region *r = &m->r[i];
        if (gpa >= r->gpa && gpa - r->gpa <= r->size && len <= r->size - (gpa - r->gpa))
            return r->hva + (gpa - r->gpa);
    }
    return NULL;
}

/* Note [gpa, gpa+len) as written by the device, in its region's dirty bitmap if it has one
 * (a diff snapshot or a migration wants the pages written since its last pass: KVM's dirty
 * log sees only the vCPUs' writes). Atomic: a device thread may mark while the loop takes
 * the bitmap (avmm_gmem_take_dirty). */
static inline void avmm_gmem_mark(const struct avmm_gmem *m, uint64_t gpa, uint64_t len)
{
    for (uint32_t i = 0; i < m->nregions && len; i++) {
        const struct avmm_gmem_region *r = &m->r[i];
        if (!r->dirty || gpa < r->gpa || gpa - r->gpa >= r->size)
            continue;
        uint64_t first = (gpa - r->gpa) >> 12, last = (gpa - r->gpa + len - 1) >> 12;
        for (uint64_t p = first; p <= last && p < r->size >> 12; p++)
            __atomic_fetch_or(&r->dirty[p >> 6], 1ull << (p & 63), __ATOMIC_RELAXED);
        return;
    }
}

/* 1 while some region keeps a dirty bitmap (a diff snapshot's or a migration's log is on):
 * the one test a data path pays per batch when nothing is tracked. */
static inline int avmm_gmem_tracking(const struct avmm_gmem *m)
{
    for (uint32_t i = 0; i < m->nregions; i++)
        if (m->r[i].dirty)
            return 1;
    return 0;
}

/* Mark bytes [skip, skip+len) of `iov` (host addresses in guest RAM, as a chain's) written.
 * Called once the device has written them, never before: the write of a readv, of io_uring
 * or of a copy lands after the pop, and a migration's pass that took the bitmap in between
 * would otherwise have sent the page stale for good. Nothing to do unless tracking. */
void avmm_gmem_mark_iov(const struct avmm_gmem *m, const struct iovec *iov, uint32_t n, uint64_t skip, uint64_t len);

/* Move region i's dirty bitmap (`words` 64-bit words) into `out`, clearing it word by word
 * atomically: a mark made meanwhile is either in `out` or left for the next take. */
void avmm_gmem_take_dirty(const struct avmm_gmem *m, uint32_t i, uint64_t *out, uint64_t words);

/* ---- interrupt vectors -------------------------------------------------------------- */

/* One interrupt as the data path raises it: an eventfd (bound to a GSI with KVM_IRQFD, or
 * read by the test harness) — an MSI-X or MSI vector — or a level INTx line, asserted
 * through the function the transport set in `set_line` (KVM_IRQ_LINE on the VM fd: the
 * queue code knows no KVM). While the guest has it masked, raising only sets `pending`
 * (the PBA bit); its model delivers it on unmask. With `isr`, a queue's interrupt also
 * sets the virtio ISR's queue bit, which a driver on INTx (or one shared MSI) reads to
 * learn why. */
typedef int (*avmm_set_line_fn)(int32_t line_fd, uint32_t gsi, uint32_t level);

struct avmm_irq {
    int32_t efd;
    uint32_t masked;  /* atomic: the vector's or the function's mask bit */
    uint32_t pending; /* atomic: raised while masked */
    uint32_t unused;
    uint64_t raised;    /* interrupts sent */
    uint64_t held;      /* raises that found the vector masked */
    uint8_t *isr;       /* INTx or a shared MSI: the ISR status byte, bit 0 set on each raise */
    avmm_set_line_fn set_line; /* a level line: a raise asserts `gsi` with set_line(line_fd,
                                * gsi, 1) instead of writing efd (0 on success); NULL: an edge */
    int32_t line_fd;
    uint32_t gsi;
    uint32_t asserted;  /* INTx: the line is up (it goes down when the driver reads the ISR) */
};

void avmm_irq_raise(struct avmm_irq *v);

/* ---- the split virtqueue ------------------------------------------------------------ */

enum avmm_vq_flags {
    AVMM_VQ_EVENT_IDX = 1, /* VIRTIO_RING_F_EVENT_IDX negotiated */
    AVMM_VQ_INDIRECT = 2,  /* VIRTIO_RING_F_INDIRECT_DESC negotiated */
};

/* How a chain or a ring broke the rules (counted per queue). */
enum avmm_vq_error {
    AVMM_VQ_OK = 0,
    AVMM_VQ_E_HEAD_RANGE = 1,   /* avail ring names a head >= queue size: ring broken */
    AVMM_VQ_E_AVAIL_IDX = 2,    /* avail idx moved more than the queue size: ring broken */
    AVMM_VQ_E_NEXT_RANGE = 3,   /* a next index >= the table's size: ring broken */
    AVMM_VQ_E_LOOP = 4,         /* a chain longer than its table (it loops): ring broken */
    AVMM_VQ_E_INDIRECT = 5,     /* bad indirect table (nested, misaligned, outside RAM, empty) */
    AVMM_VQ_E_BUFFER = 6,       /* a buffer outside guest RAM or wrapping: the request fails */
    AVMM_VQ_E_ORDER = 7,        /* a device-readable buffer after a device-writable one */
    AVMM_VQ_E_TOO_MANY = 8,     /* more buffers than the device accepts: the request fails */
    AVMM_VQ_NR_ERRORS = 9,
};

struct avmm_vq_stats {
    uint64_t chains;       /* chains popped */
    uint64_t notifies;     /* kicks served (ioeventfd reads that found work or not) */
    uint64_t interrupts;   /* vectors raised */
    uint64_t suppressed;   /* interrupts the driver did not want (EVENT_IDX / NO_INTERRUPT) */
    uint64_t errors[AVMM_VQ_NR_ERRORS];
};

struct avmm_vq {
    /* configuration (avmm_vq_setup) */
    uint16_t size;
    uint16_t index;
    uint32_t flags; /* enum avmm_vq_flags */
    struct vring_desc *desc;
    struct vring_avail *avail;
    struct vring_used *used;
    struct avmm_irq *irq;
    int32_t kick_fd; /* the queue's ioeventfd (read to reset it), or -1 */
    /* state */
    uint16_t last_avail;     /* next avail ring slot to pop */
    uint16_t used_idx;       /* next used ring slot to fill (published at avmm_vq_publish) */
    uint16_t signalled_used; /* used idx when the driver was last interrupted */
    uint8_t signalled_valid;
    uint8_t broken; /* the ring broke the rules: the device must be reset */
    uint32_t unpublished; /* used entries written since the last publish */
    uint32_t last_error; /* enum avmm_vq_error of the last broken chain or ring */
    struct avmm_vq_stats stats;
};

/* A popped chain: iov[0, nout) are device-readable, iov[nout, nout+nin) device-writable
 * (zero-length buffers are dropped). `err` != 0: some buffer was unusable; `status` then
 * still points at the last writable byte if there is one (so the device can answer an
 * error), and the iovs are not to be used. */
#define AVMM_CHAIN_MAX_IOV 1024

struct avmm_chain {
    uint16_t head;
    uint16_t ndesc; /* descriptors walked */
    uint32_t nout, nin;
    uint64_t out_len, in_len;
    uint32_t err; /* enum avmm_vq_error, 0 if usable */
    uint8_t *last_in; /* last byte of the last device-writable buffer, or NULL */
    struct iovec *iov;
    uint32_t iov_cap; /* iov's capacity, set by the caller */
};

/* The device is done with chain `c`, whose used length is `len`: mark the first `len` bytes
 * of its device-writable buffers written (avmm_gmem_mark_iov). The pop marks nothing: a
 * buffer handed out is not yet written. */
static inline void avmm_chain_mark_written(const struct avmm_gmem *m, const struct avmm_chain *c, uint64_t len)
{
    if (len && avmm_gmem_tracking(m))
        avmm_gmem_mark_iov(m, &c->iov[c->nout], c->nin, 0, len);
}

/* 0, or -EINVAL (size not a power of two in 1..32768) / -EFAULT (a ring outside RAM). */
int avmm_vq_setup(struct avmm_vq *q, const struct avmm_gmem *m, uint16_t size, uint64_t desc_gpa,
                  uint64_t avail_gpa, uint64_t used_gpa, uint32_t flags, struct avmm_irq *irq, int kick_fd);
/* Pop the next available chain: 1 (got one, maybe with c->err set), 0 (none), -1 (the
 * ring is broken: q->broken and q->last_error say so). */
int avmm_vq_pop(struct avmm_vq *q, const struct avmm_gmem *m, struct avmm_chain *c);
/* Give back the last n popped chains (not yet pushed): they will be popped again. */
void avmm_vq_unpop(struct avmm_vq *q, uint16_t n);
/* Write a used entry (seen by the driver at the next publish). */
void avmm_vq_push(struct avmm_vq *q, uint16_t head, uint32_t len);
/* Publish the used entries written so far and raise the vector if the driver wants it. */
void avmm_vq_publish(struct avmm_vq *q);
/* Reset the kick eventfd (a non-blocking read). */
void avmm_vq_drain_kick(struct avmm_vq *q);
/* Tell the driver to notify us for the next buffer; returns 1 if buffers arrived meanwhile. */
int avmm_vq_enable_notify(struct avmm_vq *q);
/* Tell the driver to notify us when it adds buffers beyond those available now (the
 * device waits for more than it has: vhost's vhost_enable_notify); 1 if some came. */
int avmm_vq_enable_notify_more(struct avmm_vq *q);
/* Ask the driver not to notify (the device polls): a hint the driver may act on late, so a
 * device that then sleeps enables notifications first and re-checks (avmm_vq_enable_notify). */
void avmm_vq_disable_notify(struct avmm_vq *q);
/* Buffers available and not yet popped. */
uint16_t avmm_vq_pending(const struct avmm_vq *q);

/* Copy helpers over an iovec range: bytes copied. */
size_t avmm_iov_to_buf(const struct iovec *iov, uint32_t n, size_t skip, void *buf, size_t len);
size_t avmm_buf_to_iov(const struct iovec *iov, uint32_t n, size_t skip, const void *buf, size_t len);

#endif
