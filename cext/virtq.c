/*
 * The split virtqueue (virtio 1.2, 2.7): popping chains, pushing used entries, deciding
 * when to interrupt the driver. See virtq.h for the contract.
 *
 * The guest can change the rings under us at any time. Each descriptor is copied once
 * before it is looked at, so what was checked is what is used; every index is checked
 * against its table before it is followed, and a walk is bounded by the table's size.
 * virtio is little-endian and so is x86: fields are read as they lie.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "util.h"
#include "virtq.h"

void avmm_irq_raise(struct avmm_irq *v)
{
    if (!v || v->efd < 0)
        return;
    if (__atomic_load_n(&v->masked, __ATOMIC_SEQ_CST)) {
        __atomic_store_n(&v->pending, 1, __ATOMIC_SEQ_CST);
        v->held++;
        /* Raised from a device thread while the loop unmasks: the loop clears the mask,
         * then looks at pending; if it looked before our store, deliver it here. */
        if (__atomic_load_n(&v->masked, __ATOMIC_SEQ_CST) || !__atomic_exchange_n(&v->pending, 0, __ATOMIC_SEQ_CST))
            return;
    }
    if (v->set_line) {
        /* A level line: up until the driver reads the ISR (the transport takes it down). */
        if (!v->asserted) {
            if (v->set_line(v->line_fd, v->gsi, 1) == 0) {
                v->asserted = 1;
                v->raised++;
            }
        }
        return;
    }
    avmm_efd_signal(v->efd);
    v->raised++;
}

void avmm_gmem_take_dirty(const struct avmm_gmem *m, uint32_t i, uint64_t *out, uint64_t words)
{
    uint64_t *d = i < m->nregions ? m->r[i].dirty : NULL;
    for (uint64_t w = 0; w < words; w++)
        out[w] = d ? __atomic_exchange_n(&d[w], 0, __ATOMIC_RELAXED) : 0;
}

void avmm_gmem_mark_iov(const struct avmm_gmem *m, const struct iovec *iov, uint32_t n, uint64_t skip, uint64_t len)
{
    if (!avmm_gmem_tracking(m))
        return;
    for (uint32_t k = 0; k < n && len; k++) {
        uint64_t l = iov[k].iov_len;
        if (skip >= l) {
            skip -= l;
            continue;
        }
        const uint8_t *hva = (const uint8_t *)iov[k].iov_base + skip;
        uint64_t take = l - skip < len ? l - skip : len;
        for (uint32_t i = 0; i < m->nregions; i++) {
            const struct avmm_gmem_region *r = &m->r[i];
            if (hva >= r->hva && (uint64_t)(hva - r->hva) < r->size) {
                avmm_gmem_mark(m, r->gpa + (uint64_t)(hva - r->hva), take);
                break;
            }
        }
        len -= take;
        skip = 0;
    }
}

static int ring_fits(const struct avmm_gmem *m, uint64_t gpa, uint64_t len, void **out)
{
    *out = avmm_gmem_ptr(m, gpa, len);
    return *out != NULL;
}

int avmm_vq_setup(struct avmm_vq *q, const struct avmm_gmem *m, uint16_t size, uint64_t desc_gpa,
                  uint64_t avail_gpa, uint64_t used_gpa, uint32_t flags, struct avmm_irq *irq, int kick_fd)
{
    void *desc, *avail, *used;
    memset(q, 0, sizeof(*q));
    q->kick_fd = -1;
    if (size == 0 || (size & (size - 1)) || size > 32768)
        return -EINVAL;
    /* 2.7: the descriptor table is 16-byte aligned, the avail ring 2, the used ring 4. */
    if ((desc_gpa & 15) || (avail_gpa & 1) || (used_gpa & 3))
        return -EINVAL;
    /* avail: flags, idx, ring[size], used_event; used: flags, idx, ring[size], avail_event */
    if (!ring_fits(m, desc_gpa, 16ull * size, &desc) || !ring_fits(m, avail_gpa, 6 + 2ull * size, &avail) ||
        !ring_fits(m, used_gpa, 6 + 8ull * size, &used))
        return -EFAULT;
    q->size = size;
    q->flags = flags;
    q->desc = desc;
    q->avail = avail;
    q->used = used;
    q->irq = irq;
    q->kick_fd = kick_fd;
    /* The driver reads used->idx from 0 after a reset; so do we. */
    q->last_avail = 0;
    q->used_idx = 0;
    return 0;
}

static void break_ring(struct avmm_vq *q, uint32_t why)
{
    q->broken = 1;
    q->last_error = why;
    q->stats.errors[why]++;
}

static void chain_error(struct avmm_vq *q, struct avmm_chain *c, uint32_t why)
{
    if (!c->err) {
        c->err = why;
        q->stats.errors[why]++;
    }
}

/* Walk one table of descriptors starting at `i`: the queue's own (indirect = 0) or an
 * indirect table. Returns 0, or an error that breaks the ring (only for the queue's own
 * table: in an indirect table every error fails just the request). */
