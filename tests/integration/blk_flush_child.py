"""Child of test_blk_durability: write known data, FLUSH, say so, keep writing until killed.

Usage: python blk_flush_child.py IMAGE ENGINE DIRECT SEED
Prints "flushed" (and flushes stdout) the moment the FLUSH's used entry is seen.
"""

import asyncio
import random
import sys

from asyncvmm._native import lib

from asyncvmm.devices.virtio.block.device import VirtioBlk
from asyncvmm.devices.virtio.block.image import BlockOptions
from asyncvmm.testing.mock_driver import BlkClient, Harness, VirtioDriver


def blocks(seed: int, sectors: int):
    """The (sector, 4 KiB of data) pairs a round writes: known to the parent from the seed."""
    rng = random.Random(seed)
    # Distinct blocks: two writes to one block in flight together may land in either order,
    # on a real disk as here, so a round never has two.
    picked = rng.sample(range(64, sectors // 8), 16)
    return [(block * 8, rng.randbytes(4096)) for block in picked]


async def main(image: str, engine: str, direct: bool, seed: int) -> None:
    h = Harness()
    dev = h.add(VirtioBlk(BlockOptions(image, engine=engine, direct=direct), h.mem, queues=1))
    drv = VirtioDriver(h, dev)
    await drv.setup()
    c = BlkClient(drv)
    sectors = dev.device.image.sectors
    statuses = [c.build(lib.VIRTIO_BLK_T_OUT, sector, data=data)[1] for sector, data in blocks(seed, sectors)]
    c.q.kick()
    await c.q.wait_used(16)
    status, _, _ = await c.run(lib.VIRTIO_BLK_T_FLUSH)
    status |= max(h.mem.read(s, 1)[0] for s in statuses)  # every write and the FLUSH: S_OK (0)
    sys.stdout.write(f"flushed {status}\n")
    sys.stdout.flush()
    n = 0
    while True:  # more writes the parent's SIGKILL interrupts
        await c.run(lib.VIRTIO_BLK_T_OUT, (n % 64) * 8, data=bytes([n & 0xFF]) * 4096)
        n += 1


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])))
