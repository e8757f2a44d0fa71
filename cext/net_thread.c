/* virtio-net's own thread on a TAP: see net_thread.h. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>

#include "devthread.h"
#include "net_thread.h"
#include "util.h"

struct avmm_net_thread {
    struct avmm_devthread d; /* wake_fd is in every ppoll */
    struct avmm_net *n;
    struct avmm_net_thread_config cfg;
    struct avmm_net_thread_stats stats;
    /* the thread's own */
    uint32_t want_rx, want_tx; /* pairs to serve before the next wait (bits) */
    uint8_t rx_stopped[AVMM_NET_MAX_PAIRS]; /* no RX buffers: the TAP is not polled */
    uint8_t tx_blocked[AVMM_NET_MAX_PAIRS]; /* a frame waits for the TAP's POLLOUT */
    uint8_t tap_error[AVMM_NET_MAX_PAIRS];  /* POLLERR/POLLHUP alone: not polled until the next park */
    int moved; /* frames since the last wait or poll: the next may come within the window */
};

static int any_broken(struct avmm_net_thread *t)
{
    for (uint32_t qi = 0; qi < 2 * t->cfg.npairs; qi++)
        if (avmm_net_queue(t->n, (int)qi)->broken)
            return 1;
    return 0;
}

/* What a batch's state asks of the pair: flow control, and another round for a budget. */
static void after(struct avmm_net_thread *t, uint32_t p, int moved, uint32_t state)
{
    if (moved < 0) {
        t->stats.broken = 1;
        return;
    }
    t->moved += moved;
    if (state & AVMM_NET_RX_NO_BUFFERS && !t->rx_stopped[p]) {
        t->rx_stopped[p] = 1;
        t->stats.rx_stops++;
    }
    if (state & AVMM_NET_TX_BLOCKED && !t->tx_blocked[p]) {
        t->tx_blocked[p] = 1;
        t->stats.tx_waits++;
    }
    if (state & AVMM_NET_BUDGET) { /* avmm_net_poll does not say which side it served: both */
        t->want_rx |= 1u << p;
        t->want_tx |= 1u << p;
    }
}

static void serve(struct avmm_net_thread *t)
{
    uint32_t rx = t->want_rx, tx = t->want_tx;
    t->want_rx = t->want_tx = 0;
    for (uint32_t p = 0; p < t->cfg.npairs && !t->stats.broken; p++) {
        uint32_t state;
        if (tx & 1u << p) {
            t->tx_blocked[p] = 0;
            int r = avmm_net_tx(t->n, (int)p, &state);
            after(t, p, r, state);
        }
        if (rx & 1u << p && !t->stats.broken) {
            int r = avmm_net_rx(t->n, (int)p, &state);
            after(t, p, r, state);
        }
    }
}

enum { FD_WAKE, FD_RX_KICK, FD_TX_KICK, FD_TAP };

/* Sleep in ppoll until a doorbell, a TAP or the loop; then mark what to serve. */
/* `t0`: when the wait began, the start of the poll that missed if one ran (0: now). */
static void wait_for_work(struct avmm_net_thread *t, uint64_t t0)
{
    struct pollfd fds[3 * AVMM_NET_MAX_PAIRS + 1];
    uint8_t kind[3 * AVMM_NET_MAX_PAIRS + 1], pair[3 * AVMM_NET_MAX_PAIRS + 1];
    int nfds = 0;
    fds[nfds] = (struct pollfd){.fd = t->d.wake_fd, .events = POLLIN};
    kind[nfds++] = FD_WAKE;
    for (uint32_t p = 0; p < t->cfg.npairs && !t->stats.broken; p++) {
        struct avmm_vq *rxq = avmm_net_queue(t->n, (int)(2 * p)), *txq = avmm_net_queue(t->n, (int)(2 * p + 1));
        if (rxq->size && rxq->kick_fd >= 0) {
            fds[nfds] = (struct pollfd){.fd = rxq->kick_fd, .events = POLLIN};
            kind[nfds] = FD_RX_KICK;
            pair[nfds++] = (uint8_t)p;
        }
        if (txq->size && txq->kick_fd >= 0 && !t->tx_blocked[p]) {
            fds[nfds] = (struct pollfd){.fd = txq->kick_fd, .events = POLLIN};
            kind[nfds] = FD_TX_KICK;
            pair[nfds++] = (uint8_t)p;
        }
        short ev = (rxq->size && !t->rx_stopped[p] ? POLLIN : 0) | (txq->size && t->tx_blocked[p] ? POLLOUT : 0);
        int tap = avmm_net_fd(t->n, (int)p);
        if (ev && tap >= 0 && !t->tap_error[p]) {
            fds[nfds] = (struct pollfd){.fd = tap, .events = ev};
            kind[nfds] = FD_TAP;
            pair[nfds++] = (uint8_t)p;
        }
    }
    if (!t0)
        t0 = avmm_now_ns();
    int r = ppoll(fds, (nfds_t)nfds, NULL, NULL);
    t->stats.waits++;
    avmm_devthread_adapt(&t->stats.poll_ns, t->cfg.poll_max_ns, avmm_now_ns() - t0);
    if (r <= 0)
        return; /* EINTR: signals are blocked here, but look again anyway */
    for (int i = 1; i < nfds; i++) {
        short re = fds[i].revents;
        uint32_t p = pair[i];
        if (!re)
            continue;
        switch (kind[i]) {
        case FD_RX_KICK: /* buffers came: drain the doorbell, read the TAP again */
            avmm_vq_drain_kick(avmm_net_queue(t->n, (int)(2 * p)));
            t->rx_stopped[p] = 0;
            t->want_rx |= 1u << p;
            break;
        case FD_TX_KICK: /* avmm_net_tx drains it */
            t->want_tx |= 1u << p;
            break;
        case FD_TAP:
            if (re & POLLIN)
                t->want_rx |= 1u << p;
            if (re & POLLOUT)
                t->want_tx |= 1u << p;
            if (!(re & (POLLIN | POLLOUT)) && re & (POLLERR | POLLHUP | POLLNVAL))
                t->tap_error[p] = 1; /* a TAP gone bad: left out (not spun on) until the next park */
            break;
        }
    }
}

