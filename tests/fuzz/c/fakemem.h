/*
 * A fake guest memory for the C fuzz targets: two RAM regions with a hole between them,
 * each its own heap allocation of exactly its size, so AddressSanitizer reports any access
 * one byte outside guest RAM. fakemem_owns() is the invariant every target checks on the
 * iovecs the data path builds: each buffer lies wholly inside one region.
 *
 * Region 0: guest [0x0000, 0x10000) (the rings live here); region 1: [0x20000, 0x21000).
 */
#ifndef FUZZ_FAKEMEM_H
#define FUZZ_FAKEMEM_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>

#include "cursor.h"
#include "virtq.h"

#define FAKE_R0_GPA 0x0ull
#define FAKE_R0_SIZE 0x10000ull
#define FAKE_R1_GPA 0x20000ull
#define FAKE_R1_SIZE 0x1000ull

struct fakemem {
    struct avmm_gmem gmem;
};

static void fakemem_init(struct fakemem *f)
{
    memset(f, 0, sizeof(*f));
    f->gmem.nregions = 2;
    f->gmem.r[0] = (struct avmm_gmem_region){FAKE_R0_GPA, FAKE_R0_SIZE, malloc(FAKE_R0_SIZE)};
    f->gmem.r[1] = (struct avmm_gmem_region){FAKE_R1_GPA, FAKE_R1_SIZE, malloc(FAKE_R1_SIZE)};
    if (!f->gmem.r[0].hva || !f->gmem.r[1].hva)
        abort();
}

/* Fill guest RAM from the fuzz input: region 0 first, then region 1; the rest zero. */
static void fakemem_fill(struct fakemem *f, const uint8_t *data, size_t len)
{
    for (uint32_t i = 0; i < f->gmem.nregions; i++) {
        struct avmm_gmem_region *r = &f->gmem.r[i];
        size_t n = len < r->size ? len : r->size;
        memcpy(r->hva, data, n);
        memset(r->hva + n, 0, r->size - n);
        data += n;
        len -= n;
    }
}

static void fakemem_free(struct fakemem *f)
{
    for (uint32_t i = 0; i < f->gmem.nregions; i++)
        free(f->gmem.r[i].hva);
}

/* 1 if host [p, p+len) lies wholly inside one guest RAM region. */
static int fakemem_owns(const struct fakemem *f, const void *p, size_t len)
{
    uintptr_t a = (uintptr_t)p;
    for (uint32_t i = 0; i < f->gmem.nregions; i++) {
        uintptr_t lo = (uintptr_t)f->gmem.r[i].hva, hi = lo + f->gmem.r[i].size;
        if (a >= lo && a <= hi && len <= hi - a)
            return 1;
    }
    return 0;
}

#define FUZZ_CHECK(cond)                                                                       \
    do {                                                                                       \
        if (!(cond)) {                                                                         \
            fprintf(stderr, "invariant broken at %s:%d: %s\n", __FILE__, __LINE__, #cond);     \
            abort();                                                                           \
        }                                                                                      \
    } while (0)

static void fakemem_check_iov(const struct fakemem *f, const struct iovec *iov, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++)
        FUZZ_CHECK(fakemem_owns(f, iov[i].iov_base, iov[i].iov_len));
}

/* The driver writes two bytes (a u16 from the input) at an even offset of region 0, also
 * from the input: an avail idx, a descriptor field, a request header, between calls. */
static void fakemem_poke(struct fakemem *f, struct cursor *ctl)
{
    uint16_t at = take16(ctl) & (uint16_t)~1u;
    uint16_t v = take16(ctl);
    memcpy(f->gmem.r[0].hva + at, &v, 2);
}

/* Every C target's input: a little-endian u16 L, then L control bytes (the set-up and the
 * ops to run), then guest RAM's contents. */
static void fuzz_split(const uint8_t *data, size_t size, struct cursor *ctl, const uint8_t **ram, size_t *ram_len)
{
    size_t l = size >= 2 ? (size_t)(data[0] | data[1] << 8) : 0;
    data += size >= 2 ? 2 : size;
    size -= size >= 2 ? 2 : size;
    if (l > size)
        l = size;
    ctl->p = data;
    ctl->n = l;
    *ram = data + l;
    *ram_len = size - l;
}

/* The start of every target's run: the input split, guest RAM filled with its part. */
static void fuzz_begin(struct fakemem *f, const uint8_t *data, size_t size, struct cursor *ctl)
{
    const uint8_t *ram;
    size_t ram_len;
    fuzz_split(data, size, ctl, &ram, &ram_len);
    fakemem_fill(f, ram, ram_len);
}

/* A queue's set-up as a driver writes it, from the input: a size of 2^0 .. 2^(log2_sizes-1),
 * the ring features a device may take, and three ring addresses in the first 64 KiB. */
struct fuzz_queue {
    uint16_t size;
    uint32_t flags;
    uint64_t desc, driver, device;
};

static struct fuzz_queue take_queue(struct cursor *c, unsigned log2_sizes)
{
    struct fuzz_queue q;
    q.size = (uint16_t)(1u << (take8(c) % log2_sizes));
    q.flags = take8(c) & (AVMM_VQ_EVENT_IDX | AVMM_VQ_INDIRECT);
    q.desc = take16(c);
    q.driver = take16(c);
    q.device = take16(c);
    return q;
}

#ifdef FUZZ_WRAP_VQ_PUSH
/* Every used entry a device pushes is well formed: a head the ring has, a length no larger
 * than the fake RAM. Checked at the push (linked with -Wl,--wrap=avmm_vq_push), not in the
 * ring afterwards: a guest may point a buffer at its own used ring, and the device's data
 * then lands there as the guest asked. */
void __real_avmm_vq_push(struct avmm_vq *q, uint16_t head, uint32_t len);
void __wrap_avmm_vq_push(struct avmm_vq *q, uint16_t head, uint32_t len)
{
    FUZZ_CHECK(head < q->size);
    FUZZ_CHECK(len <= FAKE_R0_SIZE + FAKE_R1_SIZE);
    __real_avmm_vq_push(q, head, len);
}
#endif

#endif
