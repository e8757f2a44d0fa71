"""The virtio device runtime (queue.py, worker.py, registry.py) and virtio-rnd, its example
device, driven from the driver's side (asyncvmm.testing.mock_driver): rings, bad chains,
the budget, a broken ring and the reset after it, state out and back in, the rate limit."""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest

from asyncvmm.config import VmConfig, parse_slot
from asyncvmm.devices import registry
from asyncvmm.devices.virtio.device import QueueConfig
from asyncvmm.devices.virtio.queue import (
    RingBroken,
    RingFlag,
    RingSetupError,
    SetupFailure,
    Virtqueue,
    VqState,
    ring_flags,
)
from asyncvmm.devices.virtio.rnd import RndOptions, TokenBucket, VirtioRnd
from asyncvmm.devices.virtio.spec import Feature, Status, VqError, bits
from asyncvmm.errors import ConfigError
from asyncvmm.testing.mock_driver import DeviceLog, Harness, Heap, MockQueue, VirtioDriver


def run(coro):
    return asyncio.run(coro)


# -- the queue ---------------------------------------------------------------------------------
def test_features_map_to_ring_flags():
    assert ring_flags(bits(Feature.VERSION_1)) == 0
    assert ring_flags(bits(Feature.RING_EVENT_IDX)) == RingFlag.EVENT_IDX
    assert ring_flags(bits(Feature.RING_EVENT_IDX, Feature.RING_INDIRECT_DESC, Feature.VERSION_1)) == (
        RingFlag.EVENT_IDX | RingFlag.INDIRECT)


def test_setup_errors_are_named(mem):
    heap = Heap(mem)
    mq = MockQueue.create(mem, heap, 8)
    bad = QueueConfig(0, 8, mq.desc + 8, mq.avail, mq.used, None, -1)  # desc not 16-aligned
    with pytest.raises(RingSetupError) as e:
        Virtqueue.setup(mem, bad, 0)
    assert e.value.failure is SetupFailure.MISALIGNED and "not aligned" in str(e.value)
    outside = QueueConfig(0, 8, 1 << 40, mq.avail, mq.used, None, -1)
    with pytest.raises(RingSetupError) as e:
        Virtqueue.setup(mem, outside, 0)
    assert e.value.failure is SetupFailure.OUTSIDE_RAM and "not in guest RAM" in str(e.value)


def test_pop_read_write_push_publish(mem):
    heap = Heap(mem)
    mq = MockQueue.create(mem, heap, 8)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        vq = Virtqueue.setup(mem, QueueConfig(0, 8, mq.desc, mq.avail, mq.used, None, efd), 0)
        a, b = heap.alloc(5), heap.alloc(16)
        mem.write(a, b"hello")
        head = mq.add([(a, 5, False), (b, 16, True)])
        assert vq.pending() == 1
        chain = vq.pop()
        assert chain.head == head and chain.error is None and (chain.out_len, chain.in_len) == (5, 16)
        assert chain.read() == b"hello" and chain.read(2) == b"he"
        assert chain.write(b"world", 3) == 5
        vq.push(chain, 8)
        assert mq.used_idx() == 0  # not published yet
        vq.publish()
        assert mq.take_used() == [(head, 8)]
        assert mem.read(b, 8) == b"\0\0\0world"
        assert vq.pop() is None
        assert vq.stats()["chains"] == 1
    finally:
        os.close(efd)


def test_a_python_device_marks_what_it_wrote_once_written(mem):
    """A device served from Python (virtio-rnd, virtio-console) writes through Chain.write:
    with a dirty log kept, the pages written are marked then (after the write, as the C
    data paths do), and a buffer popped but not written is not marked."""
    heap = Heap(mem)
    mq = MockQueue.create(mem, heap, 8)
    log = DeviceLog(mem)
    try:
        vq = Virtqueue.setup(mem, QueueConfig(0, 8, mq.desc, mq.avail, mq.used, None, -1), 0)
        a, b = heap.alloc(2 * 4096), heap.alloc(4096)
        mq.add([(a, 4096, True), (a + 4096, 4096, True)])
        mq.add([(b, 4096, True)])
        first, second = vq.pop(), vq.pop()
        assert log.take() == set()  # handed out, nothing written yet
        assert first.write(b"x" * 10, 4096 + 100) == 10
        assert log.take() == DeviceLog.pages(a + 4096, 1)
        assert second.write(b"") == 0 and log.take() == set()
    finally:
        log.stop()


def test_the_vmms_own_writes_are_marked_while_a_log_is_kept(mem):
    """GuestMemory.write is the VMM writing guest RAM itself (fw_cfg's DMA, a gdb client's
    memory write, a quirk's store), which KVM's dirty log never sees: a migration or a diff
    snapshot must hear of it from the data path's log. Before a log is kept it costs nothing."""
    mem.write(0x20_0000, b"before")  # no log: nothing to mark, nothing fails
    log = DeviceLog(mem)
    try:
        assert log.take() == set()
        mem.write(0x20_0000 + 4090, b"0123456789")  # across a page boundary
        assert log.take() == DeviceLog.pages(0x20_0000 + 4090, 10)
        mem.write(0x30_0000, b"")
        assert log.take() == set()
    finally:
        log.stop()


