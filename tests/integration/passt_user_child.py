"""test_passt.py's plain user: a virtio-net on passt, DHCP through it, as whoever runs this.
Prints uid=, passt_uid= and lease= (the address passt gave)."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from passt_peer import Guest  # noqa: E402

from asyncvmm.devices.virtio.net.device import VirtioNet  # noqa: E402
from asyncvmm.devices.virtio.net.tap import NetOptions, stable_mac  # noqa: E402
from asyncvmm.testing.mock_driver import Harness, NetClient, VirtioDriver  # noqa: E402


async def main() -> None:
    with Harness() as h:
        dev = h.add(VirtioNet(NetOptions.parse("passt"), h.mem, mac=stable_mac("user", "passt"), queues=1))
        drv = VirtioDriver(h, dev)
        await drv.setup()
        c = NetClient(drv)
        c.post_rx(64)
        lease = await Guest(c, dev.device.mac).dhcp()
        passt_uid = os.stat(f"/proc/{dev.device.tap.pid}").st_uid
        print(f"uid={os.getuid()} passt_uid={passt_uid} lease={ipaddress.IPv4Address(lease.address)}")


asyncio.run(main())