static int walk(struct avmm_vq *q, const struct avmm_gmem *m, struct avmm_chain *c,
                const struct vring_desc *table, uint32_t tsize, uint16_t i, int indirect)
{
    uint32_t budget = tsize;
    for (;;) {
        struct vring_desc d;
        if (i >= tsize) {
            if (!indirect)
                return AVMM_VQ_E_NEXT_RANGE;
            chain_error(q, c, AVMM_VQ_E_INDIRECT);
            return 0;
        }
        if (budget-- == 0) {
            if (!indirect)
                return AVMM_VQ_E_LOOP;
            chain_error(q, c, AVMM_VQ_E_INDIRECT);
            return 0;
        }
        memcpy(&d, (const void *)&table[i], sizeof(d));
        __atomic_signal_fence(__ATOMIC_SEQ_CST); /* d is a snapshot: never re-read table[i] */
        c->ndesc++;

        if (d.flags & VRING_DESC_F_INDIRECT) {
            /* 2.7.5.3: only if negotiated, never nested, never with NEXT; the table is a
             * whole number of descriptors. The WRITE flag of this descriptor is ignored.
             * A table is no longer than the longest chain any device takes (Linux may make
             * one longer than the queue): its walk is bounded by that, not by the guest. */
            void *t;
            if (indirect || !(q->flags & AVMM_VQ_INDIRECT) || (d.flags & VRING_DESC_F_NEXT) || d.len == 0 ||
                (d.len & 15) || d.len / 16 > AVMM_CHAIN_MAX_IOV || !ring_fits(m, d.addr, d.len, &t)) {
                chain_error(q, c, AVMM_VQ_E_INDIRECT);
                return 0;
            }
            return walk(q, m, c, t, d.len / 16, 0, 1);
        }

        int writable = (d.flags & VRING_DESC_F_WRITE) != 0;
        if (!writable && c->nin) {
            chain_error(q, c, AVMM_VQ_E_ORDER);
        } else if (d.len) {
            uint8_t *p = avmm_gmem_ptr(m, d.addr, d.len);
            if (!p) {
                chain_error(q, c, AVMM_VQ_E_BUFFER);
                if (writable)
                    c->last_in = NULL;
            } else {
                if (writable)
                    c->last_in = p + d.len - 1; /* marked dirty once written, not here */
                if (c->nout + c->nin >= c->iov_cap) {
                    chain_error(q, c, AVMM_VQ_E_TOO_MANY);
                } else {
                    struct iovec *v = &c->iov[c->nout + c->nin];
                    v->iov_base = p;
                    v->iov_len = d.len;
                    if (writable) {
                        c->nin++;
                        c->in_len += d.len;
                    } else {
                        c->nout++;
                        c->out_len += d.len;
                    }
                }
            }
        }
        /* Walk on after an error: the device answers it in the chain's last writable byte */
        if (!(d.flags & VRING_DESC_F_NEXT))
            return 0;
        i = d.next;
    }
}

int avmm_vq_pop(struct avmm_vq *q, const struct avmm_gmem *m, struct avmm_chain *c)
{
    if (q->broken || !q->size)
        return -1;
    uint16_t avail_idx = __atomic_load_n(&q->avail->idx, __ATOMIC_ACQUIRE);
    uint16_t n = (uint16_t)(avail_idx - q->last_avail);
    if (n == 0)
        return 0;
    if (n > q->size) {
        break_ring(q, AVMM_VQ_E_AVAIL_IDX);
        return -1;
    }
    uint16_t head = __atomic_load_n(&q->avail->ring[q->last_avail & (q->size - 1)], __ATOMIC_RELAXED);
    if (head >= q->size) {
        break_ring(q, AVMM_VQ_E_HEAD_RANGE);
        return -1;
    }
    c->head = head;
    c->ndesc = 0;
    c->nout = c->nin = 0;
    c->out_len = c->in_len = 0;
    c->err = 0;
    c->last_in = NULL;
    int r = walk(q, m, c, q->desc, q->size, head, 0);
    if (r) {
        break_ring(q, (uint32_t)r);
        return -1;
    }
    q->last_avail++;
    q->stats.chains++;
    return 1;
}

void avmm_vq_unpop(struct avmm_vq *q, uint16_t n)
{
    q->last_avail -= n;
    q->stats.chains -= n;
}

void avmm_vq_push(struct avmm_vq *q, uint16_t head, uint32_t len)
{
    struct vring_used_elem *e = &q->used->ring[q->used_idx & (q->size - 1)];
    __atomic_store_n(&e->id, (uint32_t)head, __ATOMIC_RELAXED);
    __atomic_store_n(&e->len, len, __ATOMIC_RELAXED);
    q->used_idx++;
    q->unpublished++;
}

static uint16_t *used_event(const struct avmm_vq *q)
{
    return (uint16_t *)&q->avail->ring[q->size];
}

static uint16_t *avail_event(const struct avmm_vq *q)
{
    return (uint16_t *)&q->used->ring[q->size];
}

