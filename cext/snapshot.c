/* Guest RAM pages for snapshots: see snapshot.h. */
#include <string.h>

#include "snapshot.h"

/* A page is zero when its first word is and it equals itself shifted by one word (memcmp
 * of the page against its own tail: one pass, no zero page to compare with). */
static int page_is_zero(const uint8_t *page)
{
    uint64_t first;

    memcpy(&first, page, sizeof first);
    if (first)
        return 0;
    return memcmp(page, page + sizeof first, AVMM_PAGE_SIZE - sizeof first) == 0;
}

size_t avmm_nonzero_pages(const uint8_t *p, size_t npages, uint8_t *out)
{
    size_t n = 0;

    for (size_t i = 0; i < npages; i++) {
        out[i] = !page_is_zero(p + i * AVMM_PAGE_SIZE);
        n += out[i];
    }
    return n;
}
