/*
 * tapbench: the limits virtio-net is measured against (perf/net.py), and the far end.
 *
 *   tapbench tx   IFNAME LEN COUNT [MSS]   write COUNT frames of LEN bytes to the TAP
 *                                          (a vnet header first; MSS > 0: a TSO frame)
 *   tapbench rx   IFNAME COUNT [TSO]       read COUNT frames from the TAP (TSO=1: the TAP
 *                                          may hand over 64 KiB segments)
 *   tapbench ping IFNAME LEN COUNT         write a frame, read the echo, COUNT times
 *   tapbench gen  IFNAME LEN COUNT [MSS]   (in the TAP's namespace) send COUNT frames into
 *                                          the TAP through AF_PACKET (sendmmsg batches)
 *   tapbench echo IFNAME                   (same) send every 0x88B5 frame back, until killed
 *
 * tx/rx/ping open the TAP themselves, exactly as asyncvmm does (IFF_TAP | IFF_NO_PI |
 * IFF_VNET_HDR, a 12-byte header): what the kernel lets one program do with that TAP is
 * the limit. Output: one JSON line.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if_packet.h>
#include <linux/if_tun.h>
#include <linux/virtio_net.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define ETHERTYPE_BENCH 0x88B5
#define MAXFRAME (65536 + 256)
#define HDR 12

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void die(const char *what)
{
    fprintf(stderr, "tapbench: %s: %s\n", what, strerror(errno));
    exit(1);
}

static int open_tap(const char *name)
{
    int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
    if (fd < 0)
        die("/dev/net/tun");
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", name);
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    if (ioctl(fd, TUNSETIFF, &ifr) < 0)
        die("TUNSETIFF");
    int hdr = HDR;
    if (ioctl(fd, TUNSETVNETHDRSZ, &hdr) < 0)
        die("TUNSETVNETHDRSZ");
    return fd;
}

/* vnet header + Ethernet (+ IPv4/TCP for TSO) frame of `len` bytes after the header */
static size_t build(uint8_t *buf, size_t len, unsigned mss, const uint8_t dst[6], const uint8_t src[6])
{
    memset(buf, 0, HDR + len);
    struct virtio_net_hdr_v1 *h = (void *)buf;
    uint8_t *f = buf + HDR;
    memcpy(f, dst, 6);
    memcpy(f + 6, src, 6);
    if (!mss) {
        f[12] = ETHERTYPE_BENCH >> 8;
        f[13] = ETHERTYPE_BENCH & 0xFF;
        for (size_t i = 14; i < len; i++)
            f[i] = (uint8_t)i;
        return HDR + len;
    }
    f[12] = 0x08;
    uint8_t *ip = f + 14, *tcp = ip + 20;
    uint16_t tot = (uint16_t)(len - 14);
    ip[0] = 0x45;
    ip[2] = tot >> 8;
    ip[3] = tot & 0xFF;
    ip[6] = 0x40;
    ip[8] = 64;
    ip[9] = 6;
    memcpy(ip + 12, (uint8_t[]){10, 99, 0, 2}, 4);
    memcpy(ip + 16, (uint8_t[]){10, 99, 0, 1}, 4);
    tcp[0] = 0x13, tcp[1] = 0x89, tcp[2] = 0x9c, tcp[3] = 0x40;
    tcp[12] = 5 << 4;
    tcp[13] = 0x18;
    tcp[14] = 0xff, tcp[15] = 0xff;
    h->flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    h->gso_type = VIRTIO_NET_HDR_GSO_TCPV4;
    h->hdr_len = 54;
    h->gso_size = (uint16_t)mss;
    h->csum_start = 34;
    h->csum_offset = 16;
    return HDR + len;
}

static const uint8_t GUEST[6] = {0x52, 0x54, 0x00, 0xbe, 0x0c, 0x01};
static const uint8_t PEER[6] = {0x02, 0x00, 0x00, 0x00, 0x00, 0x01};

