"""virtio-console driven from the driver's side (asyncvmm.testing.mock_driver), with real
clients on its ports' Unix sockets: the multiport control conversation, output both ways,
output kept from before a client connects (bounded, the drop counted), input flow control,
state out and back in, and the bad `-s` spellings."""

from __future__ import annotations

import asyncio
import json
import os
import socket

import pytest
from conftest import run_vmm
from test_cli import assert_usage_error

from asyncvmm.config import VmConfig, parse_slot
from asyncvmm.devices import registry
from asyncvmm.devices.virtio.console import (
    CONTROL,
    CONTROL_RX,
    CONTROL_TX,
    OUTPUT_BACKLOG,
    ConsoleFeature,
    ConsoleOptions,
    Event,
    VirtioConsole,
    rx_queue,
    tx_queue,
)
from asyncvmm.errors import ConfigError
from asyncvmm.testing.mock_driver import Harness, VirtioDriver


def run(coro):
    return asyncio.run(coro)


class Console:
    """A harness with one virtio-console of `names` ports, the driver set up."""

    def __init__(self, tmp_path, names=("con", "aux")):
        self.paths = [str(tmp_path / f"{n}.sock") for n in names]
        self.h = Harness()
        self.con = VirtioConsole(ConsoleOptions(tuple(zip(names, self.paths, strict=True))), self.h.mem)
        self.dev = self.h.add(self.con)
        self.drv = VirtioDriver(self.h, self.dev)

    async def __aenter__(self):
        await self.drv.setup(queue_size=16)
        self.q = self.drv.queues
        self._ctrl_bufs: dict[int, int] = {}
        self.post_control(8)
        return self

    async def __aexit__(self, *exc):
        self.h.close()

    # -- the control queues ---------------------------------------------------------------
    def post_control(self, n: int) -> None:
        q = self.q[CONTROL_RX]
        for _ in range(n):
            b = self.h.heap.alloc(64, 8)
            self._ctrl_bufs[q.add([(b, 64, True)])] = b
        q.kick()

    def send_control(self, port: int, event: int, value: int) -> None:
        q = self.q[CONTROL_TX]
        b = self.h.heap.alloc(CONTROL.size, 8)
        self.h.mem.write(b, CONTROL.pack(port, event, value))
        q.add([(b, CONTROL.size, False)])
        q.kick()

    async def control_messages(self, n: int) -> list[tuple[int, int, int, bytes]]:
        used = await self.q[CONTROL_RX].wait_used(n)
        out = []
        for head, length in used:
            data = self.h.mem.read(self._ctrl_bufs.pop(head), length)
            out.append((*CONTROL.unpack(data[: CONTROL.size]), data[CONTROL.size :]))
        self.post_control(len(used))
        return out

    async def bring_up(self) -> list[tuple[int, int, int, bytes]]:
        self.send_control(0xFFFF_FFFF, Event.DEVICE_READY, 1)
        adds = await self.control_messages(len(self.paths))
        msgs = list(adds)
        for p in range(len(self.paths)):
            self.send_control(p, Event.PORT_READY, 1)
            msgs += await self.control_messages(3 if p == 0 else 2)
        return msgs

    # -- the ports' data -------------------------------------------------------------------
    async def write(self, port: int, data: bytes) -> None:
        q = self.q[tx_queue(port)]
        b = self.h.heap.alloc(len(data), 8)
        self.h.mem.write(b, data)
        q.add([(b, len(data), False)])
        q.kick()
        await q.wait_used(1)

    def post_rx(self, port: int, n: int, size: int = 64) -> dict[int, int]:
        q = self.q[rx_queue(port)]
        bufs = {}
        for _ in range(n):
            b = self.h.heap.alloc(size, 8)
            bufs[q.add([(b, size, True)])] = b
        q.kick()
        return bufs


async def read_until(reader: asyncio.StreamReader, want: bytes, timeout: float = 5.0) -> bytes:
    got = b""
    while want not in got:
        got += await asyncio.wait_for(reader.read(65536), timeout)
    return got


