"""Live migration: `asyncvmm ctl migrate NAME unix:PATH|tcp:HOST:PORT` sends a running VM to
an `asyncvmm run --incoming ADDRESS` waiting there, and ends once it runs there.

The stream, one message after another, each `kind` (4 bytes) + payload length (u64 LE):

    source -> destination   CONF   JSON {version, config, disks}: the machine to build
    destination -> source   OKAY   (or FAIL, JSON {message}: nothing was started)
    source -> destination   PAGE   region (u32), first page (u64), then whole pages
                            ...    pre-copy: every non-zero page while the guest runs, then
                                   rounds of the pages written meanwhile (the dirty logs,
                                   snapshot/dirty.py) until few are left or MAX_ROUNDS
                            STAT   stop-and-copy: the VM paused, its devices drained and held,
                                   the last pages, then the machine's state as JSON
    destination -> source   RUNS   the destination's vCPUs run: the source ends

Downtime is from the source's pause to its reading RUNS. If anything fails before RUNS —
the peer refuses, disappears, or the stream breaks — the source goes on running (its held
devices released, its vCPUs resumed) and the migration reports why.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import time
from typing import Any

from .._native import ffi, lib
from ..errors import ConfigError, VmmError
from ..log import get_logger
from . import file
from .dirty import DirtyLog, runs, used_rings
from .state import apply_state, check_disks, config_from_dict, config_to_dict, disk_stamps, save_machine

log = get_logger("asyncvmm.snapshot")

VERSION = 1
FRAME = struct.Struct("<4sQ")
PAGES = struct.Struct("<IQ")
PAGE = file.PAGE
CHUNK_PAGES = 256  # pages per PAGE message (1 MiB)
MAX_ROUNDS = 8  # pre-copy rounds before stop-and-copy whatever is left
STOP_COPY_PAGES = 512  # stop and copy once a round has fewer pages than this (2 MiB)
MAX_MESSAGE = 64 << 20
ANSWER_TIMEOUT = 60.0  # seconds for the destination to build its machine, or to run


class MigrationError(VmmError):
    """The migration failed; the source runs on."""


def parse_address(text: str) -> tuple[str, Any]:
    """unix:PATH or tcp:HOST:PORT; ConfigError (one line) otherwise."""
    kind, _, rest = text.partition(":")
    if kind == "unix" and rest:
        return "unix", rest
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        if host and port.isdigit() and 0 < int(port) < 65536:
            return "tcp", (host.strip("[]"), int(port))
    raise ConfigError(f"{text!r}: a migration address is unix:PATH or tcp:HOST:PORT")


async def _send(writer: asyncio.StreamWriter, kind: bytes, *payload) -> None:
    length = sum(len(p) for p in payload)
    writer.write(FRAME.pack(kind, length))
    for p in payload:
        writer.write(p)
    await writer.drain()


async def _recv(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    kind, length = FRAME.unpack(await reader.readexactly(FRAME.size))
    if length > MAX_MESSAGE:
        raise MigrationError(f"a {kind!r} message of {length} bytes: not an asyncvmm migration stream")
    return kind, await reader.readexactly(length)


# -- the source --------------------------------------------------------------------------------
async def _send_runs(writer, mem, bitmaps: list[bytes]) -> int:
    sent = 0
    for i, (r, bits) in enumerate(zip(mem.regions, bitmaps, strict=True)):
        for first, count in runs(bits, r.size // PAGE):
            for p in range(first, first + count, CHUNK_PAGES):
                n = min(CHUNK_PAGES, first + count - p)
                view = mem.view(r.gpa + p * PAGE, n * PAGE)
                try:
                    await _send(writer, b"PAGE", PAGES.pack(i, p), view)
                finally:
                    view.release()
                sent += n
    return sent


def _nonzero_bitmaps(mem) -> list[bytes]:
    """A bitmap per region of its non-zero pages (the first round sends only those)."""
    out = []
    for r in mem.regions:
        n = r.size // PAGE
        flags = ffi.new("uint8_t[]", n)
        lib.avmm_nonzero_pages(ffi.cast("uint8_t *", r.hva), n, flags)
        value = 0
        raw = bytes(ffi.buffer(flags, n))
        i = raw.find(1)
        while i >= 0:
            j = raw.find(0, i)
            j = n if j < 0 else j
            value |= ((1 << (j - i)) - 1) << i
            i = raw.find(1, j)
        out.append(value.to_bytes((n + 63) // 64 * 8, "little"))
    return out


async def migrate(vm, address: str) -> dict:
    """Send VM `vm` (api.VM) to the destination at `address`; returns the rounds, pages and
    downtime once the destination runs it (the VM here then stops). MigrationError if it
    fails — the VM here goes on running."""
    from .take import refuse_unseen_writers  # noqa: PLC0415

    kind, where = parse_address(address)
    m = vm._live("it cannot be migrated")
    refuse_unseen_writers(m, "the VM cannot be migrated")
    if getattr(m, "migrating", False):
        raise MigrationError("a migration of this VM is already under way")
    # One migration at a time, and no snapshot meanwhile: both take the dirty log's passes.
    m.migrating = True
    try:
        return await _migrate(vm, m, address, kind, where)
    finally:
        m.migrating = False


async def _migrate(vm, m, address: str, kind: str, where) -> dict:
    """migrate()'s work, with the VM marked as migrating."""
    from .take import _drain, _park, _virtio_devices  # noqa: PLC0415

    t0 = time.monotonic()
    try:
        if kind == "unix":
            reader, writer = await asyncio.open_unix_connection(where)
        else:
            reader, writer = await asyncio.open_connection(*where)
    except OSError as e:
        raise MigrationError(f"cannot reach {address}: {e.strerror or e}") from None
    held: list = []
    paused_here = False
    try:
        await _send(writer, b"CONF", json.dumps({"version": VERSION, "config": config_to_dict(m.config),
                                                 "disks": disk_stamps(m.config)}).encode())
        async with asyncio.timeout(ANSWER_TIMEOUT):
            answer, body = await _recv(reader)
        if answer != b"OKAY":
            why = json.loads(body).get("message", "?") if answer == b"FAIL" else f"answered {answer!r}"
            raise MigrationError(f"the destination {address} refused: {why}")
        if getattr(m, "dirty_log", None) is None:
            m.dirty_log = DirtyLog(m)
        m.dirty_log.start()  # from here every write is logged: what the rounds send again
        rounds = [await _send_runs(writer, m.mem, await asyncio.to_thread(_nonzero_bitmaps, m.mem))]
        while len(rounds) < MAX_ROUNDS:
            bitmaps = m.dirty_log.collect(extra=used_rings(m))
            if sum(int.from_bytes(b, "little").bit_count() for b in bitmaps) < STOP_COPY_PAGES:
                break
            rounds.append(await _send_runs(writer, m.mem, bitmaps))
        else:
            bitmaps = m.dirty_log.collect(extra=used_rings(m))
        # Stop and copy: from the pause to RUNS is the downtime.
        async with vm._vcpu_lock:
            was_paused = m.paused
            paused_at = time.monotonic()
            m.pause()
            paused_here = not was_paused
            await _park(m)
            await _drain(m)
            for dev in _virtio_devices(m):
                dev.worker.hold()
                held.append(dev.worker)
            await _drain(m)
            m.legacy.drain_console()
            bitmaps = [bytes(a | b for a, b in zip(x, y, strict=True))
                       for x, y in zip(bitmaps, m.dirty_log.collect(extra=used_rings(m)), strict=True)]
            rounds.append(await _send_runs(writer, m.mem, bitmaps))
            await _send(writer, b"STAT", json.dumps(save_machine(m), separators=(",", ":")).encode())
            async with asyncio.timeout(ANSWER_TIMEOUT):
                answer, body = await _recv(reader)
            if answer != b"RUNS":
                why = json.loads(body).get("message", "?") if answer == b"FAIL" else f"answered {answer!r}"
                raise MigrationError(f"the destination {address} did not run the VM: {why}")
            downtime = time.monotonic() - paused_at
    except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError, MigrationError) as e:
        for w in held:
            w.release()
        if paused_here and not m.stopping:
            m.resume()
        writer.close()
        if isinstance(e, MigrationError):
            raise MigrationError(f"{e}; the VM goes on here") from None
        what = "the destination went away" if isinstance(e, (asyncio.IncompleteReadError, ConnectionError)) else \
            "timed out" if isinstance(e, TimeoutError) else str(e)
        raise MigrationError(f"migration to {address} failed: {what}; the VM goes on here") from None
    writer.close()
    info = {"address": address, "rounds": rounds, "pages": sum(rounds), "downtime_ms": round(downtime * 1000, 2),
            "seconds": round(time.monotonic() - t0, 3)}
    log.info(f"VM {vm.config.name}: migrated to {address}: {len(rounds)} rounds, {info['pages']} pages, "
             f"downtime {info['downtime_ms']:.1f} ms")
    from ..machine import Stop, StopReason  # noqa: PLC0415

    vm.request_stop(Stop(StopReason.HOST, f"migrated to {address} (downtime {info['downtime_ms']:.1f} ms)"))
    return info