def test_a_broken_ring_raises_with_its_error(mem):
    heap = Heap(mem)
    mq = MockQueue.create(mem, heap, 8)
    vq = Virtqueue.setup(mem, QueueConfig(0, 8, mq.desc, mq.avail, mq.used, None, -1), 0)
    mq.publish(200)  # a head past the queue's size
    with pytest.raises(RingBroken) as e:
        vq.pop()
    assert e.value.error is VqError.HEAD_RANGE and vq.broken is VqError.HEAD_RANGE
    assert "head_range" in str(e.value)


def test_queue_state_out_and_back_in(mem):
    heap = Heap(mem)
    mq = MockQueue.create(mem, heap, 8)
    cfg = QueueConfig(0, 8, mq.desc, mq.avail, mq.used, None, -1)
    flags = bits(Feature.RING_EVENT_IDX)
    vq = Virtqueue.setup(mem, cfg, flags)
    bufs = [heap.alloc(4) for _ in range(3)]
    heads = [mq.add([(x, 4, True)]) for x in bufs]
    for _ in range(2):
        c = vq.pop()
        vq.push(c, 4)
    vq.publish()
    state = json.loads(json.dumps(vq.state().to_dict()))  # plain data
    assert state["last_avail"] == 2 and state["used_idx"] == 2 and state["desc"] == mq.desc

    again = Virtqueue.setup(mem, cfg, flags)  # a new queue on the same rings: from the start...
    assert again.pop().head == heads[0]
    again = Virtqueue.setup(mem, cfg, flags)
    again.restore(VqState.from_dict(state))  # ... unless restored: it carries on
    c = again.pop()
    assert c.head == heads[2]
    again.push(c, 4)
    again.publish()
    assert [h for h, _ in mq.take_used()] == heads
    with pytest.raises(ValueError):
        Virtqueue.setup(mem, cfg, 0).restore(VqState.from_dict(state))  # other flags: refused


# -- the registry --------------------------------------------------------------------------------
def test_registry_knows_the_drivers_and_config_asks_it():
    assert {"hostbridge", "virtio-blk", "virtio-net", "virtio-rnd", "virtio-console"} <= set(registry.names())
    assert registry.lookup("nosuch") is None
    assert parse_slot("3,virtio-rnd,rate=100").options == "rate=100"
    with pytest.raises(ConfigError, match="no such driver"):
        parse_slot("3,nosuch")


def test_every_provider_registers_its_driver():
    for name in registry.PROVIDERS:
        assert registry.lookup(name).name == name


def test_a_driver_module_is_imported_only_for_its_driver():
    import subprocess
    import sys
    code = ("import sys; from asyncvmm.devices import registry; from asyncvmm.cli import _parser; "
            "_parser().format_help(); registry.lookup('virtio-rnd'); "
            "print(sorted(m for m in sys.modules if m.startswith('asyncvmm.devices.virtio.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    mods = eval(out)  # noqa: S307 - our own subprocess's repr of a list of names
    assert "asyncvmm.devices.virtio.rnd" in mods
    assert not [m for m in mods if m.startswith(("asyncvmm.devices.virtio.block", "asyncvmm.devices.virtio.net",
                                                   "asyncvmm.devices.virtio.console"))]


def test_config_does_not_import_the_devices():
    import subprocess
    import sys
    code = ("import sys, asyncvmm.config as c; "
            "print(sorted(m for m in sys.modules if m.startswith('asyncvmm.devices.virtio')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("conf, words", [
    ("rate=0", "rate=BYTES_PER_SEC"), ("rate=fast", "rate=BYTES_PER_SEC"), ("speed=10", "rate=BYTES_PER_SEC"),
])
def test_rnd_bad_options(conf, words):
    cfg = VmConfig(kernel="/dev/null", slots=[parse_slot(f"3,virtio-rnd,{conf}")])
    with pytest.raises(ConfigError, match=words):
        registry.check_slots(cfg)


# -- virtio-rnd through the transport ------------------------------------------------------------
class Rnd:
    def __init__(self, rate: int = 0, budget: int | None = None):
        self.h = Harness()
        self.rnd = VirtioRnd(RndOptions(rate), self.h.mem)
        if budget:
            self.rnd.worker.budget = budget
        self.dev = self.h.add(self.rnd)
        self.drv = VirtioDriver(self.h, self.dev)

    async def __aenter__(self):
        await self.drv.setup()
        self.q = self.drv.queues[0]
        return self

    async def __aexit__(self, *exc):
        self.h.close()

    def post(self, n: int, size: int) -> list[int]:
        bufs = [self.h.heap.alloc(size, 16) for _ in range(n)]
        for b in bufs:
            self.q.add([(b, size, True)])
        self.q.kick()
        return bufs


