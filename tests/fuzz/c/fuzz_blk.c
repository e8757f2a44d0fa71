/*
 * libFuzzer target: virtio-blk's data path (cext/blk.c over cext/virtq.c) with requests a
 * guest makes up: headers of any type, sectors past the end, bad segment counts,
 * DISCARD/WRITE_ZEROES segments, GET_ID into short buffers, read-only and write-through
 * modes, resets with I/O in flight, two queues.
 *
 * The engine is the synchronous one (cext/ioengine.c, AVMM_ENGINE_SYNC: preadv2/pwritev2/
 * fdatasync/fallocate at submit time) on a 64 KiB memfd image: io_uring's kernel-side copies
 * are invisible to ASan, while the sync engine's are checked by the wrappers below (linked
 * with -Wl,--wrap=preadv2,--wrap=pwritev2): every buffer handed to the host lies wholly
 * inside guest RAM. The request parsing and completion code is the same for both engines.
 * Also checked: every used entry names a head below the queue size, with a length no
 * larger than the chain's writable bytes could be (64 KiB RAM + 4 KiB).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "blk.h"
#define FUZZ_WRAP_VQ_PUSH /* fakemem.h checks every used entry pushed */
#include "fakemem.h"

#define NQ 2
#define IMAGE_BYTES 65536

static struct fakemem mem;
static int img = -1, img2 = -1, efd = -1;

ssize_t __real_preadv2(int fd, const struct iovec *iov, int n, off_t off, int flags);
ssize_t __real_pwritev2(int fd, const struct iovec *iov, int n, off_t off, int flags);

ssize_t __wrap_preadv2(int fd, const struct iovec *iov, int n, off_t off, int flags)
{
    FUZZ_CHECK(n > 0);
    fakemem_check_iov(&mem, iov, (uint32_t)n);
    return __real_preadv2(fd, iov, n, off, flags);
}

ssize_t __wrap_pwritev2(int fd, const struct iovec *iov, int n, off_t off, int flags)
{
    FUZZ_CHECK(n > 0);
    fakemem_check_iov(&mem, iov, (uint32_t)n);
    return __real_pwritev2(fd, iov, n, off, flags);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    fakemem_init(&mem);
    img = memfd_create("fuzz-blk", MFD_CLOEXEC);
    if (img < 0 || ftruncate(img, IMAGE_BYTES) < 0)
        abort();
    img2 = dup(img);
    efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct cursor ctl;
    fuzz_begin(&mem, data, size, &ctl);
    /* A zeroed image for every input, so a crash replays from its input alone (a read's
     * data lands in guest RAM, and the last input's writes would change it). */
    if (ftruncate(img, 0) < 0 || ftruncate(img, IMAGE_BYTES) < 0)
        abort();

    uint8_t mode = take8(&ctl);
    struct avmm_blk_config cfg = {
        .fd = img,
        .fd_buffered = (mode & 4) ? img2 : -1,
        .dio_align = (mode & 4) ? 512 : 0,
        .flags = mode & (AVMM_BLK_RO | AVMM_BLK_WRITETHROUGH),
        .capacity = IMAGE_BYTES / 512 - (mode >> 4), /* the image may be longer than the disk */
        .seg_max = 1 + take8(&ctl) % 254,
        .max_discard_sectors = take8(&ctl),
        .max_write_zeroes_sectors = take8(&ctl),
        .nqueues = NQ,
        .queue_size_max = 64, /* slots x iovecs are allocated per device: keep it quick */
        .serial = "fuzz-serial-0123456",
    };
    struct avmm_engine *eng = avmm_engine_new(AVMM_ENGINE_SYNC, 1 + take8(&ctl));
    FUZZ_CHECK(eng);
    struct avmm_blk *b = avmm_blk_new(&cfg, &mem.gmem, eng);
    FUZZ_CHECK(b);
    struct avmm_irq irq = {.efd = efd};
    int broke = 0; /* a call said a ring broke since the last reset */

    for (int ops = 0; ctl.n && ops < 256; ops++) {
        uint8_t op = take8(&ctl);
        int qi = (op >> 4) % NQ, r;
        switch (op % 9) {
        case 0: { /* the driver sets a queue up */
            struct fuzz_queue g = take_queue(&ctl, 8); /* 1..128: above 64 is refused */
            r = avmm_blk_queue_setup(b, qi, g.size, g.desc, g.driver, g.device, g.flags, &irq, efd);
            FUZZ_CHECK(r == 0 || r == -EINVAL || r == -EFAULT);
            break;
        }
        case 1:
        case 2:
            r = avmm_blk_kick(b, qi);
            FUZZ_CHECK(r >= -1 && r <= 128);
            broke |= r < 0;
            break;
        case 3:
            r = avmm_blk_complete(b);
            FUZZ_CHECK(r >= -1);
            broke |= r < 0;
            break;
        case 4:
            broke |= avmm_blk_resume(b) < 0;
            break;
        case 5:
            avmm_blk_set_flags(b, take8(&ctl) & (AVMM_BLK_RO | AVMM_BLK_WRITETHROUGH));
            break;
        case 6: /* device reset: I/O in flight completes into nothing */
            avmm_blk_reset(b);
            broke = 0;
            break;
        case 7: /* the driver writes two bytes anywhere in region 0 */
            fakemem_poke(&mem, &ctl);
            break;
        case 8:
            broke |= avmm_blk_poll(b, 0) < 0;
            break;
        }
        /* The device asks for a reset exactly when a call said a ring broke. (A queue set up
         * again without a reset forgets it broke; the device still wants the reset.) */
        FUZZ_CHECK(!!avmm_blk_needs_reset(b) == broke);
    }
    avmm_blk_complete(b);
    avmm_blk_free(b);
    avmm_engine_free(eng);
    return 0;
}