# -- the destination ---------------------------------------------------------------------------
class Incoming:
    """The destination's end of the stream, from CONF accepted to RUNS sent."""

    def __init__(self, reader, writer, address: str):
        self.reader = reader
        self.writer = writer
        self.address = address

    async def receive(self, machine) -> None:
        """Pages into guest RAM, then the state onto the machine (its vCPUs not yet run)."""
        mem = machine.mem
        while True:
            kind, body = await _recv(self.reader)
            if kind == b"PAGE":
                region, first = PAGES.unpack_from(body)
                data = memoryview(body)[PAGES.size :]
                if region >= len(mem.regions) or len(data) % PAGE:
                    raise MigrationError("a PAGE message outside guest RAM")
                mem.write(mem.regions[region].gpa + first * PAGE, data)
            elif kind == b"STAT":
                apply_state(machine, json.loads(body))
                return
            else:
                raise MigrationError(f"unexpected {kind!r} message")

    async def running(self) -> None:
        await _send(self.writer, b"RUNS")
        self.writer.close()

    async def fail(self, message: str) -> None:
        try:
            await _send(self.writer, b"FAIL", json.dumps({"message": message}).encode())
        except OSError:
            pass
        self.writer.close()


async def accept(address: str, *, name: str | None, console: list[str] | None):
    """Wait at `address` for a source; (VmConfig, Incoming) once its CONF is accepted: the
    machine it names can be built here (its disks, the name). A CONF that cannot be is
    answered FAIL and raised (one line, status 2)."""
    from ..config import serial_config  # noqa: PLC0415

    kind, where = parse_address(address)
    got: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_client(reader, writer):
        if got.done():
            writer.close()
            return
        got.set_result((reader, writer))

    if kind == "unix":
        if os.path.exists(where):
            os.unlink(where)
        server = await asyncio.start_unix_server(on_client, where)
    else:
        server = await asyncio.start_server(on_client, *where)
    log.info(f"waiting for a migration at {address}")
    try:
        reader, writer = await got
    finally:
        server.close()
        if kind == "unix":
            try:
                os.unlink(where)
            except OSError:
                pass
    incoming = Incoming(reader, writer, address)
    try:
        kind_, body = await _recv(reader)
        conf = json.loads(body) if kind_ == b"CONF" else None
        if conf is None or conf.get("version") != VERSION:
            raise ConfigError(f"{address}: the source speaks another migration protocol")
        cfg = config_from_dict(conf["config"])
        check_disks(conf.get("disks", {}))
        if name:
            cfg.name = name
        if console:
            cfg.serial = {}
            serial_config(console, cfg)
        cfg.validate(cli=True)
    except (ConfigError, ValueError, KeyError, TypeError, asyncio.IncompleteReadError) as e:
        await incoming.fail(str(e))
        raise ConfigError(f"incoming migration at {address}: {e}") from None
    await _send(writer, b"OKAY")
    return cfg, incoming


def run_incoming(args) -> int:
    """`asyncvmm run --incoming ADDRESS [NAME] [-l ...]`: wait, build, receive, run; the
    exit status as for a boot."""
    from ..loop import run as run_loop  # noqa: PLC0415
    from ..runner import STATUS, run_vm  # noqa: PLC0415
    from ..vstate.vcpus import Stop, StopReason  # noqa: PLC0415

    parse_address(args.incoming)  # a bad address: one line, status 2, before anything

    async def main():
        cfg, incoming = await accept(args.incoming, name=args.name, console=args.console)
        return await run_vm(cfg, None, incoming=incoming)

    try:
        stop = run_loop(main())
    except asyncio.CancelledError as e:
        stop = Stop(StopReason.HOST, str(e.args[0]) if e.args else "stopped")
    if stop.reason in (StopReason.POWEROFF, StopReason.RESET):
        log.info(stop.message)
    else:
        log.error(stop.message)
    return STATUS[stop.reason]