static int cmd_tx(const char *ifname, size_t len, uint64_t count, unsigned mss)
{
    int fd = open_tap(ifname);
    static uint8_t buf[MAXFRAME];
    size_t n = build(buf, len, mss, PEER, GUEST);
    uint64_t c0 = cpu_ns(), t0 = now_ns();
    for (uint64_t i = 0; i < count; i++)
        if (write(fd, buf, n) < 0 && errno != EINTR)
            die("write");
    uint64_t ns = now_ns() - t0, cpu = cpu_ns() - c0;
    printf("{\"frames\": %lu, \"bytes\": %lu, \"ns\": %lu, \"cpu_ns\": %lu}\n", count, count * (len), ns, cpu);
    close(fd);
    return 0;
}

static int cmd_rx(const char *ifname, uint64_t count, int tso)
{
    int fd = open_tap(ifname);
    if (ioctl(fd, TUNSETOFFLOAD, tso ? TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 : 0) < 0)
        die("TUNSETOFFLOAD");
    static uint8_t buf[MAXFRAME];
    uint64_t frames = 0, bytes = 0, c0 = 0, t0 = 0;
    printf("{\"ready\": 1}\n");
    fflush(stdout);
    while (frames < count) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, 5000) <= 0)
            break;
        ssize_t r = read(fd, buf, sizeof(buf));
        if (r < 0)
            continue;
        if (r < HDR + 14 || ((buf[HDR + 12] << 8 | buf[HDR + 13]) != ETHERTYPE_BENCH &&
                             (buf[HDR + 12] << 8 | buf[HDR + 13]) != 0x0800))
            continue;
        if (!frames) {
            t0 = now_ns();
            c0 = cpu_ns();
        }
        frames++;
        bytes += (uint64_t)r - HDR;
    }
    uint64_t ns = now_ns() - t0, cpu = cpu_ns() - c0;
    printf("{\"frames\": %lu, \"bytes\": %lu, \"ns\": %lu, \"cpu_ns\": %lu}\n", frames, bytes, ns, cpu);
    close(fd);
    return 0;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static int cmd_ping(const char *ifname, size_t len, uint64_t count)
{
    int fd = open_tap(ifname);
    static uint8_t buf[MAXFRAME], in[MAXFRAME];
    size_t n = build(buf, len, 0, PEER, GUEST);
    uint64_t *lat = calloc(count, sizeof(*lat)), done = 0;
    for (; done < count; done++) {
        uint64_t t = now_ns();
        if (write(fd, buf, n) < 0)
            die("write");
        for (;;) {
            struct pollfd p = {.fd = fd, .events = POLLIN};
            if (poll(&p, 1, 2000) <= 0)
                goto out;
            ssize_t r = read(fd, in, sizeof(in));
            if (r >= HDR + 14 && (in[HDR + 12] << 8 | in[HDR + 13]) == ETHERTYPE_BENCH)
                break;
        }
        lat[done] = now_ns() - t;
    }
out:
    qsort(lat, done, sizeof(*lat), cmp_u64);
    printf("{\"frames\": %lu, \"p50_ns\": %lu, \"p99_ns\": %lu}\n", done, done ? lat[done / 2] : 0,
           done ? lat[done * 99 / 100] : 0);
    close(fd);
    return 0;
}

static int packet_socket(const char *ifname, int vnet)
{
    int s = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ALL));
    if (s < 0)
        die("AF_PACKET");
    if (vnet && setsockopt(s, SOL_PACKET, PACKET_VNET_HDR, &vnet, sizeof(vnet)) < 0)
        die("PACKET_VNET_HDR");
    int big = 64 << 20;
    setsockopt(s, SOL_SOCKET, SO_SNDBUFFORCE, &big, sizeof(big));
    setsockopt(s, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof(big));
    struct sockaddr_ll a = {.sll_family = AF_PACKET, .sll_protocol = htons(ETH_P_ALL),
                            .sll_ifindex = (int)if_nametoindex(ifname)};
    if (!a.sll_ifindex || bind(s, (struct sockaddr *)&a, sizeof(a)) < 0)
        die("bind");
    return s;
}

