"""A guest's disk served by Python coroutines: a copy-on-write overlay on a read-only base.

The guest sees a writable disk; the base image is only ever read (asyncio.to_thread, so
the loop never waits on the host's disk), and what the guest writes or discards lives in
an overlay of 4 KiB blocks in memory — thrown away with the VM, or saved with `overlay`.

    .venv/bin/python tools/examples/cow_disk.py BASE.img

boots tests/guests' `vblk` (a tiny virtio-blk driver) on a COW disk over BASE.img, prints
what it read and wrote, and shows that BASE.img did not change. The class is the example:
any asyncio service can serve a disk this way (asyncvmm.BlockBackend).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from pathlib import Path

from asyncvmm import VM, BlockBackend, PciSlot, VmConfig

REPO = Path(__file__).resolve().parents[2]
BLOCK = 4096


class CowDisk(BlockBackend):
    """Reads fall through to `base` where the overlay has no block; writes go to the overlay."""

    def __init__(self, base: str):
        self.fd = os.open(base, os.O_RDONLY | os.O_CLOEXEC)
        self.size = os.fstat(self.fd).st_size // 512 * 512
        self.overlay: dict[int, bytearray] = {}  # block number -> its 4 KiB
        self.counts = {"read": 0, "write": 0, "flush": 0, "discard": 0, "write_zeroes": 0}

    def close(self) -> None:
        os.close(self.fd)

    async def _block(self, n: int) -> bytes:
        if n in self.overlay:
            return bytes(self.overlay[n])
        data = await asyncio.to_thread(os.pread, self.fd, BLOCK, n * BLOCK)
        return data.ljust(BLOCK, b"\0")  # the last block may be short

    async def read(self, offset: int, length: int) -> bytes:
        self.counts["read"] += 1
        first, last = offset // BLOCK, (offset + length - 1) // BLOCK
        blocks = await asyncio.gather(*(self._block(n) for n in range(first, last + 1)))
        start = offset - first * BLOCK
        return b"".join(blocks)[start : start + length]

    async def _modify(self, offset: int, data: bytes) -> None:
        at = 0
        while at < len(data):
            n, within = divmod(offset + at, BLOCK)
            take = min(BLOCK - within, len(data) - at)
            if n not in self.overlay:
                self.overlay[n] = bytearray(await self._block(n))  # copy on first write
            self.overlay[n][within : within + take] = data[at : at + take]
            at += take

    async def write(self, offset: int, data: bytes) -> None:
        self.counts["write"] += 1
        await self._modify(offset, data)

    async def flush(self) -> None:
        self.counts["flush"] += 1  # the overlay is memory: nothing more durable to reach

    async def discard(self, offset: int, length: int) -> None:
        self.counts["discard"] += 1
        await self._modify(offset, bytes(length))  # reads as zeros afterwards, as the API asks

    async def write_zeroes(self, offset: int, length: int) -> None:
        self.counts["write_zeroes"] += 1
        await self._modify(offset, bytes(length))


async def main(base: str) -> None:
    before = hashlib.sha256(Path(base).read_bytes()).hexdigest()
    disk = CowDisk(base)
    try:
        cfg = VmConfig(memory="64M", kernel=str(REPO / "build" / "guests" / "vblk.elf"), no_reboot=True,
                       block_backends={"cow": disk}, slots=[PciSlot(0, 3, 0, "virtio-blk-backend", "cow")])
        async with VM(cfg) as vm:
            await vm.console.expect(rb"vblk done\n", timeout=60)
            print(bytes(vm.console.transcript).decode(errors="replace"), end="")
        print(f"backend calls: {disk.counts}; overlay blocks: {sorted(disk.overlay)}")
        print(f"sector 1 as the guest sees it now: {(await disk.read(512, 16))!r}")
    finally:
        disk.close()
    after = hashlib.sha256(Path(base).read_bytes()).hexdigest()
    print("base image unchanged" if after == before else "BASE IMAGE CHANGED")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: cow_disk.py BASE.img")
    asyncio.run(main(sys.argv[1]))
