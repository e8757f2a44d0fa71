/* virtio-net's data path on TAP devices: see net.h. Frame layout: virtio 1.2, 5.1.6. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "net.h"
#include "util.h"

#define BUDGET 128          /* chains per call, good or bad: the loop gets its turn between batches */
#define RX_MAX_CHAINS 64    /* chains a mergeable frame may span */
#define RX_IOV 256          /* buffers of those chains */
#define TX_IOV 128          /* buffers of one TX chain (Linux uses up to MAX_SKB_FRAGS + 2) */
#define SCRATCH (65536 + 256) /* a whole frame: 64 KiB of IP packet, Ethernet and VLAN headers, the vnet header */
#define NUM_BUFFERS_OFFSET 10 /* virtio_net_hdr_v1.num_buffers */

/* Stream pairs (see net.h). A frame is at most 64 KiB of IP packet and its Ethernet and
 * VLAN headers; the RX buffer holds several, with room in front of each to write the
 * vnet header over bytes already delivered (or the headroom, for the first). */
#define STREAM_LEN 4
#define STREAM_FRAME_MIN 14
#define STREAM_FRAME_MAX (65535 + 14 + 4)
#define STREAM_HEADROOM 16
#define STREAM_RX_BUF (256 << 10)
#define STREAM_TX_BUF (STREAM_LEN + STREAM_FRAME_MAX)
/* What passt takes from us: a length outside [ETH_HLEN, ETH_MAX_MTU] makes it reset the
 * connection (and with --one-off, exit), so such a guest frame is dropped, never sent. */
#define STREAM_TX_FRAME_MIN 14
#define STREAM_TX_FRAME_MAX 65535

struct stream {
    uint8_t *rx;            /* STREAM_RX_BUF: bytes [rx_start, rx_end) are not yet delivered */
    uint32_t rx_start, rx_end;
    uint8_t *tx;            /* the unsent tail of a frame, [tx_off, tx_len) */
    uint32_t tx_off, tx_len;
    int gone;               /* the peer closed: TX drops, RX stops */
};

struct pair {
    int fd;
    uint32_t held_len; /* a frame read into `held` that waits for enough RX buffers */
    uint32_t rx_want;  /* mergeable RX: the bytes of buffers to gather for the next frame (0: the largest) */
    uint8_t *held;
    struct stream *stream; /* NULL: a TAP */
    struct avmm_net_stats stats;
};

struct avmm_net {
    const struct avmm_gmem *mem;
    uint16_t npairs;
    uint16_t queue_size_max;
    uint32_t flags;
    uint32_t rx_frame_max; /* the largest frame (header included) the guest may be given */
    struct avmm_vq q[2 * AVMM_NET_MAX_PAIRS];
    struct pair p[AVMM_NET_MAX_PAIRS];
    struct iovec rx_iov[RX_IOV + 1];
    struct avmm_chain rx_chain[RX_MAX_CHAINS];
    struct iovec tx_iov[TX_IOV];
    uint8_t scratch[SCRATCH];
};

struct avmm_net *avmm_net_new(const struct avmm_gmem *mem, uint16_t npairs, uint16_t queue_size_max)
{
    if (!npairs || npairs > AVMM_NET_MAX_PAIRS || !queue_size_max) {
        errno = EINVAL;
        return NULL;
    }
    struct avmm_net *n = calloc(1, sizeof(*n));
    if (!n)
        return NULL;
    n->mem = mem;
    n->npairs = npairs;
    n->queue_size_max = queue_size_max;
    n->rx_frame_max = AVMM_NET_HDR_LEN + 1514;
    for (int i = 0; i < AVMM_NET_MAX_PAIRS; i++)
        n->p[i].fd = -1;
    for (int i = 0; i < 2 * AVMM_NET_MAX_PAIRS; i++)
        n->q[i].kick_fd = -1;
    return n;
}

void avmm_net_free(struct avmm_net *n)
{
    if (!n)
        return;
    for (int i = 0; i < AVMM_NET_MAX_PAIRS; i++) {
        free(n->p[i].held);
        if (n->p[i].stream) {
            free(n->p[i].stream->rx);
            free(n->p[i].stream->tx);
            free(n->p[i].stream);
        }
    }
    free(n);
}