def test_rnd_fills_each_buffer_with_fresh_bytes():
    async def go():
        async with Rnd() as r:
            bufs = r.post(4, 256)
            used = await r.q.wait_used(4)
            assert [n for _, n in used] == [256] * 4
            data = [r.h.mem.read(b, 256) for b in bufs]
            assert len(set(data)) == 4 and bytes(256) not in data
            assert r.q.interrupts() >= 1
            s = r.rnd.stats()["entropy"]
            assert (s["bytes"], s["requests"], s["waits"]) == (1024, 4, 0)
    run(go())


def test_rnd_gives_back_a_bad_chain_unused_and_carries_on():
    async def go():
        async with Rnd() as r:
            r.q.add([(1 << 40, 64, True)])  # outside guest RAM
            good = r.post(1, 32)[0]
            used = await r.q.wait_used(2)
            assert [n for _, n in used] == [0, 32]
            assert r.h.mem.read(good, 32) != bytes(32)
            assert r.rnd.stats()["entropy"]["bad_chains"] == 1
            assert not r.drv.status & Status.NEEDS_RESET
    run(go())


def test_rnd_serves_a_budget_per_callback():
    async def go():
        async with Rnd(budget=8) as r:
            watch = r.q.watch_used()
            r.post(40, 16)
            await r.q.wait_used(40)
            seen = watch.stop()
            assert max(b - a for a, b in zip(seen, seen[1:], strict=False)) <= 8  # other callbacks ran between
            assert r.rnd.stats()["entropy"]["budget_spent"] >= 4
    run(go())


def test_a_broken_ring_needs_reset_and_a_reset_recovers():
    async def go():
        async with Rnd() as r:
            r.q.publish(999)  # a head past the queue's end: the ring is broken
            r.q.kick()
            for _ in range(100):
                await asyncio.sleep(0.005)
                if r.drv.status & Status.NEEDS_RESET:
                    break
            assert r.drv.status & Status.NEEDS_RESET
            assert not r.rnd.worker.watching(r.q.kick_fd)  # stopped: the doorbell is not read
            await r.drv.setup()  # reset, then the driver starts again
            r.q = r.drv.queues[0]
            r.post(1, 16)
            assert [n for _, n in await r.q.wait_used(1)] == [16]
    run(go())


def test_rnd_rate_limit_holds():
    rate = 4000

    async def go():
        async with Rnd(rate=rate) as r:
            burst = r.rnd.bucket.capacity
            r.post(60, 100)
            total = 0
            t0 = time.monotonic()
            while time.monotonic() - t0 < 1.5:
                got = r.q.take_used()
                total += sum(n for _, n in got)
                if got:  # keep buffers posted: the guest always wants more
                    r.post(len(got), 100)
                await asyncio.sleep(0.01)
            elapsed = time.monotonic() - t0
            expected = burst + rate * elapsed
            assert 0.85 * expected <= total <= expected + 100, (total, expected)
            s = r.rnd.stats()["entropy"]
            assert s["waits"] > 0 and s["bytes"] >= total
            assert not r.drv.status & Status.NEEDS_RESET  # waiting is not failing
    run(go())


def test_token_bucket():
    b = TokenBucket(rate=1000, capacity=100, now=0.0)
    assert b.take(150, 100, now=0.0) == 100
    assert b.take(10, 10, now=0.0) == 0
    assert b.wait(10) == pytest.approx(0.01)
    assert b.take(50, 10, now=0.05) == 50
    assert b.take(500, 10, now=10.0) == 100  # banked at most `capacity`


def test_rnd_state_out_and_back_in():
    """A second device restored from the first's state carries on on the same rings."""
    async def go():
        async with Rnd() as r:
            r.post(3, 8)
            await r.q.wait_used(3)
            state = json.loads(json.dumps(r.rnd.save()))
            assert state["bytes"] == 24 and state["queue"]["last_avail"] == 3
            r.rnd.reset()  # the first stops serving the ring
            kick = os.eventfd(0, os.EFD_NONBLOCK)
            second = VirtioRnd(RndOptions(), r.h.mem)
            try:
                q = r.q
                second.restore(state)  # taken at the next activate, before the queue is served
                second.activate(r.drv.features, [QueueConfig(0, q.size, q.desc, q.avail, q.used, None, kick)])
                head = q.add([(r.h.heap.alloc(8), 8, True)])
                os.eventfd_write(kick, 1)
                assert await q.wait_used(1) == [(head, 8)]
                assert q.used_idx() == 4  # after the three the first device used
                assert second.stats()["entropy"]["bytes"] == 32
            finally:
                second.close()
                os.close(kick)
    run(go())
