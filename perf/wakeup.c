/*
 * wakeup.c - the floor of a hand-off between two threads on this host: a ping-pong.
 *
 *   wakeup [ROUNDS] [MODE...]
 *
 * Thread A hands a token to thread B and waits for it back; B waits for it and hands it
 * back. One round is two hand-offs, as one posted exit is (vCPU -> loop -> vCPU). Modes:
 *   futex    both sides sleep in FUTEX_WAIT, woken by FUTEX_WAKE (the vCPU's wait)
 *   eventfd  both sides sleep in read() on an eventfd, woken by write()
 *   epoll    B sleeps in epoll_wait on an eventfd (the loop's wait); A in FUTEX_WAIT
 *   spin     both sides spin on an atomic word (no sleep: a CPU each, burnt)
 * each with the two threads pinned to different CPUs ("2cpu"), to one CPU ("1cpu"),
 * and left to the scheduler ("free"). Prints one line per case:
 *   wakeup MODE PLACEMENT rounds=N p50_us=X p90_us=X p99_us=X mean_us=X
 * the round trip's percentiles in µs (CLOCK_MONOTONIC per round, sorted).
 *
 * Build: gcc -O2 -Wall -Werror -pthread -o wakeup wakeup.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

enum mode { FUTEX, EVENTFD, EPOLL, SPIN };
static const char *mode_names[] = {"futex", "eventfd", "epoll", "spin"};

struct pp {
    enum mode mode;
    int cpu_a, cpu_b; /* -1: not pinned */
    long rounds;
    _Atomic uint32_t to_b, to_a; /* futex/spin words: 1 = the token is there */
    int efd_b, efd_a;
    int ep;
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void pin(int cpu)
{
    if (cpu < 0)
        return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

static void futex_give(_Atomic uint32_t *w)
{
    atomic_store(w, 1);
    syscall(SYS_futex, (uint32_t *)w, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}

static void futex_take(_Atomic uint32_t *w)
{
    while (!atomic_load(w))
        syscall(SYS_futex, (uint32_t *)w, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
    atomic_store(w, 0);
}

static void spin_give(_Atomic uint32_t *w)
{
    atomic_store(w, 1);
}

static void spin_take(_Atomic uint32_t *w)
{
    while (!atomic_load(w))
        __builtin_ia32_pause();
    atomic_store(w, 0);
}

static void efd_give(int efd)
{
    uint64_t one = 1;
    while (write(efd, &one, 8) < 0 && errno == EINTR) {
    }
}

static void efd_take(int efd)
{
    uint64_t v;
    while (read(efd, &v, 8) < 0 && errno == EINTR) {
    }
}

static void epoll_take(struct pp *p)
{
    struct epoll_event ev;
    uint64_t v;
    while (epoll_wait(p->ep, &ev, 1, -1) < 1) {
    }
    if (read(p->efd_b, &v, 8) < 0) {
    }
}

static void *thread_b(void *arg)
{
    struct pp *p = arg;
    pin(p->cpu_b);
    for (long i = 0; i < p->rounds; i++) {
        switch (p->mode) {
        case FUTEX: futex_take(&p->to_b); futex_give(&p->to_a); break;
        case EVENTFD: efd_take(p->efd_b); efd_give(p->efd_a); break;
        case EPOLL: epoll_take(p); futex_give(&p->to_a); break;
        case SPIN: spin_take(&p->to_b); spin_give(&p->to_a); break;
        }
    }
    return NULL;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void run_case(enum mode mode, const char *placement, int cpu_a, int cpu_b, long rounds)
{
    struct pp p;
    memset(&p, 0, sizeof(p));
    p.mode = mode;
    p.cpu_a = cpu_a;
    p.cpu_b = cpu_b;
    p.rounds = rounds;
    p.efd_a = eventfd(0, EFD_CLOEXEC);
    p.efd_b = eventfd(0, EFD_CLOEXEC | (mode == EPOLL ? EFD_NONBLOCK : 0));
    p.ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = p.efd_b};
    epoll_ctl(p.ep, EPOLL_CTL_ADD, p.efd_b, &ev);
    uint64_t *lat = calloc((size_t)rounds, sizeof(*lat));
    pthread_t tb;
    pin(cpu_a);
    pthread_create(&tb, NULL, thread_b, &p);
    usleep(10000);
    for (long i = 0; i < rounds; i++) {
        uint64_t t0 = now_ns();
        switch (mode) {
        case FUTEX: futex_give(&p.to_b); futex_take(&p.to_a); break;
        case EVENTFD: efd_give(p.efd_b); efd_take(p.efd_a); break;
        case EPOLL: efd_give(p.efd_b); futex_take(&p.to_a); break;
        case SPIN: spin_give(&p.to_b); spin_take(&p.to_a); break;
        }
        lat[i] = now_ns() - t0;
    }
    pthread_join(tb, NULL);
    double sum = 0;
    for (long i = 0; i < rounds; i++)
        sum += (double)lat[i];
    qsort(lat, (size_t)rounds, sizeof(*lat), cmp_u64);
    printf("wakeup %s %s rounds=%ld p50_us=%.2f p90_us=%.2f p99_us=%.2f mean_us=%.2f\n", mode_names[mode], placement, rounds,
           lat[rounds / 2] / 1e3, lat[rounds * 9 / 10] / 1e3, lat[rounds * 99 / 100] / 1e3, sum / (double)rounds / 1e3);
    fflush(stdout);
    free(lat);
    close(p.efd_a);
    close(p.efd_b);
    close(p.ep);
    pin(-1);
    cpu_set_t all;
    CPU_ZERO(&all);
    for (int c = 0; c < CPU_SETSIZE && c < 1024; c++)
        CPU_SET(c, &all);
    sched_setaffinity(0, sizeof(all), &all);
}

int main(int argc, char **argv)
{
    long rounds = argc > 1 ? atol(argv[1]) : 20000;
    int ncpu = (int)sysconf(_SC_NPROCESSORS_ONLN);
    if (rounds < 100) {
        fprintf(stderr, "usage: %s [ROUNDS>=100] [futex|eventfd|epoll|spin...]\n", argv[0]);
        return 2;
    }
    for (int m = FUTEX; m <= SPIN; m++) {
        int wanted = argc <= 2;
        for (int i = 2; i < argc; i++)
            wanted |= !strcmp(argv[i], mode_names[m]);
        if (!wanted)
            continue;
        if (ncpu >= 2)
            run_case(m, "2cpu", 0, 1, rounds);
        if (m != SPIN) /* two spinners on one CPU only take turns at the tick */
            run_case(m, "1cpu", 0, 0, rounds);
        run_case(m, "free", -1, -1, rounds);
    }
    return 0;
}
