/*
 * Guest RAM for snapshots (asyncvmm/snapshot): which pages hold anything but zeros, so
 * that a snapshot's memory part writes only those and leaves holes for the rest.
 * Thread ownership: none; called from the thread that writes the snapshot, on a paused VM.
 */
#ifndef AVMM_SNAPSHOT_H
#define AVMM_SNAPSHOT_H

#include <stddef.h>
#include <stdint.h>

#define AVMM_PAGE_SIZE 4096

/* For each of the `npages` 4 KiB pages at `p`: out[i] = 1 if it holds a non-zero byte,
 * else 0. Returns how many are non-zero. */
size_t avmm_nonzero_pages(const uint8_t *p, size_t npages, uint8_t *out);

#endif
