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
ZERO = bytes(BLOCK)  # the one zero block every discarded or zeroed whole block shares


class CowDisk(BlockBackend):
    """Reads fall through to `base` where the overlay has no block; writes go to the overlay."""

    def __init__(self, base: str):
        self.fd = os.open(base, os.O_RDONLY | os.O_CLOEXEC)
        self.size = os.fstat(self.fd).st_size // 512 * 512
        # block number -> its 4 KiB, or ZERO: a block discarded or zeroed whole costs no copy
        self.overlay: dict[int, bytearray | bytes] = {}
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

    async def _writable(self, n: int) -> bytearray:
        """Block n's own copy in the overlay, made on its first write."""
        block = self.overlay.get(n)
        if block is None:
            base = await self._block(n)
            # Another request of the batch may have copied it while this one waited on the
            # base: the first copy stays (with that request's data), this one is dropped.
            block = self.overlay.get(n)
            if block is None:
                block = self.overlay[n] = bytearray(base)
        if not isinstance(block, bytearray):  # ZERO, shared: a copy of its own now
            block = self.overlay[n] = bytearray(block)
        return block

    async def _modify(self, offset: int, data: bytes | None, length: int) -> None:
        """`data` at `offset`; None: `length` bytes of zeros (whole blocks as ZERO markers)."""
        at = 0
        while at < length:
            n, within = divmod(offset + at, BLOCK)
            take = min(BLOCK - within, length - at)
            if data is None and take == BLOCK:
                self.overlay[n] = ZERO
            else:
                block = await self._writable(n)  # nothing awaited from here to the copy in
                block[within : within + take] = data[at : at + take] if data is not None else bytes(take)
            at += take

    async def write(self, offset: int, data: bytes) -> None:
        self.counts["write"] += 1
        await self._modify(offset, data, len(data))

    async def flush(self) -> None:
        self.counts["flush"] += 1  # the overlay is memory: nothing more durable to reach

    async def discard(self, offset: int, length: int) -> None:
        self.counts["discard"] += 1
        await self._modify(offset, None, length)  # reads as zeros afterwards, as the API asks

    async def write_zeroes(self, offset: int, length: int) -> None:
        self.counts["write_zeroes"] += 1
        await self._modify(offset, None, length)


async def main(disk: CowDisk, base: str) -> None:
    before = hashlib.sha256(Path(base).read_bytes()).hexdigest()
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


def cli(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: cow_disk.py BASE.img", file=sys.stderr)
        return 2
    if not os.path.isfile(argv[0]):
        print(f"cow_disk.py: {argv[0]}: no such file (BASE is a disk image)", file=sys.stderr)
        return 2
    try:
        disk = CowDisk(argv[0])
    except OSError as e:
        print(f"cow_disk.py: {argv[0]}: {e.strerror}", file=sys.stderr)
        return 2
    if disk.size < 512:
        disk.close()
        print(f"cow_disk.py: {argv[0]}: smaller than one 512-byte sector", file=sys.stderr)
        return 2
    asyncio.run(main(disk, argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
