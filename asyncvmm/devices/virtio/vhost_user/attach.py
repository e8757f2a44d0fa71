"""The vhost-user back-ends of a VM's disks, connected before the machine is built.

`prepare(host, cfg)` runs once per VM, on the loop, before the first boot: for each
virtio-blk slot with `vhost-user=SOCKET` it connects to that socket; for each whose image
is not raw (formats.py) it starts qemu-storage-daemon (qsd.py) and connects to its export.
Each connection is negotiated there (features, queues, configuration space: backend.py),
so building the device later is synchronous. The back-ends live in the VM's
HostResources: a guest reset keeps them, the VM's end closes them (`stop(host)`).
"""

from __future__ import annotations

from ....config import PciSlot, VmConfig
from ....errors import ConfigError
from ...registry import slot_name
from ..block.formats import check_format
from ..block.image import BlockOptions, needs_backend
from .backend import Backend
from .blk import CONFIG_SIZE
from .protocol import VhostUserError
from .qsd import Daemon


def wants_backend(slot: PciSlot) -> bool:
    """Whether the slot's disk is served by a vhost-user back-end (guest RAM must be shared)."""
    if slot.driver != "virtio-blk":
        return False
    return needs_backend(BlockOptions.parse(slot.options, slot_name(slot)))


async def prepare(host, cfg: VmConfig) -> None:
    for slot in cfg.slots:
        key = (slot.slot, slot.function)
        if key in host.backends or not wants_backend(slot):
            continue
        opts = BlockOptions.parse(slot.options, slot_name(slot))
        daemon = None
        if opts.vhost_user:
            sock = what = opts.vhost_user
        else:
            found = check_format(opts.path, opts.format)
            daemon = await Daemon.start(opts.path, found.format, readonly=opts.readonly, queues=opts.queues or cfg.cpus,
                                        explicit=bool(opts.format), direct=opts.direct)
            sock, what = daemon.socket, opts.path
        try:
            backend = await Backend.connect(sock, what, CONFIG_SIZE, starting=daemon is not None)
        except (OSError, VhostUserError, TimeoutError) as e:
            if daemon is not None:
                await daemon.stop(quiet=True)
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or "no answer"
            raise ConfigError(f"-s {slot_name(slot)}virtio-blk,{slot.options}: vhost-user back-end {sock}: {why}") from None
        except BaseException:
            if daemon is not None:
                await daemon.stop(quiet=True)
            raise
        backend.process = daemon
        if daemon is not None:
            daemon.connected()
        host.backends[key] = backend


async def stop(host) -> None:
    """Close every back-end's connection, and stop the daemons asyncvmm started."""
    backends, host.backends = host.backends, {}
    for b in backends.values():
        b.close()
        if b.process is not None:
            await b.process.stop()
