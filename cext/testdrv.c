/*
 * A virtio-blk driver in C, for the data-path benchmark (perf/blk.py): it plays the
 * guest at full speed, with no guest CPU, so what is measured is the VMM.
 *
 * It keeps `qd` requests in flight on one split queue, as Linux's virtio_blk does: three
 * descriptors per request (header, data, status), the avail index published once per
 * batch, a doorbell only when the device asked for one (EVENT_IDX), used_event set to
 * hear about the next completion, and a blocking wait on the vector's eventfd when
 * nothing has completed. Each request's latency is from its publish to its used entry.
 *
 * It runs in the calling thread (Python calls it from a worker thread; cffi drops the
 * GIL), while the loop's thread serves the device.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/virtio_blk.h>
#include <poll.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "testdrv.h"

static uint64_t now_ns(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t next_rand(uint64_t *s)
{
    /* xorshift64*: cheap and good enough to spread requests over the disk */
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 2685821657736338717ull;
}

struct slot {
    uint64_t t0;
    uint64_t sector;
};

static void prepare(const struct avmm_testdrv_cfg *c, struct slot *slots, uint16_t i, uint64_t *seq,
                    uint64_t *rng)
{
    uint64_t blocks = c->capacity_sectors / (c->block_size / 512);
    uint64_t block = c->random ? next_rand(rng) % blocks : (*seq)++ % blocks;
    struct virtio_blk_outhdr *h = (void *)(c->hva + c->hdr_gpa + 16ull * i - c->hva_gpa);
    h->type = c->write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN;
    h->ioprio = 0;
    h->sector = block * (c->block_size / 512);
    slots[i].sector = h->sector;
    uint8_t *status = c->hva + c->status_gpa + i - c->hva_gpa;
    *status = 0xFF;
    struct vring_desc *d = &c->desc[3 * i];
    d[0] = (struct vring_desc){c->hdr_gpa + 16ull * i, 16, VRING_DESC_F_NEXT, (uint16_t)(3 * i + 1)};
    d[1] = (struct vring_desc){c->buf_gpa + (uint64_t)c->block_size * i, c->block_size,
                               (uint16_t)(VRING_DESC_F_NEXT | (c->write ? 0 : VRING_DESC_F_WRITE)), (uint16_t)(3 * i + 2)};
    d[2] = (struct vring_desc){c->status_gpa + i, 1, VRING_DESC_F_WRITE, 0};
}

int avmm_testdrv_run(const struct avmm_testdrv_cfg *c, struct avmm_testdrv_result *res, uint32_t *lat_ns)
{
    struct slot slots[AVMM_TESTDRV_MAX_QD];
    uint16_t size = c->size;
    uint16_t avail_idx = c->avail->idx, last_used = c->used->idx;
    uint64_t seq = 0, rng = c->seed | 1, issued = 0, done = 0;
    uint16_t *used_event = (uint16_t *)&c->avail->ring[size];
    uint16_t *avail_event = (uint16_t *)&c->used->ring[size];
    if (!c->qd || c->qd > AVMM_TESTDRV_MAX_QD || 3u * c->qd > size)
        return -EINVAL;
    memset(res, 0, sizeof(*res));
    uint64_t cpu0 = now_ns(CLOCK_THREAD_CPUTIME_ID), t_start = now_ns(CLOCK_MONOTONIC);

    /* publish `n` new requests (their heads are already in the ring) and ring if asked */
    uint16_t old_idx = avail_idx;
#define PUBLISH()                                                                                 \
    do {                                                                                          \
        __atomic_store_n(&c->avail->idx, avail_idx, __ATOMIC_RELEASE);                            \
        __atomic_thread_fence(__ATOMIC_SEQ_CST);                                                  \
        uint16_t ev = __atomic_load_n(avail_event, __ATOMIC_RELAXED);                             \
        if (!c->event_idx || vring_need_event(ev, avail_idx, old_idx)) {                          \
            uint64_t one = 1;                                                                     \
            if (write(c->kick_fd, &one, 8) == 8)                                                   \
                res->kicks++;                                                                     \
        }                                                                                         \
        old_idx = avail_idx;                                                                      \
    } while (0)

    for (uint16_t i = 0; i < c->qd && issued < c->nreq; i++, issued++) {
        prepare(c, slots, i, &seq, &rng);
        c->avail->ring[avail_idx % size] = (uint16_t)(3 * i);
        avail_idx++;
        slots[i].t0 = now_ns(CLOCK_MONOTONIC);
    }
    __atomic_store_n(used_event, last_used, __ATOMIC_RELAXED);
    PUBLISH();

    while (done < c->nreq) {
        uint16_t used_idx = __atomic_load_n(&c->used->idx, __ATOMIC_ACQUIRE);
        if (used_idx == last_used) {
            /* nothing yet: ask for an interrupt at the next one, re-check, then sleep */
            __atomic_store_n(used_event, last_used, __ATOMIC_RELAXED);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            if (__atomic_load_n(&c->used->idx, __ATOMIC_ACQUIRE) != last_used)
                continue;
            struct pollfd p = {.fd = c->irq_fd, .events = POLLIN};
            int r = poll(&p, 1, 5000);
            if (r == 0) {
                res->timeouts++;
                break;
            }
            uint64_t cnt;
            if (read(c->irq_fd, &cnt, 8) == 8)
                res->interrupts += cnt;
            continue;
        }
        uint64_t t = now_ns(CLOCK_MONOTONIC);
        int added = 0;
        while (last_used != used_idx) {
            struct vring_used_elem *e = &c->used->ring[last_used % size];
            uint16_t i = (uint16_t)(e->id / 3);
            last_used++;
            uint8_t status = *(c->hva + c->status_gpa + i - c->hva_gpa);
            if (status != VIRTIO_BLK_S_OK)
                res->errors++;
            if (lat_ns && done < c->nreq)
                lat_ns[done] = (uint32_t)((t - slots[i].t0) > UINT32_MAX ? UINT32_MAX : t - slots[i].t0);
            done++;
            if (issued < c->nreq) {
                prepare(c, slots, i, &seq, &rng);
                c->avail->ring[avail_idx % size] = (uint16_t)(3 * i);
                avail_idx++;
                slots[i].t0 = now_ns(CLOCK_MONOTONIC);
                issued++;
                added++;
            }
        }
        if (added)
            PUBLISH();
    }
#undef PUBLISH
    res->completed = done;
    res->ns = now_ns(CLOCK_MONOTONIC) - t_start;
    res->driver_cpu_ns = now_ns(CLOCK_THREAD_CPUTIME_ID) - cpu0;
    return 0;
}
