/*
 * A cursor over a fuzz input's bytes, read as the target needs them: past the end every
 * read gives zeros, so any input is a whole program. Shared by the C fuzz targets.
 */
#ifndef FUZZ_CURSOR_H
#define FUZZ_CURSOR_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

struct cursor {
    const uint8_t *p;
    size_t n;
};

static uint8_t take8(struct cursor *c)
{
    if (!c->n)
        return 0;
    c->n--;
    return *c->p++;
}

static uint16_t take16(struct cursor *c)
{
    return (uint16_t)(take8(c) | take8(c) << 8);
}

static uint32_t take32(struct cursor *c)
{
    return (uint32_t)take16(c) | (uint32_t)take16(c) << 16;
}

/* Up to `max` bytes into `to`; how many there were. */
static size_t take_bytes(struct cursor *c, void *to, size_t max)
{
    size_t n = c->n < max ? c->n : max;
    memcpy(to, c->p, n);
    c->p += n;
    c->n -= n;
    return n;
}

#endif