def test_multiport_conversation_names_and_the_console_port(tmp_path):
    async def go():
        async with Console(tmp_path) as c:
            assert c.drv.has(ConsoleFeature.MULTIPORT)
            assert c.drv.config_read(4, 4) == 2  # max_nr_ports
            msgs = await c.bring_up()
            assert msgs == [
                (0, Event.PORT_ADD, 0, b""), (1, Event.PORT_ADD, 0, b""),
                (0, Event.CONSOLE_PORT, 1, b""), (0, Event.PORT_NAME, 0, b"con"), (0, Event.PORT_OPEN, 1, b""),
                (1, Event.PORT_NAME, 0, b"aux"), (1, Event.PORT_OPEN, 1, b""),
            ]
            c.send_control(1, Event.PORT_OPEN, 1)  # a guest process opened port 1
            await asyncio.sleep(0.05)
            s = c.con.stats()
            assert s["ports"]["aux"]["guest_open"] and s["ports"]["con"]["ready"]
            assert s["control"]["control_errors"] == 0
    run(go())


def test_output_kept_until_a_client_connects_then_both_ways(tmp_path):
    async def go():
        async with Console(tmp_path) as c:
            await c.bring_up()
            await c.write(0, b"early boot log\n")  # nobody connected yet: kept
            await c.write(1, b"on the second port\n")
            reader, writer = await asyncio.open_unix_connection(c.paths[0])
            assert await read_until(reader, b"early boot log\n") == b"early boot log\n"
            await c.write(0, b"later\n")
            assert await read_until(reader, b"later\n") == b"later\n"
            # input: kept until the guest posts receive buffers, then delivered
            writer.write(b"typed input")
            await writer.drain()
            await asyncio.sleep(0.05)
            bufs = c.post_rx(0, 2)
            used = await c.q[rx_queue(0)].wait_used(1)
            head, n = used[0]
            assert c.h.mem.read(bufs[head], n) == b"typed input"
            # a second client is refused while the first is there; the second port is its own
            r2, w2 = await asyncio.open_unix_connection(c.paths[1])
            assert await read_until(r2, b"on the second port\n") == b"on the second port\n"
            writer.close()
            w2.close()
            s = c.con.stats()["ports"]
            assert s["con"]["bytes_out"] == len(b"early boot log\nlater\n") and s["con"]["bytes_in"] == 11
            assert s["aux"]["clients"] == 1
    run(go())


def test_one_client_at_a_time(tmp_path):
    async def go():
        async with Console(tmp_path, names=("con",)) as c:
            await c.bring_up()
            r1, w1 = await asyncio.open_unix_connection(c.paths[0])
            await asyncio.sleep(0.05)
            r2, w2 = await asyncio.open_unix_connection(c.paths[0])
            assert await asyncio.wait_for(r2.read(10), 5) == b""  # closed at once
            await c.write(0, b"x")
            assert await read_until(r1, b"x") == b"x"
            w1.close()
            w2.close()
    run(go())


