"""The boot of one machine: the images read once, the ACPI tables and the kernel in RAM.

`BootImages` are the files a boot loads, read (and a bzImage's payload unpacked) once, off
the loop, and kept across guest resets. `BootSetup(vm, config, images, ...)` writes the
ACPI tables (unless --no-acpi) and loads the kernel into guest RAM; `state` is where the
boot processor starts.
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
from dataclasses import dataclass

from .. import platform
from ..config import VmConfig
from ..errors import BootError, ConfigError
from ..log import get_logger
from ..vstate import probe
from . import linux, loader

log = get_logger("asyncvmm.machine")
quirks_log = get_logger("asyncvmm.quirks")


@dataclass(frozen=True)
class BootImages:
    """The files a boot loads, read once (off the loop) and kept across guest resets;
    `prepared` holds a bzImage's payload if the VMM unpacked it (boot/loader.py)."""

    kernel: bytes
    initrd: bytes | None = None
    prepared: loader.Prepared = loader.Prepared()
    seconds: float = 0.0  # wall time reading (and unpacking) took

    @classmethod
    def load(cls, cfg: VmConfig) -> "BootImages":
        """Read them now (for code that is not on a loop)."""
        t0 = time.monotonic()
        if not cfg.kernel:  # a firmware boot (-l bootrom) with no kernel of ours
            return cls(b"")
        kernel = _read_file(cfg.kernel, "kernel")
        initrd = _read_file(cfg.initrd, "initrd") if cfg.initrd else None
        return cls(kernel, initrd, _prepare(cfg, kernel), time.monotonic() - t0)


# Images up to this size (kernel and initrd together) are read on the loop: from the page
# cache that is well under a millisecond, less than starting the worker thread (and, when
# the loop closes, the thread that shuts it down) and three hops through the loop.
INLINE_READ_MAX = 2 << 20


async def read_images(cfg: VmConfig) -> BootImages:
    """Read the kernel and initrd, and unpack a bzImage's payload if that is wanted, in a
    worker thread: a 50 MB image or a second of decompression must not stall the loop.
    Small images are read on the loop (INLINE_READ_MAX); a bzImage is always prepared in
    the thread (it may be unpacked)."""
    t0 = time.monotonic()
    if not cfg.kernel:  # a firmware boot (-l bootrom) with no kernel of ours
        return BootImages(b"")
    if _file_size(cfg.kernel) + (_file_size(cfg.initrd) if cfg.initrd else 0) <= INLINE_READ_MAX:
        kernel = _read_file(cfg.kernel, "kernel")
        initrd = _read_file(cfg.initrd, "initrd") if cfg.initrd else None
    else:
        kernel = await asyncio.to_thread(_read_file, cfg.kernel, "kernel")
        initrd = await asyncio.to_thread(_read_file, cfg.initrd, "initrd") if cfg.initrd else None
    if linux.kernel_kind(kernel) == "bzimage":
        prepared = await asyncio.to_thread(_prepare, cfg, kernel)
    else:
        prepared = _prepare(cfg, kernel)  # parses ELF headers: microseconds
    return BootImages(kernel, initrd, prepared, time.monotonic() - t0)


def _file_size(path: str) -> int:
    """A regular file's size; more than INLINE_READ_MAX for anything else (a FIFO or a
    device may block: the thread reads it); 0 when it cannot be asked (then _read_file
    says why, in one line)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else INLINE_READ_MAX + 1


def _prepare(cfg: VmConfig, kernel: bytes) -> loader.Prepared:
    try:
        loader.check(kernel)  # before anything is built: a wrong file is one line
    except BootError as e:  # say which file
        raise BootError(f"kernel {cfg.kernel}: {e}") from None
    mode = cfg.decompress
    if cfg.bootrom:  # the firmware loads it as it is (fw_cfg), nothing to unpack
        return loader.Prepared()
    emulating = False
    if mode == loader.Decompress.AUTO and linux.kernel_kind(kernel) == "bzimage":
        emulating = probe.probe().emulating
    return loader.prepare(kernel, mode, emulating)


def _read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path}: is a directory") from None
    except OSError as e:
        raise ConfigError(f"{what} {path}: {e.strerror}") from None


class BootSetup:
    """The ACPI tables and the loaded kernel of one boot (guest RAM holds both)."""

    def __init__(self, mem, config: VmConfig, images: BootImages, linux_cmdline, serial_ports=platform.COM_PORTS[:1]):
        """`linux_cmdline`: the quirks' additions for a Linux kernel; `serial_ports`: the
        COM ports (platform.ComPort) the DSDT lists."""
        self.tables = None  # boot.acpi.Tables, with ACPI
        self.tables_s = 0.0  # what generating the ACPI tables took
        self.loaded: loader.Boot | None = None
        rsdp = 0
        if config.bootrom:  # the firmware builds the machine's boot: it asks fw_cfg (devices/legacy/fw_cfg.py)
            return
        if config.acpi:
            from . import acpi  # noqa: PLC0415 (--no-acpi pays nothing for it)

            topology = config.cpu_topology
            t0 = time.perf_counter()
            self.tables = acpi.build(topology.apic_ids(), platform.ram_top(mem.regions), serial_ports=serial_ports)
            self.tables.write(mem)
            self.tables_s = time.perf_counter() - t0
            rsdp = self.tables.rsdp
            ids = topology.apic_ids()
            log.info(
                f"ACPI: tables at {rsdp:#x} ({len(self.tables.image)} bytes, {self.tables_s * 1e3:.1f} ms); "
                f"vCPUs {topology.sockets}x{topology.cores}x{topology.threads} (sockets x cores x threads), "
                f"APIC IDs {ids[0]}..{ids[-1]}"
            )
        if linux.kernel_kind(images.kernel) is None:
            raise BootError(f"{config.kernel} is not a kernel: neither an ELF with a PVH entry nor a bzImage")
        self.loaded = loaded = loader.load(
            mem, images.kernel, images.initrd, config.cmdline,
            prepared=images.prepared, linux_cmdline=linux_cmdline, rsdp=rsdp,
        )
        log.info(f"boot: {config.kernel} {loaded.path}")
        if self.loaded.appended:
            quirks_log.info(f"quirks: linux-cmdline: appended to the kernel command line: {' '.join(self.loaded.appended)}")

    @property
    def state(self):
        """The boot processor's state at the kernel's entry; None for a firmware boot (the
        reset state a new vCPU has)."""
        return self.loaded.state if self.loaded is not None else None