void avmm_net_set_tap(struct avmm_net *n, int pair, int fd)
{
    if (pair >= 0 && pair < n->npairs)
        n->p[pair].fd = fd;
}

int avmm_net_fd(const struct avmm_net *n, int pair)
{
    return pair >= 0 && pair < n->npairs ? n->p[pair].fd : -1;
}

int avmm_net_set_stream(struct avmm_net *n, int pair, int fd)
{
    if (pair < 0 || pair >= n->npairs || n->p[pair].stream)
        return -EINVAL;
    struct stream *st = calloc(1, sizeof(*st));
    if (!st || !(st->rx = malloc(STREAM_RX_BUF)) || !(st->tx = malloc(STREAM_TX_BUF))) {
        if (st)
            free(st->rx);
        free(st);
        return -ENOMEM;
    }
    st->rx_start = st->rx_end = STREAM_HEADROOM;
    n->p[pair].stream = st;
    n->p[pair].fd = fd;
    return 0;
}

_Static_assert(AVMM_NET_STREAM_CARRY_RX >= STREAM_RX_BUF - STREAM_HEADROOM, "a carried RX buffer fits");
_Static_assert(AVMM_NET_STREAM_CARRY_TX >= STREAM_TX_BUF, "a carried TX tail fits");

int avmm_net_stream_carry_out(struct avmm_net *n, int pair, uint8_t *rx, uint32_t *rx_len, uint8_t *tx,
                              uint32_t *tx_len)
{
    if (pair < 0 || pair >= n->npairs || !n->p[pair].stream)
        return -EINVAL;
    struct stream *st = n->p[pair].stream;
    *rx_len = st->rx_end - st->rx_start;
    memcpy(rx, st->rx + st->rx_start, *rx_len);
    *tx_len = st->tx_len - st->tx_off;
    memcpy(tx, st->tx + st->tx_off, *tx_len);
    st->rx_start = st->rx_end = STREAM_HEADROOM;
    st->tx_off = st->tx_len = 0;
    return 0;
}

int avmm_net_stream_carry_in(struct avmm_net *n, int pair, const uint8_t *rx, uint32_t rx_len, const uint8_t *tx,
                             uint32_t tx_len)
{
    if (pair < 0 || pair >= n->npairs || !n->p[pair].stream || rx_len > STREAM_RX_BUF - STREAM_HEADROOM ||
        tx_len > STREAM_TX_BUF)
        return -EINVAL;
    struct stream *st = n->p[pair].stream;
    memcpy(st->rx + STREAM_HEADROOM, rx, rx_len);
    st->rx_start = STREAM_HEADROOM;
    st->rx_end = STREAM_HEADROOM + rx_len;
    memcpy(st->tx, tx, tx_len);
    st->tx_off = 0;
    st->tx_len = tx_len;
    return 0;
}

void avmm_net_set_flags(struct avmm_net *n, uint32_t flags, uint32_t rx_frame_max)
{
    n->flags = flags;
    n->rx_frame_max = rx_frame_max > SCRATCH ? SCRATCH : rx_frame_max;
}

int avmm_net_queue_setup(struct avmm_net *n, int qi, uint16_t size, uint64_t desc, uint64_t avail, uint64_t used,
                         uint32_t vq_flags, struct avmm_irq *irq, int kick_fd)
{
    if (qi < 0 || qi >= 2 * n->npairs || size > n->queue_size_max)
        return -EINVAL;
    int r = avmm_vq_setup(&n->q[qi], n->mem, size, desc, avail, used, vq_flags, irq, kick_fd);
    n->q[qi].index = (uint16_t)qi;
    return r;
}

void avmm_net_reset(struct avmm_net *n)
{
    for (int i = 0; i < AVMM_NET_MAX_PAIRS; i++) {
        n->p[i].held_len = 0; /* a frame waiting for buffers is dropped with the rings */
        n->p[i].rx_want = 0;
    }
    for (int i = 0; i < 2 * AVMM_NET_MAX_PAIRS; i++) {
        memset(&n->q[i], 0, sizeof(n->q[i]));
        n->q[i].kick_fd = -1;
    }
}

