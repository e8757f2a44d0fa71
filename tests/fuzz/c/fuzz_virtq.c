/*
 * libFuzzer target: the split-ring walker (cext/virtq.c) against a guest that writes
 * anything into its rings — descriptor tables, indirect tables, avail/used indices,
 * EVENT_IDX fields — and changes them between the device's calls.
 *
 * Control bytes: queue size (log2), feature flags (EVENT_IDX, INDIRECT), the rings' guest
 * addresses, the iovec capacity, then ops (pop, push, publish, notify on/off, unpop, a
 * guest write into RAM, the copy helpers). Invariants checked beside ASan/UBSan:
 *   - every buffer of a popped chain lies wholly inside one RAM region, and so does the
 *     status byte (last_in);
 *   - a chain never has more buffers than the caller's iovec capacity, and its lengths add up;
 *   - a popped head is below the queue size; a broken ring stays broken and pops nothing.
 */
#include <errno.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "fakemem.h"

static struct fakemem mem;
static int efd = -1;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    fakemem_init(&mem);
    efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    return 0;
}

static void check_chain(const struct avmm_vq *q, const struct avmm_chain *c)
{
    FUZZ_CHECK(c->head < q->size);
    FUZZ_CHECK(c->nout + c->nin <= c->iov_cap);
    fakemem_check_iov(&mem, c->iov, c->nout + c->nin);
    uint64_t out = 0, in = 0;
    for (uint32_t i = 0; i < c->nout; i++)
        out += c->iov[i].iov_len;
    for (uint32_t i = 0; i < c->nin; i++)
        in += c->iov[c->nout + i].iov_len;
    FUZZ_CHECK(out == c->out_len && in == c->in_len);
    if (c->last_in)
        FUZZ_CHECK(fakemem_owns(&mem, c->last_in, 1));
    /* A device may read and write every byte it was given: let ASan see it do so. */
    for (uint32_t i = 0; i < c->nout + c->nin; i++) {
        volatile uint8_t *b = c->iov[i].iov_base;
        (void)b[0];
        (void)b[c->iov[i].iov_len - 1];
    }
    if (c->last_in)
        *c->last_in = 0xff;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct cursor ctl;
    fuzz_begin(&mem, data, size, &ctl);

    struct fuzz_queue g = take_queue(&ctl, 9); /* 1..256 */
    uint32_t iov_cap = 1 + take16(&ctl) % AVMM_CHAIN_MAX_IOV;
    uint8_t isr = 0;
    struct avmm_irq irq = {.efd = efd, .isr = (take8(&ctl) & 1) ? &isr : NULL};
    struct avmm_vq q;
    int r = avmm_vq_setup(&q, &mem.gmem, g.size, g.desc, g.driver, g.device, g.flags, &irq, efd);
    if (r) {
        FUZZ_CHECK(r == -EINVAL || r == -EFAULT);
        return 0;
    }
    /* Exactly iov_cap entries, on the heap: one more written is an ASan report. */
    struct iovec *iov = malloc(sizeof(*iov) * iov_cap);
    uint16_t popped[256];
    unsigned npopped = 0, pushed = 0; /* heads popped; of those, pushed (a FIFO) */
    uint8_t buf[64];

    for (int ops = 0; ctl.n && ops < 512; ops++) {
        switch (take8(&ctl) % 11) {
        case 0: { /* pop */
            struct avmm_chain c = {.iov = iov, .iov_cap = iov_cap};
            int was_broken = q.broken;
            r = avmm_vq_pop(&q, &mem.gmem, &c);
            FUZZ_CHECK(r >= -1 && r <= 1);
            if (was_broken)
                FUZZ_CHECK(r == -1);
            if (r < 0) {
                FUZZ_CHECK(q.broken);
                break;
            }
            if (r == 1) {
                check_chain(&q, &c);
                if (!c.err && c.nout + c.nin) {
                    size_t skip = take8(&ctl), n = take8(&ctl) % sizeof(buf);
                    size_t got = avmm_iov_to_buf(c.iov, c.nout + c.nin, skip, buf, n);
                    FUZZ_CHECK(got <= n);
                    if (c.nin)
                        FUZZ_CHECK(avmm_buf_to_iov(&c.iov[c.nout], c.nin, skip, buf, got) <= got);
                }
                if (npopped - pushed < 256)
                    popped[npopped++ % 256] = c.head;
                else
                    avmm_vq_unpop(&q, 1);
            }
            break;
        }
        case 1: /* push the oldest chain not yet pushed */
            if (pushed < npopped) {
                avmm_vq_push(&q, popped[pushed++ % 256], take32(&ctl));
            }
            break;
        case 2:
            avmm_vq_publish(&q);
            break;
        case 3:
            avmm_vq_enable_notify(&q);
            break;
        case 4:
            avmm_vq_enable_notify_more(&q);
            break;
        case 5:
            avmm_vq_disable_notify(&q);
            break;
        case 6: { /* give back some of the most recent chains not pushed */
            unsigned k = npopped - pushed ? take8(&ctl) % (npopped - pushed + 1) : 0;
            avmm_vq_unpop(&q, (uint16_t)k);
            npopped -= k;
            break;
        }
        case 7: /* the driver writes two bytes anywhere in region 0 (avail idx, a descriptor) */
            fakemem_poke(&mem, &ctl);
            break;
        case 8:
            FUZZ_CHECK(avmm_vq_pending(&q) == (uint16_t)(q.avail->idx - q.last_avail) || !q.size);
            break;
        case 9:
            avmm_vq_drain_kick(&q);
            break;
        case 10: /* the driver masks or unmasks the vector */
            __atomic_store_n(&irq.masked, take8(&ctl) & 1, __ATOMIC_SEQ_CST);
            break;
        }
    }
    avmm_vq_publish(&q);
    free(iov);
    return 0;
}