static void *thread_main(void *arg)
{
    struct avmm_net_thread *t = arg;
    if (avmm_devthread_enter(t->cfg.seccomp_action) < 0)
        t->stats.seccomp_failed = 1;
    uint32_t every = t->cfg.npairs >= 32 ? ~0u : (1u << t->cfg.npairs) - 1;
    t->want_rx = t->want_tx = every; /* doorbells rung before the thread started */
    for (;;) {
        if (avmm_devthread_called(&t->d)) {
            if (avmm_devthread_parked(&t->d, &t->stats.parks))
                break;
            /* The loop may have reset, set up or restored the queues, or moved the TAP's
             * queues: start afresh and look at every pair. */
            memset(t->rx_stopped, 0, sizeof(t->rx_stopped));
            memset(t->tx_blocked, 0, sizeof(t->tx_blocked));
            memset(t->tap_error, 0, sizeof(t->tap_error));
            __atomic_store_n(&t->stats.broken, any_broken(t), __ATOMIC_RELAXED);
            t->want_rx = t->want_tx = t->stats.broken ? 0 : every;
            t->moved = 0;
        }
        if (t->want_rx | t->want_tx) {
            int before = t->moved;
            serve(t);
            if (t->stats.broken) {
                avmm_efd_signal(t->cfg.notify_fd); /* the loop sets NEEDS_RESET, and parks us at the reset */
                t->want_rx = t->want_tx = 0;
                continue;
            }
            if (t->moved > before)
                t->stats.turns++;
            if (t->want_rx | t->want_tx)
                continue; /* a budget spent: round again (the control word first) */
        }
        /* Frames moved, by a batch or the last poll: the next may come within the window (a
         * reply, the next of a stream). A poll that found one polls again: the driver's TX
         * doorbells are off only while the thread polls (avmm_net_poll), so a thread that
         * slept after each hit would have the next frame of a stream kicked. */
        uint64_t t0 = 0;
        if (t->moved && t->stats.poll_ns && !t->stats.broken) {
            t->moved = 0;
            t->stats.polls++;
            t0 = avmm_now_ns();
            uint32_t state;
            int pair = 0;
            int r = avmm_net_poll(t->n, (int)t->cfg.npairs, t->stats.poll_ns, &t->d.control, &state, &pair);
            if (r != 0 || state) { /* a TX the TAP refused moves nothing and still says so */
                t->stats.poll_hits += r > 0;
                after(t, (uint32_t)pair, r, state);
                if (t->stats.broken)
                    avmm_efd_signal(t->cfg.notify_fd);
                if (r > 0 || t->want_rx | t->want_tx)
                    continue; /* frames moved, or a budget spent on chains that moved none */
            }
        }
        t->moved = 0;
        wait_for_work(t, t0);
    }
    return NULL;
}

struct avmm_net_thread *avmm_net_thread_start(struct avmm_net *n, const struct avmm_net_thread_config *cfg)
{
    if (!cfg->npairs || cfg->npairs > AVMM_NET_MAX_PAIRS) {
        errno = EINVAL;
        return NULL;
    }
    struct avmm_net_thread *t = calloc(1, sizeof(*t));
    if (!t)
        return NULL;
    t->n = n;
    t->cfg = *cfg;
    return avmm_devthread_start(&t->d, thread_main, t, t->cfg.name, sizeof(t->cfg.name));
}

void avmm_net_thread_park(struct avmm_net_thread *t) { avmm_devthread_park(&t->d); }
void avmm_net_thread_unpark(struct avmm_net_thread *t) { avmm_devthread_unpark(&t->d); }

void avmm_net_thread_stop(struct avmm_net_thread *t)
{
    if (t)
        avmm_devthread_stop(&t->d, t);
}

struct avmm_net_thread_stats *avmm_net_thread_stats(struct avmm_net_thread *t) { return &t->stats; }