struct avmm_vq *avmm_net_queue(struct avmm_net *n, int qi)
{
    return qi >= 0 && qi < 2 * AVMM_NET_MAX_PAIRS ? &n->q[qi] : NULL;
}

struct avmm_net_stats *avmm_net_stats(struct avmm_net *n, int pair)
{
    return pair >= 0 && pair < AVMM_NET_MAX_PAIRS ? &n->p[pair].stats : NULL;
}

/* ---- receive: TAP -> guest ------------------------------------------------------------ */

/* Pop RX chains until they hold `want` bytes (one chain without MRG_RXBUF), after the
 * `nchains` gathered already (0: start afresh; else *niov and *room go on from theirs).
 * Returns the chains gathered in all, -1 if the ring broke. Bad chains are answered on the
 * spot, each one more unit of `work`. `*dry`: it stopped because the ring had no more or
 * the budget is spent (rather than at a limit or at a bad chain behind good ones): coming
 * back can help. */
static int gather_rx(struct avmm_net *n, struct avmm_vq *q, struct pair *p, uint32_t *niov, uint64_t *room,
                     int *work, int *dry, uint64_t want, int nchains)
{
    if (!nchains) {
        *niov = 0;
        *room = 0;
    }
    *dry = 0;
    int mrg = n->flags & AVMM_NET_MRG_RXBUF;
    while (nchains < RX_MAX_CHAINS && *room < want && *niov < RX_IOV && *work < BUDGET) {
        struct avmm_chain *c = &n->rx_chain[nchains];
        c->iov = &n->rx_iov[*niov];
        c->iov_cap = RX_IOV - *niov;
        int r = avmm_vq_pop(q, n->mem, c);
        if (r < 0)
            return -1;
        if (r == 0) {
            *dry = 1;
            break;
        }
        /* RX buffers are device-writable, and there must be room for the header. A bad
         * chain is answered (empty) only when it comes first: the chains gathered are
         * always consecutive in the ring, so giving them back is one unpop. */
        if (c->err || c->nout || (nchains == 0 && c->in_len < AVMM_NET_HDR_LEN)) {
            if (nchains) {
                avmm_vq_unpop(q, 1);
                break;
            }
            p->stats.rx_bad_chains++;
            avmm_vq_push(q, c->head, 0);
            (*work)++;
            continue;
        }
        *niov += c->nin;
        *room += c->in_len;
        nchains++;
        if (!mrg)
            break;
    }
    if (*work >= BUDGET)
        *dry = 1;
    return nchains;
}

/* A frame of `len` bytes is in the first chains (or, `copy` != NULL, still to be copied
 * there): hand the guest as many chains as it fills, num_buffers saying how many; the
 * rest go back to the ring. */
static void deliver(struct avmm_net *n, struct avmm_vq *q, struct pair *p, int nchains, const uint8_t *copy,
                    uint32_t len, uint64_t room)
{
    (void)room;
    uint64_t left = len;
    uint16_t used = 0;
    for (int i = 0; i < nchains && left; i++) {
        struct avmm_chain *c = &n->rx_chain[i];
        uint64_t take = left < c->in_len ? left : c->in_len;
        if (copy)
            avmm_buf_to_iov(c->iov, c->nin, 0, copy + (len - left), take);
        left -= take;
        used++;
    }
    uint16_t num_buffers = used;
    avmm_buf_to_iov(n->rx_chain[0].iov, n->rx_chain[0].nin, NUM_BUFFERS_OFFSET, &num_buffers, 2);
    left = len;
    for (int i = 0; i < used; i++) {
        uint64_t take = left < n->rx_chain[i].in_len ? left : n->rx_chain[i].in_len;
        avmm_chain_mark_written(n->mem, &n->rx_chain[i], take); /* the frame is in it now */
        avmm_vq_push(q, n->rx_chain[i].head, (uint32_t)take);
        left -= take;
    }
    avmm_vq_unpop(q, (uint16_t)(nchains - used));
    p->stats.rx_packets++;
    p->stats.rx_bytes += len - AVMM_NET_HDR_LEN;
}

