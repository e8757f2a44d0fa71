/*
 * The wake-up floor: what it costs one thread to wake another that sleeps, on this host.
 *
 * Two threads pass a token back and forth through two eventfds (a blocking read each, as a
 * VMM's thread waits for a doorbell and a guest's for its interrupt), n round trips; each
 * round trip is two wake-ups. Three placements: the threads pinned to two different CPUs
 * (the other CPU goes idle between tokens, as a disk's thread and a vCPU do at queue depth
 * 1), both pinned to one CPU, and left to the scheduler. Prints one line per placement:
 *   wakeup PLACEMENT cpus A/B p50_us X p99_us Y   (per wake-up: half a round trip)
 * usage: wakeup [n]
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

static int ping_fd, pong_fd, rounds;

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void pin(int cpu)
{
    if (cpu < 0)
        return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    sched_setaffinity(0, sizeof(set), &set);
}

static void wait_fd(int fd)
{
    uint64_t v;
    if (read(fd, &v, sizeof(v)) != sizeof(v))
        abort();
}

static void signal_fd(int fd)
{
    uint64_t one = 1;
    if (write(fd, &one, sizeof(one)) != sizeof(one))
        abort();
}

static void *echo(void *arg)
{
    pin((int)(intptr_t)arg);
    for (int i = 0; i < rounds; i++) {
        wait_fd(ping_fd);
        signal_fd(pong_fd);
    }
    return NULL;
}

static int cmp(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void run(const char *name, int cpu_a, int cpu_b, uint64_t *lat)
{
    pthread_t t;
    ping_fd = eventfd(0, EFD_CLOEXEC);
    pong_fd = eventfd(0, EFD_CLOEXEC);
    if (ping_fd < 0 || pong_fd < 0 || pthread_create(&t, NULL, echo, (void *)(intptr_t)cpu_b))
        abort();
    pin(cpu_a);
    usleep(10000); /* the echo thread asleep in its read */
    for (int i = 0; i < rounds; i++) {
        uint64_t t0 = now_ns();
        signal_fd(ping_fd);
        wait_fd(pong_fd);
        lat[i] = now_ns() - t0;
        if (i % 64 == 63)
            usleep(50); /* let the other CPU go idle now and then, as between requests */
    }
    pthread_join(t, NULL);
    close(ping_fd);
    close(pong_fd);
    qsort(lat, (size_t)rounds, sizeof(*lat), cmp);
    printf("wakeup %s cpus %d/%d p50_us %.2f p99_us %.2f\n", name, cpu_a, cpu_b, lat[rounds / 2] / 2e3,
           lat[rounds * 99 / 100] / 2e3);
    fflush(stdout);
}

int main(int argc, char **argv)
{
    rounds = argc > 1 ? atoi(argv[1]) : 20000;
    if (rounds < 100)
        rounds = 100;
    uint64_t *lat = malloc(sizeof(*lat) * (size_t)rounds);
    if (!lat)
        return 1;
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    if (cpus >= 2)
        run("two_cpus", 0, 1, lat);
    run("one_cpu", 0, 0, lat);
    pin(-1);
    cpu_set_t all;
    CPU_ZERO(&all);
    for (int i = 0; i < cpus && i < CPU_SETSIZE; i++)
        CPU_SET(i, &all);
    sched_setaffinity(0, sizeof(all), &all);
    run("scheduler", -1, -1, lat);
    free(lat);
    return 0;
}
