/*
 * libFuzzer target: virtio-net on a stream pair (cext/net.c's passt path, over
 * cext/virtq.c). What the peer (passt, or anything at the other end of the socket) sends
 * is the fuzzer's: any 32-bit big-endian lengths and bytes, cut anywhere across reads. The
 * guest's rings and buffers are the fuzzer's too, and so are the socket's moods: a peer that
 * stops reading (a partial frame kept, TX_BLOCKED), one that closes (PEER_GONE), a device
 * reset that carries the stream's kept bytes over to a new device on the same socket.
 *
 * Invariants beyond "no crash": every guest buffer handed to sendmsg is inside guest RAM
 * (a wrapper checks it; iov[0] is the device's own length word); what the peer receives is
 * always a well-framed stream of frames passt accepts (each length within [14, 65535], the
 * frame whole after it), however sends were cut; used entries name real heads.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#define FUZZ_WRAP_VQ_PUSH /* fakemem.h checks every used entry pushed */
#include "fakemem.h"
#include "net.h"

static struct fakemem mem;
static int efd = -1;

ssize_t __real_sendmsg(int fd, const struct msghdr *msg, int flags);

ssize_t __wrap_sendmsg(int fd, const struct msghdr *msg, int flags)
{
    FUZZ_CHECK(msg->msg_iovlen >= 1 && msg->msg_iov[0].iov_len == 4);
    fakemem_check_iov(&mem, msg->msg_iov + 1, (uint32_t)msg->msg_iovlen - 1);
    return __real_sendmsg(fd, msg, flags);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    fakemem_init(&mem);
    efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    return 0;
}

/* The peer's side of the stream the device sends: frames parsed as passt parses them,
 * across reads. A length passt would reset the connection for is an invariant broken. */
struct peer_parser {
    uint8_t len[4];
    uint32_t have_len; /* bytes of the length word seen */
    uint32_t left;     /* bytes of the current frame still to come */
};

static void peer_read(int fd, struct peer_parser *pp)
{
    static uint8_t buf[1 << 16];
    ssize_t r;
    while ((r = read(fd, buf, sizeof(buf))) > 0) {
        for (ssize_t i = 0; i < r;) {
            if (pp->left) {
                uint32_t take = (uint32_t)(r - i) < pp->left ? (uint32_t)(r - i) : pp->left;
                pp->left -= take;
                i += take;
                continue;
            }
            pp->len[pp->have_len++] = buf[i++];
            if (pp->have_len == 4) {
                uint32_t flen = (uint32_t)pp->len[0] << 24 | (uint32_t)pp->len[1] << 16 |
                                (uint32_t)pp->len[2] << 8 | pp->len[3];
                FUZZ_CHECK(flen >= 14 && flen <= 65535);
                pp->left = flen;
                pp->have_len = 0;
            }
        }
    }
}

static struct avmm_net *new_device(int fd, uint8_t mode)
{
    struct avmm_net *n = avmm_net_new(&mem.gmem, 1, 256);
    FUZZ_CHECK(n);
    FUZZ_CHECK(avmm_net_set_stream(n, 0, fd) == 0);
    avmm_net_set_flags(n, mode & AVMM_NET_MRG_RXBUF, 12 + 1514 + (mode & 2 ? 64000 : 0));
    return n;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct cursor ctl;
    fuzz_begin(&mem, data, size, &ctl);

    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0)
        abort();
    int small = 4096; /* small buffers: sends are cut, tails kept */
    setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &small, sizeof(small));
    setsockopt(sv[1], SOL_SOCKET, SO_RCVBUF, &small, sizeof(small));

    uint8_t mode = take8(&ctl);
    struct avmm_net *n = new_device(sv[0], mode);
    struct avmm_irq irq = {.efd = efd};
    struct peer_parser pp = {0};
    static uint8_t chunk[4096];
    static uint8_t carry_rx[AVMM_NET_STREAM_CARRY_RX], carry_tx[AVMM_NET_STREAM_CARRY_TX];
    uint32_t state;
    int peer_open = 1;

    for (int ops = 0; ctl.n && ops < 256; ops++) {
        uint8_t op = take8(&ctl);
        int qi = (op >> 4) & 1, r;
        switch (op % 8) {
        case 0: { /* the driver sets queue qi (0 RX, 1 TX) up */
            struct fuzz_queue g = take_queue(&ctl, 9);
            r = avmm_net_queue_setup(n, qi, g.size, g.desc, g.driver, g.device, g.flags, &irq, efd);
            FUZZ_CHECK(r == 0 || r == -EINVAL || r == -EFAULT);
            break;
        }
        case 1: { /* the peer sends bytes: raw from the input (lengths and frames, cut anywhere) */
            size_t len = take_bytes(&ctl, chunk, 1 + take8(&ctl) % 64);
            if (peer_open && write(sv[1], chunk, len) < 0) {
                /* full: the peer would wait; these bytes are simply not sent */
            }
            break;
        }
        case 2: { /* the peer sends one well-framed frame of a length the input picks */
            uint16_t flen = take16(&ctl);
            uint8_t hdr[4] = {0, 0, (uint8_t)(flen >> 8), (uint8_t)flen};
            if (peer_open && write(sv[1], hdr, 4) == 4) {
                memset(chunk, 0xA5, sizeof(chunk));
                for (uint32_t left = flen; left;) {
                    uint32_t w = left < sizeof(chunk) ? left : sizeof(chunk);
                    if (write(sv[1], chunk, w) != (ssize_t)w)
                        break;
                    left -= w;
                }
            }
            break;
        }
        case 3:
            r = avmm_net_rx(n, 0, &state);
            FUZZ_CHECK(r >= -1 && r <= 128);
            break;
        case 4:
            r = avmm_net_tx(n, 0, &state);
            FUZZ_CHECK(r >= -1 && r <= 128);
            break;
        case 5: /* the peer reads what TX sent (and checks its framing) */
            if (peer_open)
                peer_read(sv[1], &pp);
            break;
        case 6: /* the driver writes two bytes anywhere in region 0 */
            fakemem_poke(&mem, &ctl);
            break;
        case 7:
            switch (take8(&ctl) % 4) {
            case 0: { /* a device reset: a new device takes the stream's kept bytes over */
                uint32_t rx_len, tx_len;
                FUZZ_CHECK(avmm_net_stream_carry_out(n, 0, carry_rx, &rx_len, carry_tx, &tx_len) == 0);
                avmm_net_free(n);
                n = new_device(sv[0], mode);
                FUZZ_CHECK(avmm_net_stream_carry_in(n, 0, carry_rx, rx_len, carry_tx, tx_len) == 0);
                break;
            }
            case 1:
                avmm_net_reset(n);
                break;
            case 2: { /* the peer goes away */
                if (peer_open) {
                    peer_read(sv[1], &pp);
                    close(sv[1]);
                    peer_open = 0;
                }
                break;
            }
            default: {
                int pair;
                avmm_net_poll(n, 1, 0, NULL, &state, &pair);
                break;
            }
            }
            break;
        }
    }
    avmm_net_free(n);
    if (peer_open) {
        peer_read(sv[1], &pp);
        close(sv[1]);
    }
    close(sv[0]);
    return 0;
}
