/*
 * A virtio-blk driver in C, for the data-path benchmark (perf/blk.py): it plays the
 * guest at full speed, with no guest CPU, so what is measured is the VMM.
 *
 * It keeps `qd` requests in flight on one split queue, as Linux's virtio_blk does: three
 * descriptors per request (header, data, status), the avail index published once per
 * batch, a doorbell only when the device asked for one (EVENT_IDX), used_event set to
 * hear about the next completion, and a blocking wait on the vector's eventfd when
 * nothing has completed. Each request's latency is from its publish to its used entry.
 * With halt_poll_ns set, that wait is a halted vCPU on hardware KVM: it spins on the used
 * ring for KVM's adaptive halt-polling window before it sleeps (halt() below).
 *
 * It runs in the calling thread (Python calls it from a worker thread; cffi drops the
 * GIL), while the loop's thread serves the device.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/virtio_blk.h>
#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "testdrv.h"
#include "util.h"

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

/* A halted vCPU (testdrv.h): what the driver's CPU does until the used index moves past
 * `last`. KVM polls for a pending interrupt; the driver looks at what the interrupt is for,
 * the used index (the device writes it before it signals the eventfd). A completion caught
 * while polling still had its interrupt signalled (the guest would take it while running):
 * a later sleep reads that stale count and sleeps again. 1 when the ring moved, 0 on timeout. */
struct vcpu {
    uint32_t max_ns;  /* the cap: 0, never poll */
    uint32_t poll_ns; /* the window now */
    int loadavg_fd;   /* /proc/loadavg, for cpu_wanted() */
    int cpus;         /* the host's CPUs online: /proc/loadavg counts the whole host's tasks */
};

static void vcpu_init(struct vcpu *v, uint32_t max_ns)
{
    *v = (struct vcpu){max_ns, 0, -1, 1};
    if (!max_ns)
        return;
    v->loadavg_fd = open("/proc/loadavg", O_RDONLY | O_CLOEXEC);
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    if (n > 0)
        v->cpus = (int)n;
}

static void vcpu_fini(struct vcpu *v)
{
    if (v->loadavg_fd >= 0)
        close(v->loadavg_fd);
}

/* KVM stops polling as soon as another task is runnable on the vCPU's CPU
 * (kvm_vcpu_can_poll: single_task_running()). User space cannot see its CPU's run queue;
 * the nearest it can see is the whole machine's: more runnable tasks than CPUs
 * (/proc/loadavg's fourth field counts the running ones, this thread among them). */
static int cpu_wanted(struct vcpu *v)
{
    char buf[128];
    if (v->loadavg_fd < 0)
        return 0;
    ssize_t n = pread(v->loadavg_fd, buf, sizeof(buf) - 1, 0);
    if (n <= 0)
        return 0;
    buf[n] = 0;
    const char *p = buf;
    for (int field = 0; field < 3 && p; field++) {
        p = strchr(p, ' ');
        if (p)
            p++;
    }
    return p && atoi(p) > v->cpus;
}

#define CPU_WANTED_EVERY_NS 10000u /* a look costs ~2 µs */

