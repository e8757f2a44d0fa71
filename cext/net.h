/*
 * virtio-net's data path (virtio 1.2, 5.1.6) on TAP devices, with no Python per packet.
 *
 *   avmm_net_tx(pair)  the TX queue's doorbell fired (or the TAP became writable again):
 *                      every available chain is one frame — the 12-byte virtio_net_hdr_v1
 *                      then the packet — written to the TAP as it lies in guest memory
 *                      (write for a frame in one buffer, writev for more; the TAP has
 *                      IFF_VNET_HDR, so the kernel does the checksum and segmentation
 *                      offloads the header asks for)
 *   avmm_net_rx(pair)  the TAP is readable (or RX buffers arrived): each frame is read
 *                      straight into the guest's RX buffers (readv over as many chains as
 *                      the largest frame could need, with mergeable buffers), num_buffers
 *                      set, unused chains given back
 * One interrupt per queue per batch, as the driver's EVENT_IDX/NO_INTERRUPT allow.
 *
 * Back-pressure: `state` tells the caller to stop reading the TAP (the guest posted no RX
 * buffers: the reader is removed until the RX doorbell), or to wait for the TAP to be
 * writable (EAGAIN on TX: the chain stays in the ring, nothing is dropped).
 * A chain the guest got wrong (bad buffers, a header too short, a frame the TAP refuses,
 * RX buffers that are device-readable) is consumed with length 0 and counted.
 *
 * A pair may instead be on a stream socket (avmm_net_set_stream: passt, QEMU's `-netdev
 * stream` protocol): each frame is a 32-bit big-endian length then the Ethernet frame, no
 * vnet header (the device offers no offloads then). RX reads the stream in large chunks
 * into a buffer and copies each whole frame into the RX chains (one read per many frames);
 * TX sends the length and the chain's buffers in one sendmsg, and keeps the tail of a
 * frame the socket took only in part, to be sent first next time. The peer closing (or a
 * length no frame has) sets AVMM_NET_PEER_GONE once; from then TX chains are consumed and
 * dropped, so a guest that keeps sending never stalls on a dead link.
 *
 * Thread ownership: the loop's thread only.
 */
#ifndef AVMM_NET_H
#define AVMM_NET_H

#include <stdint.h>

#include "virtq.h"

#define AVMM_NET_MAX_PAIRS 16
#define AVMM_NET_HDR_LEN 12 /* struct virtio_net_hdr_v1: every VERSION_1 frame starts with it */

enum avmm_net_state {
    AVMM_NET_RX_NO_BUFFERS = 1, /* the guest has no RX buffers: stop reading the TAP */
    AVMM_NET_RX_EMPTY = 2,      /* the TAP had nothing more */
    AVMM_NET_TX_BLOCKED = 4,    /* the TAP took no more: wait until it is writable */
    AVMM_NET_BUDGET = 8,        /* stopped after a full batch: call again */
    AVMM_NET_PEER_GONE = 16,    /* a stream pair's peer closed or broke the framing (said once) */
};

enum avmm_net_flags {
    AVMM_NET_MRG_RXBUF = 1, /* VIRTIO_NET_F_MRG_RXBUF: a frame may span several RX chains */
};

struct avmm_net_stats {
    uint64_t rx_packets, rx_bytes, tx_packets, tx_bytes;
    uint64_t rx_batches, tx_batches;
    uint64_t rx_no_buffers;  /* times the guest had no RX buffers while frames waited */
    uint64_t rx_held;        /* frames read aside to wait for enough RX buffers (copied once) */
    uint64_t rx_too_long;    /* frames larger than the guest's buffers: dropped */
    uint64_t rx_bad_chains;  /* RX chains the guest got wrong */
    uint64_t rx_errors;      /* read() errors other than EAGAIN */
    uint64_t tx_bad_chains;  /* TX chains the guest got wrong (no header, bad buffers) */
    uint64_t tx_errors;      /* frames the TAP refused (a bad GSO header, too long) */
    uint64_t tx_blocked;     /* EAGAIN from the TAP: retried when it is writable */
    uint64_t rx_reads;       /* stream pairs: read() calls that brought bytes */
    uint64_t tx_partial;     /* stream pairs: frames the socket took only in part */
    uint64_t rx_bad_length;  /* stream pairs: a length no frame has (the stream is lost: we end it) */
    uint64_t rx_copied;      /* TAP frames larger than the buffers gathered for them: the tail copied */
};

struct avmm_net;

struct avmm_net *avmm_net_new(const struct avmm_gmem *mem, uint16_t npairs, uint16_t queue_size_max);
void avmm_net_free(struct avmm_net *n);
/* The TAP fd of queue pair `pair` (-1 detaches it). */
void avmm_net_set_tap(struct avmm_net *n, int pair, int fd);
/* Pair `pair`'s fd (TAP or stream), -1 if none. */
int avmm_net_fd(const struct avmm_net *n, int pair);
/* A connected SOCK_STREAM socket for pair `pair`, framed as above. 0 or -errno. */
int avmm_net_set_stream(struct avmm_net *n, int pair, int fd);
/* A stream's state that must outlive this device when another takes over the same socket
 * (a guest reset builds a new machine): the bytes read and not yet delivered, and the
 * unsent tail of a frame. carry_out copies them out (sizes: AVMM_NET_STREAM_CARRY_RX/TX)
 * and forgets them; carry_in gives them to a fresh stream pair. 0 or -EINVAL. */
#define AVMM_NET_STREAM_CARRY_RX (256 << 10)
#define AVMM_NET_STREAM_CARRY_TX (65535 + 14 + 4 + 4)
int avmm_net_stream_carry_out(struct avmm_net *n, int pair, uint8_t *rx, uint32_t *rx_len, uint8_t *tx,
                              uint32_t *tx_len);
int avmm_net_stream_carry_in(struct avmm_net *n, int pair, const uint8_t *rx, uint32_t rx_len, const uint8_t *tx,
                             uint32_t tx_len);
void avmm_net_set_flags(struct avmm_net *n, uint32_t flags, uint32_t rx_frame_max);
/* Queue qi: 2p is pair p's RX queue, 2p+1 its TX queue. 0 or -errno. */
int avmm_net_queue_setup(struct avmm_net *n, int qi, uint16_t size, uint64_t desc, uint64_t avail, uint64_t used,
                         uint32_t vq_flags, struct avmm_irq *irq, int kick_fd);
void avmm_net_reset(struct avmm_net *n);
/* Frames moved (or -1: the ring broke, the device needs a reset); *state: enum avmm_net_state. */
int avmm_net_rx(struct avmm_net *n, int pair, uint32_t *state);
int avmm_net_tx(struct avmm_net *n, int pair, uint32_t *state);
/* Busy-poll up to max_ns for work on pairs [0, npairs): TX buffers, or TAP frames with RX
 * buffers to put them in; serve the first that comes (as avmm_blk_poll). Frames moved, 0
 * if nothing came, -1 if a ring broke; *state as for rx/tx, of the pair served. A nonzero
 * *stop (a device thread's park or stop request; NULL: none) ends the poll early. The
 * driver's TX doorbells are off while it spins and on when it returns; a TX ring that got
 * frames meanwhile and is not the one served has its doorbell (kick_fd) rung by the poll. */
int avmm_net_poll(struct avmm_net *n, int npairs, uint64_t max_ns, const int *stop, uint32_t *state, int *pair);
struct avmm_vq *avmm_net_queue(struct avmm_net *n, int qi);
struct avmm_net_stats *avmm_net_stats(struct avmm_net *n, int pair);

#endif
