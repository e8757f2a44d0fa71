/*
 * libFuzzer target: virtio-net's data path (cext/net.c over cext/virtq.c): TX chains with
 * any header and buffers, RX buffers of any shape (with and without MRG_RXBUF), frames of
 * any length arriving from the "TAP", a TAP that stops taking frames (EAGAIN), resets.
 *
 * The TAP is a non-blocking AF_UNIX datagram socketpair: like a TAP it keeps frame
 * boundaries, reads one frame per read, and says EAGAIN when empty or full. What it cannot
 * do is refuse a bad vnet header (EINVAL): that path is not reached here. The wrappers of
 * readv/writev (-Wl,--wrap=readv,--wrap=writev) check that every buffer handed to the host
 * is inside guest RAM (but RX's last one: the device's own scratch buffer).
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
static int sv[2] = {-1, -1}, efd = -1;

ssize_t __real_readv(int fd, const struct iovec *iov, int n);
ssize_t __real_writev(int fd, const struct iovec *iov, int n);

ssize_t __wrap_readv(int fd, const struct iovec *iov, int n)
{
    FUZZ_CHECK(n > 0);
    fakemem_check_iov(&mem, iov, (uint32_t)n - 1);
    return __real_readv(fd, iov, n);
}

ssize_t __wrap_writev(int fd, const struct iovec *iov, int n)
{
    FUZZ_CHECK(n > 0);
    fakemem_check_iov(&mem, iov, (uint32_t)n);
    return __real_writev(fd, iov, n);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    fakemem_init(&mem);
    if (socketpair(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0)
        abort();
    int small = 65536 * 4;
    setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &small, sizeof(small));
    efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    return 0;
}

static void drain_peer(void)
{
    static uint8_t sink[70000];
    while (read(sv[1], sink, sizeof(sink)) > 0) {
    }
    while (read(sv[0], sink, sizeof(sink)) > 0) {
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct cursor ctl;
    fuzz_begin(&mem, data, size, &ctl);
    drain_peer();

    struct avmm_net *n = avmm_net_new(&mem.gmem, 1, 256);
    FUZZ_CHECK(n);
    avmm_net_set_tap(n, 0, sv[0]);
    uint8_t mode = take8(&ctl);
    avmm_net_set_flags(n, mode & AVMM_NET_MRG_RXBUF, 12 + 60 + take16(&ctl) % 65536);
    struct avmm_irq irq = {.efd = efd};
    static uint8_t frame[65536 + 512];
    uint32_t state;

    for (int ops = 0; ctl.n && ops < 256; ops++) {
        uint8_t op = take8(&ctl);
        int qi = (op >> 4) & 1, r;
        switch (op % 7) {
        case 0: { /* the driver sets queue qi (0 RX, 1 TX) up */
            struct fuzz_queue g = take_queue(&ctl, 9);
            r = avmm_net_queue_setup(n, qi, g.size, g.desc, g.driver, g.device, g.flags, &irq, efd);
            FUZZ_CHECK(r == 0 || r == -EINVAL || r == -EFAULT);
            break;
        }
        case 1: { /* a frame arrives on the TAP (vnet header included): a length, a byte pattern */
            size_t len = take16(&ctl) % sizeof(frame);
            size_t off = take16(&ctl);
            for (size_t i = 0; i < len; i++)
                frame[i] = (uint8_t)(i + off);
            if (write(sv[1], frame, len) < 0) {
                /* full: the frame is lost, as a TAP's queue drops */
            }
            break;
        }
        case 2:
            r = avmm_net_rx(n, 0, &state);
            FUZZ_CHECK(r >= -1 && r <= 128);
            break;
        case 3:
            r = avmm_net_tx(n, 0, &state);
            FUZZ_CHECK(r >= -1 && r <= 128);
            break;
        case 4: /* the host side reads what TX sent, unblocking it */
            drain_peer();
            break;
        case 5: /* the driver writes two bytes anywhere in region 0 */
            fakemem_poke(&mem, &ctl);
            break;
        case 6:
            if (take8(&ctl) & 1) {
                avmm_net_reset(n);
            } else {
                int pair;
                avmm_net_poll(n, 1, 0, NULL, &state, &pair);
            }
            break;
        }
    }
    avmm_net_free(n);
    drain_peer();
    return 0;
}
