/*
 * What a device's own thread (blk_thread.h, net_thread.h) shares: how the loop parks,
 * unparks and stops it, how it sleeps while parked, and the adaptive busy-poll window.
 *
 * park returns once the thread sleeps on the condition variable (it then touches neither
 * its device nor its fds); parks nest; unpark lets it go when the last is undone. The loop
 * gets the thread's attention through `control` (checked by the thread between batches)
 * and `wake_fd` (in the thread's every wait).
 *
 * The window follows KVM's halt-polling rule on the whole wait, from the start of the poll
 * that missed: it grows (from POLL_MIN_NS, doubling, up to the maximum) while an event
 * came within the maximum, and shrinks, down to not polling at all, when the waits are
 * longer. A maximum of 0: never poll.
 *
 * A device's thread is a struct of its own (`owner`, calloc'd) with a struct
 * avmm_devthread in it: start hands the owner to the thread, stop takes it back and frees it.
 */
#ifndef AVMM_DEVTHREAD_H
#define AVMM_DEVTHREAD_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

struct avmm_devthread {
    pthread_t tid;
    int wake_fd; /* an eventfd in the thread's every wait: ends it */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int control;    /* atomic: the loop wants the thread's attention (park or stop) */
    unsigned parks; /* under lock */
    int parked;     /* under lock: the thread sleeps on cond */
    int stop;       /* under lock */
};

/* Create wake_fd and the thread running main(owner), named `name` (NUL-terminated here,
 * within name_size; not named if empty). Returns owner, or NULL with errno set and owner
 * freed. */
void *avmm_devthread_start(struct avmm_devthread *d, void *(*main)(void *), void *owner, char *name,
                           size_t name_size);
void avmm_devthread_park(struct avmm_devthread *d);
void avmm_devthread_unpark(struct avmm_devthread *d);
/* Tell it to stop, join it, release what start made and free owner. */
void avmm_devthread_stop(struct avmm_devthread *d, void *owner);

/* In the thread: signals blocked (they are the loop's), its own seccomp filter if
 * seccomp_action asks; 0, or -1 if the filter could not be installed. */
int avmm_devthread_enter(int seccomp_action);
/* In the thread: the loop wants its attention. */
static inline int avmm_devthread_called(struct avmm_devthread *d)
{
    return __atomic_load_n(&d->control, __ATOMIC_ACQUIRE);
}
/* In the thread: sleep while parked (counting each park in *parks); 1 when told to stop. */
int avmm_devthread_parked(struct avmm_devthread *d, uint64_t *parks);
/* The window *poll_ns after a wait of `waited` ns, for a maximum of max_ns: KVM's
 * halt-polling rule. `waited` runs from the start of the busy poll that missed (or of the
 * sleep, when none ran) to the wake-up: within max_ns a longer window would have caught
 * the event, so it grows; beyond, no window would have, so it shrinks. */
void avmm_devthread_adapt(uint64_t *poll_ns, uint64_t max_ns, uint64_t waited);

#endif
