"""virtio-rnd: the entropy device (virtio 1.2, 5.4), `-s N,virtio-rnd[,rate=BYTES_PER_SEC]`.

The whole device: one queue (requestq) of device-writable buffers, each filled with bytes
from the host's getrandom(2); no configuration space, no device features. With `rate`, a
token bucket holds the device to that many bytes per second (after Firecracker's entropy
device): a request the bucket cannot pay for waits — it is left on the ring and served
when tokens come — it never fails. The bucket holds a tenth of a second's bytes (at least
64, at most `rate`), so a driver that asks after a pause gets that much at once.

Counted: bytes served, requests, and how often a request waited for tokens (`asyncvmm ctl
stats`). The device is also the example of the runtime (worker.py, queue.py): a device is
its features, its config, what `activate` serves, its state, and its `-s` registration.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

from ...config import PciSlot, VmConfig
from ...errors import ConfigError
from ...vstate.memory import GuestMemory
from ..pci.regs import ClassCode
from ..registry import register, slot_name
from .device import DeviceError, QueueConfig, VirtioDevice
from .queue import Chain, RingSetupError, Virtqueue, VqState
from .spec import DeviceId
from .transport_pci import virtio_pci_function
from .worker import QueueWorker

QUEUE_SIZE = 64
CHUNK_MAX = 64 << 10  # bytes per request at most (a driver may post a bigger buffer; it gets this)
MIN_BURST = 64  # the bucket holds at least this many bytes (Linux asks for 32..64 at a time)


@dataclass(frozen=True)
class RndOptions:
    rate: int = 0  # bytes per second; 0: as fast as getrandom gives them

    @classmethod
    def parse(cls, text: str, where: str) -> "RndOptions":
        rate = 0
        for opt in filter(None, text.split(",")):
            key, sep, value = opt.partition("=")
            if key == "rate" and sep and value.isdigit() and int(value) > 0:
                rate = int(value)
            else:
                raise ConfigError(f"-s {where}virtio-rnd,{text}: use rate=BYTES_PER_SEC (a whole number above 0)")
        return cls(rate)


class TokenBucket:
    """`rate` tokens (bytes) a second, at most `capacity` banked."""

    def __init__(self, rate: int, capacity: int, now: float | None = None):
        self.rate = rate
        self.capacity = capacity
        self.tokens = float(capacity)
        self.stamp = time.monotonic() if now is None else now

    def _refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, want: int, least: int, now: float | None = None) -> int:
        """Up to `want` tokens if at least `least` are there, else 0."""
        self._refill(time.monotonic() if now is None else now)
        if self.tokens < least:
            return 0
        n = min(want, int(self.tokens))
        self.tokens -= n
        return n

    def wait(self, least: int) -> float:
        """Seconds until `least` tokens are banked."""
        return max(0.0, (least - self.tokens) / self.rate)


@dataclass
class RndState:
    """What virtio-rnd keeps across a save and restore: its queue and its counters."""

    queue: dict | None  # VqState.to_dict()
    bytes: int
    requests: int
    waits: int


class VirtioRnd(VirtioDevice):
    device_id = DeviceId.RNG
    pci_class = ClassCode.OTHER

    def __init__(self, opts: RndOptions, mem: GuestMemory, *, name: str = "virtio-rnd"):
        super().__init__(1, QUEUE_SIZE)
        self.name = name
        self.opts = opts
        self.mem = mem
        self.worker = QueueWorker(name, self.needs_reset)
        self.vq: Virtqueue | None = None
        self.bucket: TokenBucket | None = None
        if opts.rate:
            self.bucket = TokenBucket(opts.rate, max(opts.rate // 10, min(opts.rate, MIN_BURST)))
        self.counters = {"bytes": 0, "requests": 0, "waits": 0}

    def activate(self, features: int, queues: list[QueueConfig]) -> None:
        for q in queues:  # the one queue, if the driver enabled it
            try:
                self.vq = Virtqueue.setup(self.mem, q, features, what="requestq")
            except RingSetupError as e:
                raise DeviceError(str(e)) from None
            state = self.take_restored()
            if state is not None:
                self._apply_state(state)
            self.worker.start()
            self.worker.serve(self.vq, self._request)

    def _request(self, chain: Chain) -> int | None:
        """Fill the chain's writable buffers: bytes written, or None to wait for tokens."""
        want = min(chain.in_len, CHUNK_MAX)
        if self.bucket is not None and want:
            least = min(want, self.bucket.capacity)
            n = self.bucket.take(want, least)
            if not n:
                self.counters["waits"] += 1
                self.worker.later("tokens", self.bucket.wait(least), self.worker.resume, self.vq)
                return None
            want = n
        written = chain.write(os.getrandom(want)) if want else 0
        self.counters["bytes"] += written
        self.counters["requests"] += 1
        return written

    def reset(self) -> None:
        self.worker.stop()
        self.vq = None

    def save(self) -> dict:
        c = self.counters
        return asdict(RndState(self.vq.state().to_dict() if self.vq else None, c["bytes"], c["requests"], c["waits"]))

    def _apply_state(self, state: dict) -> None:
        s = RndState(**state)
        if s.queue is not None:
            self.vq.restore(VqState.from_dict(s.queue))
        self.counters.update(bytes=s.bytes, requests=s.requests, waits=s.waits)

    def stats(self) -> dict:
        return {
            "entropy": {**self.counters, "rate": self.opts.rate or "unlimited", **self.worker.counters},
            "queues": [self.vq.stats()] if self.vq is not None else [],
        }

    def close(self) -> None:
        self.worker.stop(closing=True)


# -- `-s N,virtio-rnd[,rate=BYTES_PER_SEC]` --------------------------------------------------
def _check(slot: PciSlot, cfg: VmConfig) -> None:
    RndOptions.parse(slot.options, slot_name(slot))


def _build(slot: PciSlot, ctx):
    rnd = VirtioRnd(RndOptions.parse(slot.options, slot_name(slot)), ctx.mem,
                    name=f"virtio-rnd@{slot.slot}.{slot.function}")
    return virtio_pci_function(rnd, ctx)


register("virtio-rnd", _check, _build)
