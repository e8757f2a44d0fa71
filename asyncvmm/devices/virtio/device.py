"""What a virtio device is to its transport: features, config space, queues to run.

The transport (transport_pci.py) does the generic part of virtio — status, feature
negotiation, queue configuration, notifications, interrupts, reset — and hands the device
its queues when the driver sets DRIVER_OK. A device turns queues into work: blk hands each
queue's ioeventfd to its C data path.

Call order (the transport's):

    features()                         any time: what the device offers
    read_config/write_config           any time
    activate(features, queues)         at DRIVER_OK, with the queues the driver enabled
    save() -> dict                     any time the device is quiesced: its state, plain data
    restore(state)                     before activate: the next activate carries on from it
                                       (queue indices, what the driver set) before it serves
                                       any queue
    reset()                            on a device reset (status 0); then quiesced() until
                                       in-flight work has drained, and activate() again
    close()                            when the VM goes away

A device that finds the driver broke the rules calls `self.needs_reset(why)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ...irq import IntxLine, MsiVector


@dataclass
class QueueConfig:
    """One queue as the driver configured it (addresses are guest physical)."""

    index: int
    size: int
    desc: int
    driver: int  # the avail ring
    device: int  # the used ring
    vector: MsiVector | IntxLine | None  # what the queue raises (.c: its struct avmm_irq); None: nothing
    kick_fd: int  # the queue's notify eventfd


class DeviceError(Exception):
    """The driver's configuration cannot work (the transport sets NEEDS_RESET)."""


class VirtioDevice:
    device_id: int = 0
    name: str = "virtio"
    pci_class: int = 0
    config_size: int = 0

    def __init__(self, num_queues: int, queue_max_size: int):
        self.num_queues = num_queues
        self.queue_max_size = queue_max_size
        self._needs_reset: Callable[[str], None] = lambda why: None
        self._restored: dict | None = None

    def bind(self, needs_reset: Callable[[str], None]) -> None:
        """The transport's hook for a device that breaks down."""
        self._needs_reset = needs_reset

    def needs_reset(self, why: str) -> None:
        self._needs_reset(why)

    def features(self) -> int:
        return 0

    def save(self) -> dict:
        """The device's state as plain data (JSON-able)."""
        return {}

    def restore(self, state: dict) -> None:
        """Carry on from save()'s data at the next activate (on the same rings)."""
        self._restored = state

    def take_restored(self) -> dict | None:
        """For activate: the state restore() left, once."""
        state, self._restored = self._restored, None
        return state

    def read_config(self, offset: int, size: int) -> int:
        return 0

    def write_config(self, offset: int, size: int, value: int) -> None:
        """Most config fields are read-only: a write is dropped (and counted by the transport)."""

    def activate(self, features: int, queues: list[QueueConfig]) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        pass

    def quiesced(self) -> bool:
        return True

    def stats(self) -> dict:
        return {}

    def close(self) -> None:
        pass