static int stream_rx(struct avmm_net *n, struct avmm_vq *q, struct pair *p, uint32_t *state);

/* A mergeable frame of `len` bytes filled the `*nchains` chains gathered (`*room` bytes)
 * and spilled the rest into scratch: gather more chains and copy the tail there (*room
 * then holds it). If the ring has not enough, the frame is copied aside (held, as a whole)
 * and every chain goes back: *nchains = 0. -1 if the ring broke. */
static int rx_spilled(struct avmm_net *n, struct avmm_vq *q, struct pair *p, int *nchains, uint32_t *niov,
                      uint64_t *room, int *work, uint32_t len)
{
    int first = *nchains;
    uint32_t first_iov = *niov;
    uint64_t first_room = *room, tail = len - first_room;
    int dry;
    int total = gather_rx(n, q, p, niov, room, work, &dry, len, first);
    if (total < 0)
        return -1;
    p->stats.rx_copied++;
    if (*room >= len) { /* the tail into the new chains, which follow the first in rx_iov */
        avmm_buf_to_iov(&n->rx_iov[first_iov], *niov - first_iov, 0, n->scratch, tail);
        *nchains = total;
        return 0;
    }
    /* Not enough buffers yet: the frame waits aside for the RX doorbell (avmm_net_rx's
     * held path, which also drops it if the whole ring could never hold it). */
    if (!p->held && !(p->held = malloc(SCRATCH))) {
        avmm_vq_unpop(q, (uint16_t)total);
        *nchains = 0;
        return 0;
    }
    avmm_iov_to_buf(n->rx_iov, first_iov, 0, p->held, first_room);
    memcpy(p->held + first_room, n->scratch, tail);
    p->held_len = len;
    p->stats.rx_held++;
    avmm_vq_unpop(q, (uint16_t)total);
    *nchains = 0;
    return 0;
}

int avmm_net_rx(struct avmm_net *n, int pair, uint32_t *state)
{
    *state = 0;
    if (pair < 0 || pair >= n->npairs)
        return 0;
    struct avmm_vq *q = &n->q[2 * pair];
    struct pair *p = &n->p[pair];
    if (!q->size || p->fd < 0)
        return 0;
    if (p->stream)
        return stream_rx(n, q, p, state);
    int frames = 0, work = 0;
    for (;; work++) {
        if (work >= BUDGET) {
            *state |= AVMM_NET_BUDGET;
            break;
        }
        uint32_t niov;
        uint64_t room;
        int dry;
        /* Mergeable buffers: as many as the next frame is expected to fill (rx_want, from
         * the last frames: a bulk TCP receive's 64 KiB frames, or one 4 KiB buffer for 1500
         * bytes), not as many as the largest frame could — popping and giving back a
         * dozen chains per small frame cost more than the frame. A frame larger than
         * expected spills into `scratch`, and its tail is copied into more chains. */
        int mrg = n->flags & AVMM_NET_MRG_RXBUF;
        uint64_t want = p->held_len ? p->held_len : mrg && p->rx_want ? p->rx_want : n->rx_frame_max;
        int nchains = gather_rx(n, q, p, &niov, &room, &work, &dry, want, 0);
        if (nchains < 0) {
            avmm_vq_publish(q);
            return -1;
        }
        if (nchains == 0) {
            /* Out of buffers: ask for the doorbell, and check once more (2.7.10). */
            if (avmm_vq_enable_notify(q))
                continue;
            *state |= AVMM_NET_RX_NO_BUFFERS;
            p->stats.rx_no_buffers++;
            break;
        }
        if (p->held_len) {
            /* A frame read earlier waits: it goes first, once the buffers hold it. */
            if (room < p->held_len && dry && nchains < q->size) {
                avmm_vq_unpop(q, (uint16_t)nchains);
                if (avmm_vq_enable_notify_more(q)) /* the buffers there are not enough */
                    continue;
                *state |= AVMM_NET_RX_NO_BUFFERS;
                p->stats.rx_no_buffers++;
                break;
            }
            if (room < p->held_len) { /* all the guest can post (or we take) does not hold it */
                p->stats.rx_too_long++;
                avmm_vq_unpop(q, (uint16_t)nchains);
            } else {
                deliver(n, q, p, nchains, p->held, p->held_len, room);
                frames++;
            }
            p->held_len = 0;
            continue;
        }
        /* The scratch buffer catches what does not fit, so a frame too large is seen. */
        n->rx_iov[niov].iov_base = n->scratch;
        n->rx_iov[niov].iov_len = SCRATCH;
        ssize_t len = readv(p->fd, n->rx_iov, (int)niov + 1);
        if (len < 0) {
            avmm_vq_unpop(q, (uint16_t)nchains);
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                *state |= AVMM_NET_RX_EMPTY;
            } else if (errno != EINTR) {
                p->stats.rx_errors++;
                *state |= AVMM_NET_RX_EMPTY;
            }
            if (errno != EINTR)
                break;
            continue;
        }
        if (mrg) /* expect the largest of the last frames, forgetting it slowly */
            p->rx_want = (uint64_t)len >= p->rx_want ? (uint32_t)len : p->rx_want - (p->rx_want - (uint32_t)len) / 16;
        if (mrg && (uint64_t)len > room && (uint64_t)len <= n->rx_frame_max) {
            if (rx_spilled(n, q, p, &nchains, &niov, &room, &work, (uint32_t)len) < 0) {
                avmm_vq_publish(q);
                return -1;
            }
            if (!nchains)
                continue; /* held aside for more buffers (or dropped): the loop's top says which */
        }
        if ((uint64_t)len > room || len < AVMM_NET_HDR_LEN) {
            p->stats.rx_too_long += (uint64_t)len > room;
            avmm_vq_unpop(q, (uint16_t)nchains); /* the buffers stay the guest's: try the next frame */
            continue;
        }
        deliver(n, q, p, nchains, NULL, (uint32_t)len, room);
        frames++;
    }
    if (frames)
        p->stats.rx_batches++;
    avmm_vq_publish(q);
    return frames;
}