def test_output_backlog_is_bounded_and_the_drop_counted(tmp_path):
    async def go():
        async with Console(tmp_path, names=("con",)) as c:
            await c.bring_up()
            chunk = bytes(range(256)) * 16  # 4 KiB
            n = OUTPUT_BACKLOG // len(chunk) + 4
            for _ in range(n):
                await c.write(0, chunk)
            assert c.con.stats()["ports"]["con"]["dropped"] == 4 * len(chunk)
            reader, writer = await asyncio.open_unix_connection(c.paths[0])
            got = b""
            while len(got) < OUTPUT_BACKLOG:
                got += await asyncio.wait_for(reader.read(65536), 5)
            assert got == chunk * (OUTPUT_BACKLOG // len(chunk))  # the newest kept
            writer.close()
    run(go())


def test_input_flow_control_stops_reading_the_client(tmp_path):
    async def go():
        async with Console(tmp_path, names=("con",)) as c:
            await c.bring_up()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(c.paths[0])
            sock.setblocking(False)
            await asyncio.sleep(0.05)
            sent = 0
            blob = b"i" * 65536
            for _ in range(200):  # the guest posts nothing: the VMM stops reading, the socket fills
                try:
                    sent += sock.send(blob)
                except BlockingIOError:
                    await asyncio.sleep(0.01)
                    try:
                        sent += sock.send(blob)
                    except BlockingIOError:
                        break
            port = c.con.sockets[0]
            assert port.counters["bytes_in"] < sent  # not all read: the rest waits in the socket
            assert not port._socket._reading  # SocketConsole stopped reading the client
            # the guest takes some: reading resumes, nothing is lost
            total = 0
            while total < sent:
                c.post_rx(0, 8, 4096)
                used = await c.q[rx_queue(0)].wait_used(1)
                used += c.q[rx_queue(0)].take_used()
                total += sum(n for _, n in used)
                await asyncio.sleep(0)
            assert total == sent and port.counters["bytes_in"] == sent
            sock.close()
    run(go())


def test_console_state_out_and_back_in(tmp_path):
    async def go():
        async with Console(tmp_path, names=("con",)) as c:
            await c.bring_up()
            c.send_control(0, Event.PORT_OPEN, 1)
            await asyncio.sleep(0.05)
            state = json.loads(json.dumps(c.con.save()))
            assert state["device_ready"] and state["ports"] == [{"ready": True, "guest_open": True}]
            by_index = {q["index"]: q for q in state["queues"]}
            assert by_index[CONTROL_TX]["last_avail"] == 3  # DEVICE_READY, PORT_READY, PORT_OPEN
            c.con.reset()
            assert not c.con.device_ready
            # the same device, the driver's queues set up again as they were, state back in
            from asyncvmm.devices.virtio.device import QueueConfig
            qs = [QueueConfig(q.index, q.size, q.desc, q.avail, q.used, None, c.dev.kick_fds[q.index]) for q in c.q]
            before = c.con.counters["control_in"]
            c.con.restore(state)  # taken at the next activate, before a queue is served
            c.con.activate(c.drv.features, qs)
            assert c.con.ports[0].guest_open and c.con.device_ready
            assert len(c.q[CONTROL_TX].take_used()) == 3  # what the first activation used
            c.send_control(0, Event.PORT_OPEN, 0)  # the driver carries on on the same rings
            await c.q[CONTROL_TX].wait_used(1)
            assert c.q[CONTROL_TX].used_idx() == 4
            assert c.con.counters["control_in"] == before + 1  # the three before were not served again
            assert not c.con.ports[0].guest_open
    run(go())


# -- bad input ------------------------------------------------------------------------------
def check(conf: str):
    registry.check_slots(VmConfig(kernel="/dev/null", slots=[parse_slot(f"4,virtio-console{conf}")]))


def test_bad_spellings(tmp_path):
    a, b = tmp_path / "a.sock", tmp_path / "b.sock"
    with pytest.raises(ConfigError, match="name at least one port"):
        check("")
    with pytest.raises(ConfigError, match="NAME=PATH"):
        check(f",{a}")
    with pytest.raises(ConfigError, match="port name 'con' is given twice"):
        check(f",con={a},con={b}")
    with pytest.raises(ConfigError, match="given to two ports"):
        check(f",con={a},aux={a}")
    with pytest.raises(ConfigError, match="no directory"):
        check(f",con={tmp_path}/no/such/dir/x.sock")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="not a socket"):
        check(f",con={tmp_path / 'file'}")
    check(f",con={a},aux={b}")


def test_a_live_listener_is_refused_a_stale_socket_replaced(tmp_path):
    path = str(tmp_path / "live.sock")
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(path)
    live.listen(1)
    try:
        with pytest.raises(ConfigError, match="is in use"):
            check(f",con={path}")
    finally:
        live.close()
    check(f",con={path}")  # left behind by a process that is gone: fine


def test_cli_refuses_bad_console_and_rnd_options(tmp_path, guests):
    kernel = str(guests / "hello.elf")
    a = str(tmp_path / "a.sock")
    r = run_vmm("run", "--kernel", kernel, "-s", f"4,virtio-console,con={a},con={tmp_path / 'b.sock'}")
    assert_usage_error(r, "-s 4,virtio-console", "port name 'con' is given twice")
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(a)
    live.listen(1)
    try:
        r = run_vmm("run", "--kernel", kernel, "-s", f"4,virtio-console,con={a}")
        assert_usage_error(r, "-s 4,virtio-console", "is in use")
        assert os.path.exists(a)  # nothing started: the other listener's socket is untouched
    finally:
        live.close()
    assert_usage_error(run_vmm("run", "--kernel", kernel, "-s", "5,virtio-rnd,rate=0"), "-s 5,virtio-rnd", "rate=")
