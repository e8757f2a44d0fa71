/* A device's own thread, the shared part: see devthread.h. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "devthread.h"
#include "seccomp.h"
#include "util.h"

#define POLL_MIN_NS 4000u /* the first window once polling pays */

void *avmm_devthread_start(struct avmm_devthread *d, void *(*main)(void *), void *owner, char *name,
                           size_t name_size)
{
    name[name_size - 1] = 0;
    d->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (d->wake_fd < 0) {
        free(owner);
        return NULL;
    }
    pthread_mutex_init(&d->lock, NULL);
    pthread_cond_init(&d->cond, NULL);
    int r = pthread_create(&d->tid, NULL, main, owner);
    if (r == 0) {
        if (name[0])
            pthread_setname_np(d->tid, name);
        return owner;
    }
    pthread_cond_destroy(&d->cond);
    pthread_mutex_destroy(&d->lock);
    close(d->wake_fd);
    free(owner);
    errno = r;
    return NULL;
}

void avmm_devthread_park(struct avmm_devthread *d)
{
    pthread_mutex_lock(&d->lock);
    d->parks++;
    __atomic_store_n(&d->control, 1, __ATOMIC_RELEASE);
    avmm_efd_signal(d->wake_fd);
    while (!d->parked)
        pthread_cond_wait(&d->cond, &d->lock);
    pthread_mutex_unlock(&d->lock);
}

void avmm_devthread_unpark(struct avmm_devthread *d)
{
    pthread_mutex_lock(&d->lock);
    if (d->parks && --d->parks == 0)
        pthread_cond_broadcast(&d->cond);
    pthread_mutex_unlock(&d->lock);
}

void avmm_devthread_stop(struct avmm_devthread *d, void *owner)
{
    pthread_mutex_lock(&d->lock);
    d->stop = 1;
    __atomic_store_n(&d->control, 1, __ATOMIC_RELEASE);
    avmm_efd_signal(d->wake_fd);
    pthread_cond_broadcast(&d->cond);
    pthread_mutex_unlock(&d->lock);
    pthread_join(d->tid, NULL);
    pthread_cond_destroy(&d->cond);
    pthread_mutex_destroy(&d->lock);
    close(d->wake_fd);
    free(owner);
}

int avmm_devthread_enter(int seccomp_action)
{
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL); /* signals are the loop's */
    if (seccomp_action && avmm_seccomp_install(AVMM_SECCOMP_IOTHREAD, seccomp_action, 0) < 0)
        return -1;
    return 0;
}

int avmm_devthread_parked(struct avmm_devthread *d, uint64_t *parks)
{
    pthread_mutex_lock(&d->lock);
    while (d->parks && !d->stop) {
        if (!d->parked)
            (*parks)++;
        d->parked = 1;
        pthread_cond_broadcast(&d->cond);
        pthread_cond_wait(&d->cond, &d->lock);
    }
    d->parked = 0;
    int stop = d->stop;
    if (!stop)
        __atomic_store_n(&d->control, 0, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&d->lock);
    uint64_t drained;
    if (read(d->wake_fd, &drained, sizeof(drained)) < 0) {
        /* EAGAIN: nobody signalled (a park that came while the thread was serving or polling) */
    }
    return stop;
}

void avmm_devthread_adapt(uint64_t *poll_ns, uint64_t max_ns, uint64_t waited)
{
    uint64_t w = *poll_ns;
    if (!max_ns)
        return;
    if (waited <= max_ns) /* the event came within reach of a longer poll: poll longer */
        w = w * 2 < POLL_MIN_NS ? POLL_MIN_NS : w * 2 > max_ns ? max_ns : w * 2;
    else /* a long wait: polling would not have caught it */
        w = w / 2 < POLL_MIN_NS ? 0 : w / 2;
    __atomic_store_n(poll_ns, w, __ATOMIC_RELAXED);
}