static void stream_gone(struct pair *p, uint32_t *state)
{
    if (!p->stream->gone)
        *state |= AVMM_NET_PEER_GONE;
    p->stream->gone = 1;
    p->stream->tx_off = p->stream->tx_len = 0; /* a tail kept for a peer that is gone: never sent */
}

/* A whole frame (or a length no frame has, which stream_rx ends the stream on) waits in
 * the stream's buffer: stream_rx has something to do without reading. */
static int stream_has_frame(const struct stream *st)
{
    uint32_t have = st->rx_end - st->rx_start;
    if (st->gone || have < STREAM_LEN)
        return 0;
    const uint8_t *b = st->rx + st->rx_start;
    uint32_t flen = (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
    return flen < STREAM_FRAME_MIN || flen > STREAM_FRAME_MAX || have - STREAM_LEN >= flen;
}

/* Whole frames from the stream's buffer into RX chains; the buffer refilled by one read
 * whenever it holds no whole frame. */
static int stream_rx(struct avmm_net *n, struct avmm_vq *q, struct pair *p, uint32_t *state)
{
    struct stream *st = p->stream;
    int frames = 0, work = 0;
    while (!st->gone) {
        if (work >= BUDGET) {
            *state |= AVMM_NET_BUDGET;
            break;
        }
        uint32_t have = st->rx_end - st->rx_start;
        uint32_t flen = 0;
        if (have >= STREAM_LEN) {
            const uint8_t *b = st->rx + st->rx_start;
            flen = (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
            if (flen < STREAM_FRAME_MIN || flen > STREAM_FRAME_MAX) { /* not a frame: the stream is lost */
                p->stats.rx_errors++;
                p->stats.rx_bad_length++;
                stream_gone(p, state);
                break;
            }
        }
        if (have < STREAM_LEN || have - STREAM_LEN < flen) {
            /* No whole frame: move what there is to the front, and read more. */
            if (st->rx_start != STREAM_HEADROOM) {
                memmove(st->rx + STREAM_HEADROOM, st->rx + st->rx_start, have);
                st->rx_start = STREAM_HEADROOM;
                st->rx_end = STREAM_HEADROOM + have;
            }
            ssize_t r = read(p->fd, st->rx + st->rx_end, STREAM_RX_BUF - st->rx_end);
            if (r < 0 && errno == EINTR)
                continue;
            if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                *state |= AVMM_NET_RX_EMPTY;
                break;
            }
            if (r <= 0) { /* EOF or ECONNRESET: the peer is gone */
                if (r < 0)
                    p->stats.rx_errors++;
                stream_gone(p, state);
                break;
            }
            st->rx_end += (uint32_t)r;
            p->stats.rx_reads++;
            continue;
        }
        work++;
        uint64_t len = AVMM_NET_HDR_LEN + (uint64_t)flen;
        uint8_t *frame = st->rx + st->rx_start + STREAM_LEN - AVMM_NET_HDR_LEN;
        if (len > n->rx_frame_max) { /* larger than the guest may be given */
            p->stats.rx_too_long++;
            st->rx_start += STREAM_LEN + flen;
            continue;
        }
        uint32_t niov;
        uint64_t room;
        int dry;
        int nchains = gather_rx(n, q, p, &niov, &room, &work, &dry, len, 0);
        if (nchains < 0) {
            avmm_vq_publish(q);
            return -1;
        }
        if (nchains == 0 || (room < len && dry && nchains < q->size)) {
            /* Not enough buffers yet: the frame waits in the buffer for the RX doorbell. */
            avmm_vq_unpop(q, (uint16_t)nchains);
            if (nchains ? avmm_vq_enable_notify_more(q) : avmm_vq_enable_notify(q))
                continue;
            *state |= AVMM_NET_RX_NO_BUFFERS;
            p->stats.rx_no_buffers++;
            break;
        }
        if (room < len) { /* all the chains we may take do not hold it */
            p->stats.rx_too_long++;
            avmm_vq_unpop(q, (uint16_t)nchains);
        } else {
            memset(frame, 0, AVMM_NET_HDR_LEN); /* no offloads: a plain frame */
            deliver(n, q, p, nchains, frame, (uint32_t)len, room);
            frames++;
        }
        st->rx_start += STREAM_LEN + flen;
    }
    if (st->rx_start == st->rx_end)
        st->rx_start = st->rx_end = STREAM_HEADROOM;
    if (frames)
        p->stats.rx_batches++;
    avmm_vq_publish(q);
    return frames;
}

/* ---- transmit: guest -> TAP ----------------------------------------------------------- */

/* The tail of a frame the socket took in part goes first: 0 sent, 1 blocked, -1 gone. */
static int stream_flush(struct pair *p)
{
    struct stream *st = p->stream;
    while (st->tx_off < st->tx_len) {
        ssize_t w = send(p->fd, st->tx + st->tx_off, st->tx_len - st->tx_off, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return 1;
        if (w < 0)
            return -1;
        st->tx_off += (uint32_t)w;
    }
    st->tx_off = st->tx_len = 0;
    return 0;
}

/* One TX chain on the stream: its length, then the frame without the vnet header.
 * 1 sent (whole, or its tail kept), 0 blocked (the chain stays in the ring), -1 gone. */
static int stream_send(struct avmm_net *n, struct pair *p, struct avmm_chain *c)
{
    struct stream *st = p->stream;
    uint32_t flen = (uint32_t)(c->out_len - AVMM_NET_HDR_LEN); /* checked: within STREAM_TX_FRAME_MIN..MAX */
    uint8_t len[STREAM_LEN] = {(uint8_t)(flen >> 24), (uint8_t)(flen >> 16), (uint8_t)(flen >> 8), (uint8_t)flen};
    struct iovec iov[TX_IOV + 1];
    int niov = 1;
    iov[0] = (struct iovec){.iov_base = len, .iov_len = STREAM_LEN};
    size_t skip = AVMM_NET_HDR_LEN;
    for (uint32_t i = 0; i < c->nout; i++) {
        size_t l = c->iov[i].iov_len;
        if (skip >= l) {
            skip -= l;
            continue;
        }
        iov[niov++] = (struct iovec){.iov_base = (uint8_t *)c->iov[i].iov_base + skip, .iov_len = l - skip};
        skip = 0;
    }
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)niov};
    ssize_t w;
    do {
        w = sendmsg(p->fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    } while (w < 0 && errno == EINTR);
    if (w < 0)
        return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -1;
    size_t total = STREAM_LEN + (size_t)flen;
    if ((size_t)w < total) { /* the rest waits here: a stream cannot take half a frame back */
        size_t tail = total - (size_t)w;
        uint8_t *dst = st->tx;
        if ((size_t)w < STREAM_LEN) {
            memcpy(dst, len + w, STREAM_LEN - (size_t)w);
            dst += STREAM_LEN - (size_t)w;
            avmm_iov_to_buf(c->iov, c->nout, AVMM_NET_HDR_LEN, dst, flen);
        } else {
            avmm_iov_to_buf(c->iov, c->nout, AVMM_NET_HDR_LEN + ((size_t)w - STREAM_LEN), dst, tail);
        }
        st->tx_off = 0;
        st->tx_len = (uint32_t)tail;
        p->stats.tx_partial++;
    }
    (void)n;
    return 1;
}

int avmm_net_tx(struct avmm_net *n, int pair, uint32_t *state)
{
    *state = 0;
    if (pair < 0 || pair >= n->npairs)
        return 0;
    struct avmm_vq *q = &n->q[2 * pair + 1];
    struct pair *p = &n->p[pair];
    if (!q->size || p->fd < 0)
        return 0;
    avmm_vq_drain_kick(q);
    struct stream *st = p->stream;
    if (st && !st->gone) {
        int r = stream_flush(p);
        if (r > 0) {
            p->stats.tx_blocked++;
            *state |= AVMM_NET_TX_BLOCKED;
            return 0;
        }
        if (r < 0)
            stream_gone(p, state);
    }
    int frames = 0;
    for (int work = 0;; work++) {
        if (work >= BUDGET) {
            /* The caller comes back; meanwhile a doorbell must still come for what is next. */
            avmm_vq_enable_notify(q);
            *state |= AVMM_NET_BUDGET;
            break;
        }
        struct avmm_chain c = {.iov = n->tx_iov, .iov_cap = TX_IOV};
        int r = avmm_vq_pop(q, n->mem, &c);
        if (r < 0) {
            avmm_vq_publish(q);
            return -1;
        }
        if (r == 0) {
            if (avmm_vq_enable_notify(q))
                continue;
            break;
        }
        if (c.err || c.nin || c.out_len < AVMM_NET_HDR_LEN) {
            p->stats.tx_bad_chains++;
            avmm_vq_push(q, c.head, 0);
            continue;
        }
        if (st) {
            uint64_t flen = c.out_len - AVMM_NET_HDR_LEN;
            int r = -1;
            if (!st->gone)
                r = flen < STREAM_TX_FRAME_MIN || flen > STREAM_TX_FRAME_MAX ? -2 : stream_send(n, p, &c);
            if (r == 0) {
                avmm_vq_unpop(q, 1);
                p->stats.tx_blocked++;
                *state |= AVMM_NET_TX_BLOCKED;
                break;
            }
            if (r == -1 && !st->gone)
                stream_gone(p, state);
            if (r < 0) { /* the link is down (or the peer takes no frame of that size): dropped */
                p->stats.tx_errors++;
            } else {
                p->stats.tx_packets++;
                p->stats.tx_bytes += c.out_len - AVMM_NET_HDR_LEN;
                frames++;
            }
            avmm_vq_push(q, c.head, 0);
            if (st->tx_len && !st->gone) { /* a tail waits: nothing more until the socket is writable */
                p->stats.tx_blocked++;
                *state |= AVMM_NET_TX_BLOCKED;
                break;
            }
            continue;
        }
        /* A frame in one buffer (Linux pushes the header in front of a linear frame) goes
         * with write(): writev's iovec import and checks cost the TAP ~0.1 µs a frame. */
        ssize_t w = c.nout == 1 ? write(p->fd, c.iov[0].iov_base, c.iov[0].iov_len) : writev(p->fd, c.iov, (int)c.nout);
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            avmm_vq_unpop(q, 1); /* kept in the ring: sent when the TAP is writable again */
            p->stats.tx_blocked++;
            *state |= AVMM_NET_TX_BLOCKED;
            break;
        }
        if (w < 0 && errno == EINTR) {
            avmm_vq_unpop(q, 1);
            continue;
        }
        if (w < 0)
            p->stats.tx_errors++; /* the TAP refused the frame (EINVAL: a bad vnet header) */
        else {
            p->stats.tx_packets++;
            p->stats.tx_bytes += c.out_len - AVMM_NET_HDR_LEN;
            frames++;
        }
        avmm_vq_push(q, c.head, 0);
    }
    if (frames)
        p->stats.tx_batches++;
    avmm_vq_publish(q);
    return frames;
}