static int halt(struct vcpu *v, const uint16_t *used_idx, uint16_t last, int irq_fd, int timeout_ms,
                struct avmm_testdrv_halts *h, uint64_t *interrupts)
{
    uint64_t t0 = avmm_clock_ns(CLOCK_MONOTONIC), t = t0;
    int moved = 0;
    h->halts++;
    if (v->poll_ns && cpu_wanted(v)) {
        h->yielded++; /* KVM does not poll while another task is runnable on the CPU */
    } else if (v->poll_ns) {
        uint64_t stop = t0 + v->poll_ns, look = t0 + CPU_WANTED_EVERY_NS;
        do {
            for (int spin = 0; spin < 16 && !moved; spin++) {
                moved = __atomic_load_n(used_idx, __ATOMIC_ACQUIRE) != last;
                if (!moved)
                    __builtin_ia32_pause();
            }
            t = avmm_clock_ns(CLOCK_MONOTONIC);
            if (!moved && t >= look) {
                if (cpu_wanted(v)) {
                    h->yielded++;
                    break;
                }
                look = t + CPU_WANTED_EVERY_NS;
            }
        } while (!moved && t < stop);
        h->poll_ns += t - t0;
    }
    if (moved) {
        h->polled++;
    } else {
        h->slept++;
        while (__atomic_load_n(used_idx, __ATOMIC_ACQUIRE) == last) {
            struct pollfd p = {.fd = irq_fd, .events = POLLIN};
            if (poll(&p, 1, timeout_ms) <= 0)
                return 0;
            uint64_t cnt;
            if (read(irq_fd, &cnt, 8) == 8)
                *interrupts += cnt;
        }
    }
    if (!v->max_ns)
        return 1;
    /* KVM's rule (kvm_vcpu_halt): the halt's whole length against the window and the cap */
    uint64_t ns = avmm_clock_ns(CLOCK_MONOTONIC) - t0;
    if (ns <= v->poll_ns)
        ; /* the window caught it */
    else if (v->poll_ns && ns > v->max_ns)
        v->poll_ns = v->poll_ns / 2 < AVMM_TESTDRV_HALT_POLL_START_NS ? 0 : v->poll_ns / 2;
    else if (v->poll_ns < v->max_ns && ns < v->max_ns)
        v->poll_ns = v->poll_ns * 2 < AVMM_TESTDRV_HALT_POLL_START_NS ? AVMM_TESTDRV_HALT_POLL_START_NS
                     : v->poll_ns * 2 > v->max_ns ? v->max_ns : v->poll_ns * 2;
    return 1;
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
    struct vcpu vcpu;
    vcpu_init(&vcpu, c->halt_poll_ns);
    uint64_t cpu0 = avmm_clock_ns(CLOCK_THREAD_CPUTIME_ID), t_start = avmm_clock_ns(CLOCK_MONOTONIC);

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
        slots[i].t0 = avmm_clock_ns(CLOCK_MONOTONIC);
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
            if (!halt(&vcpu, &c->used->idx, last_used, c->irq_fd, 5000, &res->halt, &res->interrupts)) {
                res->timeouts++;
                break;
            }
            continue;
        }
        uint64_t t = avmm_clock_ns(CLOCK_MONOTONIC);
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
                slots[i].t0 = avmm_clock_ns(CLOCK_MONOTONIC);
                issued++;
                added++;
            }
        }
        if (added)
            PUBLISH();
    }
#undef PUBLISH
    vcpu_fini(&vcpu);
    res->completed = done;
    res->ns = avmm_clock_ns(CLOCK_MONOTONIC) - t_start;
    res->driver_cpu_ns = avmm_clock_ns(CLOCK_THREAD_CPUTIME_ID) - cpu0;
    return 0;
}

/* ---- virtio-net ------------------------------------------------------------------------ */

struct ring {
    struct vring_desc *desc;
    struct vring_avail *avail;
    struct vring_used *used;
    uint16_t size, avail_idx, last_used, old_idx;
    int kick_fd, irq_fd;
};

