/* The benchmark's virtio-blk driver (testdrv.c). */
#ifndef AVMM_TESTDRV_H
#define AVMM_TESTDRV_H

#include <stdint.h>
#include <linux/virtio_ring.h>

#define AVMM_TESTDRV_MAX_QD 256

/* The driver's CPU when nothing has completed: a halted vCPU. halt_poll_ns 0: it sleeps on
 * the vector's eventfd at once (a vCPU whose halt always goes to the scheduler). Otherwise
 * it first spins on the used ring for an adaptive window capped at halt_poll_ns, by the rule
 * of hardware KVM's halt polling (Documentation/virt/kvm/halt-polling.rst; x86's default cap
 * is 200000 ns): the window starts at 0, grows (to 10 µs, then doubling, up to the cap) after
 * a halt that ended within the cap but past the window, halves (to 0 below 10 µs) after a halt
 * longer than the cap, and stays after one the window caught. KVM polls only while no other
 * task is runnable on the vCPU's CPU; the driver, which cannot see its CPU's run queue, polls
 * only while no more tasks are runnable than there are CPUs (/proc/loadavg, every 10 µs). */
#define AVMM_TESTDRV_HALT_POLL_NS 200000u
#define AVMM_TESTDRV_HALT_POLL_START_NS 10000u

struct avmm_testdrv_cfg {
    struct vring_desc *desc; /* the queue's rings, host addresses */
    struct vring_avail *avail;
    struct vring_used *used;
    uint16_t size;
    uint16_t qd;        /* requests kept in flight (3 descriptors each) */
    uint32_t block_size;
    int32_t kick_fd;    /* the queue's notify eventfd */
    int32_t irq_fd;     /* the queue's vector eventfd */
    int32_t write;      /* 1: OUT, 0: IN */
    int32_t random;     /* 1: random blocks, 0: sequential */
    int32_t event_idx;  /* VIRTIO_RING_F_EVENT_IDX negotiated */
    uint64_t nreq;
    uint64_t capacity_sectors;
    uint64_t seed;
    uint8_t *hva;       /* host address of guest physical hva_gpa */
    uint64_t hva_gpa;
    uint64_t hdr_gpa;   /* qd headers of 16 bytes */
    uint64_t buf_gpa;   /* qd buffers of block_size */
    uint64_t status_gpa; /* qd status bytes */
    uint32_t halt_poll_ns; /* the halt-polling cap (above); 0: always sleep */
};

/* How the driver's halts ended: `polled` caught the used ring moving within the window,
 * `slept` went to sleep on the eventfd (`interrupts` counts the signals it read there);
 * `yielded` of those cut the window short because more tasks were runnable than CPUs (KVM
 * stops polling when another task wants the vCPU's CPU). */
struct avmm_testdrv_halts {
    uint64_t halts, polled, slept, yielded;
    uint64_t poll_ns; /* time spent spinning in the windows */
};

struct avmm_testdrv_result {
    uint64_t completed, errors, kicks, interrupts, timeouts;
    uint64_t ns;            /* wall time */
    uint64_t driver_cpu_ns; /* the driver thread's own CPU time (the "guest") */
    struct avmm_testdrv_halts halt;
};

int avmm_testdrv_run(const struct avmm_testdrv_cfg *c, struct avmm_testdrv_result *res, uint32_t *lat_ns);


/* The benchmark's virtio-net driver: one queue pair. */
enum avmm_testdrv_net_mode {
    AVMM_TESTDRV_NET_TX = 1,   /* send `count` frames as fast as the ring allows */
    AVMM_TESTDRV_NET_RX = 2,   /* receive `count` frames (buffers kept posted) */
    AVMM_TESTDRV_NET_PING = 3, /* send one frame, wait for one back, `count` times */
};

struct avmm_testdrv_net_cfg {
    struct vring_desc *rx_desc, *tx_desc;
    struct vring_avail *rx_avail, *tx_avail;
    struct vring_used *rx_used, *tx_used;
    uint16_t size;
    uint16_t mode;
    int32_t rx_kick_fd, tx_kick_fd;
    int32_t rx_irq_fd, tx_irq_fd;
    int32_t event_idx;
    uint64_t count;
    uint8_t *hva;          /* host address of guest physical hva_gpa */
    uint64_t hva_gpa;
    uint64_t frame_gpa;    /* the frame to send: vnet header + frame, frame_len bytes */
    uint32_t frame_len;
    uint32_t rx_buf_len;   /* each RX buffer */
    uint64_t rx_bufs_gpa;  /* size RX buffers of rx_buf_len */
    uint32_t timeout_ms;
    uint32_t halt_poll_ns; /* as avmm_testdrv_cfg's */
};

struct avmm_testdrv_net_result {
    uint64_t frames, bytes, kicks, interrupts, timeouts;
    uint64_t ns;
    uint64_t driver_cpu_ns;
    uint64_t first_ns; /* RX: from the start to the first frame (a source started late) */
    uint64_t last_ns;  /* RX: from the start to the last frame */
    struct avmm_testdrv_halts halt;
};

int avmm_testdrv_net_run(const struct avmm_testdrv_net_cfg *c, struct avmm_testdrv_net_result *res, uint32_t *lat_ns);

#endif