/* TX doorbells while the poll looks at the rings itself: each one costs the driver an
 * ioeventfd write (on a guest, a vCPU exit) for a frame the poll finds anyway. Off on
 * every pair for the spin (avmm_vq_disable_notify), on again before the poll returns. */
static void tx_doorbells_off(struct avmm_net *n, int npairs)
{
    for (int i = 0; i < npairs; i++)
        avmm_vq_disable_notify(&n->q[2 * i + 1]);
}

/* On again, and re-checked after the barrier (virtio 1.2 §2.7.10): a ring that got frames
 * while they were off, other than the one the caller serves next (`serving`; -1: none),
 * gets the doorbell its driver did not ring, so whoever waits next on it wakes. */
static void tx_doorbells_on(struct avmm_net *n, int npairs, int serving)
{
    for (int i = 0; i < npairs; i++) {
        struct avmm_vq *tx = &n->q[2 * i + 1];
        if (tx->size && !tx->broken && avmm_vq_enable_notify(tx) && i != serving && tx->kick_fd >= 0)
            avmm_efd_signal(tx->kick_fd);
    }
}

int avmm_net_poll(struct avmm_net *n, int npairs, uint64_t max_ns, const int *stop, uint32_t *state, int *pair)
{
    struct pollfd fds[AVMM_NET_MAX_PAIRS];
    int nfds = 0, map[AVMM_NET_MAX_PAIRS];
    if (npairs > n->npairs)
        npairs = n->npairs;
    *state = 0;
    tx_doorbells_off(n, npairs);
    uint64_t deadline = avmm_now_ns() + max_ns;
    do {
        /* TX buffers are a memory read away; a frame on a TAP costs a poll() to see. */
        for (int spin = 0; spin < 64; spin++) {
            for (int i = 0; i < npairs; i++) {
                struct avmm_vq *tx = &n->q[2 * i + 1];
                if (tx->size && !tx->broken && avmm_vq_pending(tx)) {
                    *pair = i;
                    tx_doorbells_on(n, npairs, i);
                    return avmm_net_tx(n, i, state);
                }
            }
            __builtin_ia32_pause();
        }
        nfds = 0;
        for (int i = 0; i < npairs; i++) {
            struct avmm_vq *rx = &n->q[2 * i];
            struct stream *st = n->p[i].stream;
            if ((n->p[i].held_len || (st && stream_has_frame(st))) && rx->size && !rx->broken &&
                avmm_vq_pending(rx)) {
                *pair = i; /* a frame held for buffers, and buffers came */
                tx_doorbells_on(n, npairs, -1);
                return avmm_net_rx(n, i, state);
            }
            /* A gone stream's socket is readable for ever (EOF) and has nothing for us. */
            if (rx->size && !rx->broken && n->p[i].fd >= 0 && !(st && st->gone) && avmm_vq_pending(rx)) {
                fds[nfds] = (struct pollfd){.fd = n->p[i].fd, .events = POLLIN};
                map[nfds++] = i;
            }
        }
        if (nfds && poll(fds, (nfds_t)nfds, 0) > 0)
            for (int k = 0; k < nfds; k++)
                if (fds[k].revents & POLLIN) {
                    *pair = map[k];
                    tx_doorbells_on(n, npairs, -1);
                    return avmm_net_rx(n, map[k], state);
                }
    } while (avmm_now_ns() < deadline && !(stop && __atomic_load_n(stop, __ATOMIC_ACQUIRE)));
    tx_doorbells_on(n, npairs, -1);
    return 0;
}
