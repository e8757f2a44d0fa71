"""Taking a snapshot of a running VM, and making a VM from one.

The steps of `snapshot(vm, path)`, all on the loop's thread but the write:

1. pause every vCPU, and let an exit in progress finish (its registers are then whole);
2. drain: in-flight block requests complete (the loop keeps serving completions);
3. hold every virtio device's queue worker: no doorbell, TAP frame, console byte or timer
   is served, so nothing writes guest RAM while it is copied out;
4. the state (snapshot/state.py), then the file: RAM written by a worker thread (pwrite of
   the runs of non-zero pages releases the GIL, and the C page scan does too). A thread, not the
   project's io_uring engine: that engine serves virtqueue requests against an image, and a
   bulk write of a few large runs gains nothing from a ring; the loop stays free either way;
5. the workers released; the VM stays paused (`resume()` goes on), or stops with stop=True.
"""

from __future__ import annotations

import asyncio
import os
import time

from ..errors import ConfigError, VmmError
from ..log import get_logger
from . import file
from .state import save_machine

log = get_logger("asyncvmm.snapshot")

PARK_TIMEOUT = 2.0  # seconds for the vCPUs to leave an exit
DRAIN_TIMEOUT = 30.0  # seconds for in-flight block requests to complete


def _virtio_devices(machine):
    for _, dev in machine.pci.devices():
        inner = getattr(dev, "device", None)
        if inner is not None and hasattr(inner, "worker"):
            yield inner


def refuse_unseen_writers(machine, what: str) -> None:
    """ConfigError (one line) if a device's guest RAM writes escape the dirty log and the
    hold (a vhost-user back-end's): the copy could miss them."""
    for _, dev in machine.pci.devices():
        inner = getattr(dev, "device", None)
        if getattr(inner, "writes_guest_ram_unseen", False):
            raise ConfigError(f"{inner.name}: its vhost-user back-end writes guest RAM where no dirty log or hold "
                              f"reaches: {what}")


async def _park(machine) -> None:
    deadline = time.monotonic() + PARK_TIMEOUT
    while waiting := machine.vcpus_in_exit():
        if time.monotonic() > deadline:
            raise VmmError(f"vCPU {waiting[0]} did not stop within {PARK_TIMEOUT:g} s")
        await asyncio.sleep(0.001)


async def _drain(machine) -> None:
    deadline = time.monotonic() + DRAIN_TIMEOUT
    for dev in _virtio_devices(machine):
        quiesced = getattr(dev, "quiesced", None)
        while quiesced is not None and not quiesced():
            if time.monotonic() > deadline:
                raise VmmError(f"{dev.name}: requests still in flight after {DRAIN_TIMEOUT:g} s")
            await asyncio.sleep(0.001)