static int cmd_gen(const char *ifname, size_t len, uint64_t count, unsigned mss, const uint8_t dst[6])
{
    int s = packet_socket(ifname, mss ? 1 : 0);
    static uint8_t buf[MAXFRAME];
    build(buf, len, mss, dst, PEER);
    /* PACKET_VNET_HDR takes the 10-byte struct virtio_net_hdr: the v1 header minus num_buffers */
    uint8_t *start = mss ? buf + HDR - 10 : buf + HDR;
    if (mss)
        memmove(start, buf, 10);
    size_t n = mss ? len + 10 : len;
    enum { BATCH = 64 };
    struct mmsghdr m[BATCH];
    struct iovec v[BATCH];
    for (int i = 0; i < BATCH; i++) {
        v[i] = (struct iovec){start, n};
        m[i] = (struct mmsghdr){.msg_hdr = {.msg_iov = &v[i], .msg_iovlen = 1}};
    }
    uint64_t sent = 0, t0 = now_ns();
    while (sent < count) {
        int want = count - sent < BATCH ? (int)(count - sent) : BATCH;
        int r = sendmmsg(s, m, (unsigned)want, 0);
        if (r < 0) {
            if (errno == ENOBUFS || errno == EAGAIN) {
                usleep(50);
                continue;
            }
            die("sendmmsg");
        }
        sent += (uint64_t)r;
    }
    printf("{\"frames\": %lu, \"ns\": %lu}\n", sent, now_ns() - t0);
    return 0;
}

static _Noreturn void cmd_echo(const char *ifname)
{
    int s = packet_socket(ifname, 0);
    static uint8_t buf[MAXFRAME];
    printf("{\"ready\": 1}\n");
    fflush(stdout);
    for (;;) {
        struct sockaddr_ll from;
        socklen_t fl = sizeof(from);
        ssize_t r = recvfrom(s, buf, sizeof(buf), 0, (struct sockaddr *)&from, &fl);
        if (r < 14 || from.sll_pkttype == PACKET_OUTGOING)
            continue;
        if ((buf[12] << 8 | buf[13]) != ETHERTYPE_BENCH)
            continue;
        uint8_t tmp[6];
        memcpy(tmp, buf, 6);
        memcpy(buf, buf + 6, 6);
        memcpy(buf + 6, tmp, 6);
        if (send(s, buf, (size_t)r, 0) < 0 && errno != ENOBUFS)
            die("send");
    }
}

static int parse_mac(const char *s, uint8_t mac[6])
{
    return sscanf(s, "%hhx:%hhx:%hhx:%hhx:%hhx:%hhx", &mac[0], &mac[1], &mac[2], &mac[3], &mac[4], &mac[5]) == 6;
}

int main(int argc, char **argv)
{
    if (argc >= 5 && !strcmp(argv[1], "tx"))
        return cmd_tx(argv[2], strtoul(argv[3], 0, 0), strtoull(argv[4], 0, 0), argc > 5 ? (unsigned)atoi(argv[5]) : 0);
    if (argc >= 4 && !strcmp(argv[1], "rx"))
        return cmd_rx(argv[2], strtoull(argv[3], 0, 0), argc > 4 && atoi(argv[4]));
    if (argc >= 5 && !strcmp(argv[1], "ping"))
        return cmd_ping(argv[2], strtoul(argv[3], 0, 0), strtoull(argv[4], 0, 0));
    if (argc >= 6 && !strcmp(argv[1], "gen")) {
        uint8_t dst[6];
        if (!parse_mac(argv[5], dst))
            return 2;
        return cmd_gen(argv[2], strtoul(argv[3], 0, 0), strtoull(argv[4], 0, 0), argc > 6 ? (unsigned)atoi(argv[6]) : 0,
                       dst);
    }
    if (argc >= 3 && !strcmp(argv[1], "echo"))
        cmd_echo(argv[2]);
    fprintf(stderr, "usage: tapbench tx|rx|ping|gen|echo ... (see the source)\n");
    return 2;
}