static void ring_publish(struct ring *r, int event_idx, struct avmm_testdrv_net_result *res)
{
    __atomic_store_n(&r->avail->idx, r->avail_idx, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint16_t ev = __atomic_load_n((uint16_t *)&r->used->ring[r->size], __ATOMIC_RELAXED);
    if (!event_idx || vring_need_event(ev, r->avail_idx, r->old_idx)) {
        uint64_t one = 1;
        if (write(r->kick_fd, &one, 8) == 8)
            res->kicks++;
    }
    r->old_idx = r->avail_idx;
}

/* Wait until the used ring moves past last_used (or the timeout): 1 if it did. */
static int ring_wait(struct ring *r, struct vcpu *v, int timeout_ms, struct avmm_testdrv_net_result *res)
{
    if (__atomic_load_n(&r->used->idx, __ATOMIC_ACQUIRE) != r->last_used)
        return 1;
    __atomic_store_n((uint16_t *)&r->avail->ring[r->size], r->last_used, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(&r->used->idx, __ATOMIC_ACQUIRE) != r->last_used)
        return 1;
    if (!halt(v, &r->used->idx, r->last_used, r->irq_fd, timeout_ms, &res->halt, &res->interrupts)) {
        res->timeouts++;
        return 0;
    }
    return 1;
}

int avmm_testdrv_net_run(const struct avmm_testdrv_net_cfg *c, struct avmm_testdrv_net_result *res, uint32_t *lat_ns)
{
    struct ring rx = {c->rx_desc, c->rx_avail, c->rx_used, c->size, c->rx_avail->idx, c->rx_used->idx, 0,
                      c->rx_kick_fd, c->rx_irq_fd};
    struct ring tx = {c->tx_desc, c->tx_avail, c->tx_used, c->size, c->tx_avail->idx, c->tx_used->idx, 0,
                      c->tx_kick_fd, c->tx_irq_fd};
    rx.old_idx = rx.avail_idx;
    tx.old_idx = tx.avail_idx;
    memset(res, 0, sizeof(*res));
    struct vcpu vcpu; /* one vCPU runs both queues' driver */
    vcpu_init(&vcpu, c->halt_poll_ns);
    uint16_t size = c->size;
    uint64_t cpu0 = avmm_clock_ns(CLOCK_THREAD_CPUTIME_ID), t0 = avmm_clock_ns(CLOCK_MONOTONIC);

    /* RX: every buffer posted once; each used one goes straight back. */
    if (c->mode != AVMM_TESTDRV_NET_TX) {
        for (uint16_t i = 0; i < size; i++) {
            rx.desc[i] = (struct vring_desc){c->rx_bufs_gpa + (uint64_t)c->rx_buf_len * i, c->rx_buf_len,
                                             VRING_DESC_F_WRITE, 0};
            rx.avail->ring[rx.avail_idx % size] = i;
            rx.avail_idx++;
        }
        ring_publish(&rx, c->event_idx, res);
    }
    /* TX: every descriptor points at the same frame (the device only reads it). */
    for (uint16_t i = 0; i < size; i++)
        tx.desc[i] = (struct vring_desc){c->frame_gpa, c->frame_len, 0, 0};

    if (c->mode == AVMM_TESTDRV_NET_TX) {
        uint64_t issued = 0;
        uint16_t inflight = 0;
        while (res->frames < c->count) {
            while (inflight < size && issued < c->count) {
                tx.avail->ring[tx.avail_idx % size] = (uint16_t)(tx.avail_idx % size);
                tx.avail_idx++;
                inflight++;
                issued++;
            }
            ring_publish(&tx, c->event_idx, res);
            if (!ring_wait(&tx, &vcpu, (int)c->timeout_ms, res))
                break;
            uint16_t used = __atomic_load_n(&tx.used->idx, __ATOMIC_ACQUIRE);
            uint16_t n = (uint16_t)(used - tx.last_used);
            tx.last_used = used;
            inflight -= n;
            res->frames += n;
            res->bytes += (uint64_t)n * (c->frame_len - 12);
        }
    } else {
        uint64_t sent_at = 0;
        uint16_t frame_left = 0; /* used entries still to come for the frame being received */
        if (c->mode == AVMM_TESTDRV_NET_PING) {
            tx.avail->ring[tx.avail_idx % size] = (uint16_t)(tx.avail_idx % size);
            tx.avail_idx++;
            sent_at = avmm_clock_ns(CLOCK_MONOTONIC);
            ring_publish(&tx, c->event_idx, res);
        }
        while (res->frames < c->count) {
            if (!ring_wait(&rx, &vcpu, (int)c->timeout_ms, res))
                break;
            uint16_t used = __atomic_load_n(&rx.used->idx, __ATOMIC_ACQUIRE);
            uint64_t t = avmm_clock_ns(CLOCK_MONOTONIC);
            while (rx.last_used != used) {
                struct vring_used_elem *e = &rx.used->ring[rx.last_used % size];
                rx.last_used++;
                rx.avail->ring[rx.avail_idx % size] = (uint16_t)e->id;
                rx.avail_idx++;
                /* A frame spans num_buffers used entries (mergeable RX buffers). */
                uint8_t *buf = c->hva + c->rx_bufs_gpa + (uint64_t)c->rx_buf_len * e->id - c->hva_gpa;
                if (!frame_left) {
                    frame_left = (uint16_t)(buf[10] | buf[11] << 8);
                    res->bytes += e->len > 12 ? e->len - 12 : 0;
                } else {
                    res->bytes += e->len;
                }
                if (frame_left && --frame_left)
                    continue;
                if (!res->frames)
                    res->first_ns = t - t0;
                res->last_ns = t - t0;
                res->frames++;
                if (c->mode == AVMM_TESTDRV_NET_PING && res->frames <= c->count) {
                    if (lat_ns)
                        lat_ns[res->frames - 1] = (uint32_t)(t - sent_at);
                    if (res->frames < c->count) {
                        tx.last_used = __atomic_load_n(&tx.used->idx, __ATOMIC_ACQUIRE);
                        tx.avail->ring[tx.avail_idx % size] = (uint16_t)(tx.avail_idx % size);
                        tx.avail_idx++;
                        sent_at = avmm_clock_ns(CLOCK_MONOTONIC);
                        ring_publish(&tx, c->event_idx, res);
                    }
                }
            }
            ring_publish(&rx, c->event_idx, res);
        }
    }
    vcpu_fini(&vcpu);
    res->ns = avmm_clock_ns(CLOCK_MONOTONIC) - t0;
    res->driver_cpu_ns = avmm_clock_ns(CLOCK_THREAD_CPUTIME_ID) - cpu0;
    return 0;
}
