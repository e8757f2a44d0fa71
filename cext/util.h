/* Small helpers the C core shares: clocks and eventfd signals. */
#ifndef AVMM_UTIL_H
#define AVMM_UTIL_H

#include <errno.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>

static inline uint64_t avmm_clock_ns(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline uint64_t avmm_now_ns(void)
{
    return avmm_clock_ns(CLOCK_MONOTONIC);
}

/* Add 1 to an eventfd (its reader on the loop wakes up). */
static inline void avmm_efd_signal(int efd)
{
    uint64_t one = 1;
    ssize_t r;
    do {
        r = write(efd, &one, sizeof(one));
    } while (r < 0 && errno == EINTR);
}

#endif