void avmm_vq_publish(struct avmm_vq *q)
{
    if (!q->unpublished)
        return;
    q->unpublished = 0;
    /* The entries before the index (release), then the index before reading what the
     * driver wants (a full barrier: 2.7.7.2). */
    __atomic_store_n(&q->used->idx, q->used_idx, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    int need;
    if (q->flags & AVMM_VQ_EVENT_IDX) {
        uint16_t event = __atomic_load_n(used_event(q), __ATOMIC_RELAXED);
        uint16_t old = q->signalled_used;
        need = !q->signalled_valid || vring_need_event(event, q->used_idx, old);
        q->signalled_used = q->used_idx;
        q->signalled_valid = 1;
    } else {
        need = !(__atomic_load_n(&q->avail->flags, __ATOMIC_RELAXED) & VRING_AVAIL_F_NO_INTERRUPT);
    }
    if (need) {
        q->stats.interrupts++;
        if (q->irq && q->irq->isr) /* INTx or one shared MSI: the ISR says it was a queue */
            __atomic_or_fetch(q->irq->isr, 1, __ATOMIC_SEQ_CST);
        avmm_irq_raise(q->irq);
    } else {
        q->stats.suppressed++;
    }
}

void avmm_vq_drain_kick(struct avmm_vq *q)
{
    uint64_t counter;
    q->stats.notifies++;
    if (q->kick_fd >= 0 && read(q->kick_fd, &counter, sizeof(counter)) < 0) {
        /* EAGAIN: nothing was signalled */
    }
}

/* Ask for a doorbell once the driver makes entry `idx` available; 1 if the avail index
 * has moved past `seen` meanwhile (the re-check after the barrier, 2.7.10). */
static int request_notify(struct avmm_vq *q, uint16_t idx, uint16_t seen)
{
    if (!q->size || q->broken)
        return 0;
    if (q->flags & AVMM_VQ_EVENT_IDX)
        __atomic_store_n(avail_event(q), idx, __ATOMIC_RELAXED);
    else
        __atomic_store_n(&q->used->flags, (uint16_t)(q->used->flags & ~VRING_USED_F_NO_NOTIFY), __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return __atomic_load_n(&q->avail->idx, __ATOMIC_ACQUIRE) != seen;
}

int avmm_vq_enable_notify(struct avmm_vq *q)
{
    return request_notify(q, q->last_avail, q->last_avail);
}

int avmm_vq_enable_notify_more(struct avmm_vq *q)
{
    if (!q->size)
        return 0;
    uint16_t seen = __atomic_load_n(&q->avail->idx, __ATOMIC_ACQUIRE);
    return request_notify(q, seen, seen);
}

void avmm_vq_disable_notify(struct avmm_vq *q)
{
    if (!q->size || q->broken)
        return;
    if (q->flags & AVMM_VQ_EVENT_IDX) {
        /* The driver kicks when avail_event lies in [old, new): the index at its last kick
         * (Linux: at its last kick_prepare) up to the one it publishes. An enable left it at
         * last_avail, the start of the next such window. One behind is not in any window
         * until the device has popped 2^16 more entries without an enable: a best effort, a
         * driver whose `old` is older than last_avail may still kick (a spurious kick only). */
        __atomic_store_n(avail_event(q), (uint16_t)(q->last_avail - 1), __ATOMIC_RELAXED);
        return;
    }
    __atomic_store_n(&q->used->flags, (uint16_t)(q->used->flags | VRING_USED_F_NO_NOTIFY), __ATOMIC_RELAXED);
}

uint16_t avmm_vq_pending(const struct avmm_vq *q)
{
    if (!q->size)
        return 0;
    return (uint16_t)(__atomic_load_n(&q->avail->idx, __ATOMIC_ACQUIRE) - q->last_avail);
}

/* Copy between a buffer and an iovec range starting `skip` bytes in: bytes copied. */
static size_t iov_copy(const struct iovec *iov, uint32_t n, size_t skip, void *buf, size_t len, int to_iov)
{
    size_t done = 0;
    for (uint32_t i = 0; i < n && done < len; i++) {
        size_t l = iov[i].iov_len;
        if (skip >= l) {
            skip -= l;
            continue;
        }
        size_t take = l - skip < len - done ? l - skip : len - done;
        uint8_t *at = (uint8_t *)iov[i].iov_base + skip;
        if (to_iov)
            memcpy(at, (uint8_t *)buf + done, take);
        else
            memcpy((uint8_t *)buf + done, at, take);
        done += take;
        skip = 0;
    }
    return done;
}

size_t avmm_iov_to_buf(const struct iovec *iov, uint32_t n, size_t skip, void *buf, size_t len)
{
    return iov_copy(iov, n, skip, buf, len, 0);
}

size_t avmm_buf_to_iov(const struct iovec *iov, uint32_t n, size_t skip, const void *buf, size_t len)
{
    return iov_copy(iov, n, skip, (void *)buf, len, 1);
}