async def snapshot(vm, path: str, *, stop: bool = False, diff: bool = False) -> dict:
    """Write VM `vm` (api.VM, running or paused) to `path`; returns what was written and
    how long it took. The VM is left paused (or stopped, with `stop`).

    `diff`: only the pages written since the VM's last snapshot (the one it was restored
    from, or the last one it took), over that snapshot as its base (KVM's dirty log and
    the data path's, snapshot/dirty.py). From a VM's first snapshot on, its pages are
    logged."""
    from .dirty import DirtyLog, runs, used_rings  # noqa: PLC0415
    async with vm._vcpu_lock:
        m = vm._live("it cannot be snapshotted")
        refuse_unseen_writers(m, "the VM cannot be snapshotted")
        if getattr(m, "migrating", False):  # its passes take the same dirty log
            raise ConfigError(f"VM {vm.config.name}: a migration is under way: it cannot be snapshotted now")
        last = getattr(m, "last_snapshot", None)
        if diff and last is None:
            raise ConfigError(f"VM {vm.config.name}: a diff snapshot needs a snapshot before it to be a diff over "
                              "(take a full one first, or restore the VM from one)")
        if diff and os.path.abspath(path) == last[0]:
            raise ConfigError(f"snapshot {path}: a diff cannot replace its own base")
        was_paused = m.paused
        t0 = time.monotonic()
        m.pause()
        held = []
        views = []
        try:
            await _park(m)
            inflight = sum(dev.stats().get("inflight", 0) for dev in _virtio_devices(m))
            await _drain(m)
            for dev in _virtio_devices(m):
                dev.worker.hold()
                held.append(dev.worker)
            await _drain(m)  # a doorbell served between the first drain and the hold
            paused_at = time.monotonic()
            m.legacy.drain_console()
            state = save_machine(m)
            views = [(m.mem.view(r.gpa, r.size), r.hva) for r in m.mem.regions]
            page_runs = None
            device_pages = 0
            if diff:
                m.dirty_log.collect(extra=used_rings(m))
                bitmaps = m.dirty_log.since_base()  # a migration's passes since may have taken some
                page_runs = [runs(b, r.size // file.PAGE) for b, r in zip(bitmaps, m.mem.regions, strict=True)]
                state["base"] = {"path": last[0], "state_crc": last[1]}
                device_pages = m.dirty_log.device_pages
            info = await file.write(path, state, views, page_runs)
            # The pages written from now on are the next diff's.
            if getattr(m, "dirty_log", None) is None:
                m.dirty_log = DirtyLog(m)
            m.dirty_log.start()
            m.dirty_log.rebase()
            m.last_snapshot = (os.path.abspath(path), info["state_crc"])
        except BaseException:
            for w in held:
                w.release()
            if not was_paused and not m.stopping:
                m.resume()
            raise
        finally:
            for v, _ in views:
                v.release()
        if not stop:
            # A doorbell the guest rang before the pause is served now: the paused VM's
            # devices go on from the snapshot's state (and a disk written now no longer
            # matches the snapshot: a restore refuses it). Stopping, they serve nothing more.
            for w in held:
                w.release()
        done = time.monotonic()
        if diff:
            info.update(device_pages=device_pages)
        info.update(path=path, inflight_at_pause=inflight, seconds=round(done - t0, 4), write_seconds=round(done - paused_at, 4))
        log.info(f"VM {vm.config.name}: snapshot {path}: {info['ram_bytes'] >> 20} MiB of RAM, "
                 f"{info['pages_written']} pages written, {info['disk_bytes'] >> 10} KiB on disk, "
                 f"{info['seconds'] * 1000:.1f} ms")
    if stop:
        from ..machine import Stop, StopReason  # noqa: PLC0415

        vm.request_stop(Stop(StopReason.HOST, f"stopped after its snapshot to {path}"))
    return info


def load(path: str, *, name: str | None = None, slots=None, console: str | None = None):
    """(VmConfig, file.Snapshot) for a VM made from the snapshot at `path`, checked: the
    file, the disks, and (if given) the devices the caller asks for. SnapshotError or
    ConfigError (one line) if any does not fit; nothing is started."""
    from .state import check_disks, check_slots, config_from_dict  # noqa: PLC0415

    snap = file.read(path)
    try:
        cfg = config_from_dict(snap.state["config"])
    except (TypeError, KeyError, ValueError) as e:
        raise file.SnapshotError(f"snapshot {path}: its configuration cannot be read ({e})") from None
    if slots is not None:
        check_slots(cfg, slots)
    check_disks(snap.state.get("disks", {}))
    if name:
        cfg.name = name
    if console is not None:
        cfg.console = console
    return cfg, snap


def load_for_cli(args):
    """`asyncvmm run --restore PATH [NAME] [-s ...] [-l ...]`: (VmConfig, Snapshot), checked
    as load() does; the other flags of a boot are the snapshot's."""
    from ..config import parse_slot, serial_config  # noqa: PLC0415

    slots = [parse_slot(s) for s in args.slot] if args.slot else None
    cfg, snap = load(args.restore, name=args.name, slots=slots)
    if args.console:
        cfg.serial = {}
        serial_config(args.console, cfg)
    if args.seccomp:
        cfg.seccomp = args.seccomp
    return cfg.validate(cli=True), snap
