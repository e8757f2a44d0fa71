"""A firmware image at the top of 4 GiB (`-l bootrom,FILE[,VARSFILE]`, bhyve's spelling).

A PC starts its boot processor at the reset vector, 16 bytes below 4 GiB, in real mode with
CS base 0xFFFF0000 and IP 0xFFF0: the firmware's flash is decoded there. So the image is
mapped read-only with its last byte at 0xFFFFFFFF (a KVM_MEM_READONLY slot: reads come from
it at full speed, a write exits as MMIO and is dropped, as a write to ROM is on hardware).
Its last 256 KiB (or all of a smaller image) are also copied into RAM ending at 1 MiB: the
legacy BIOS window 0xE0000-0xFFFFF (QEMU's "isa-bios" alias of the last 128 KiB), where
real-mode code runs, and below it what SeaBIOS's 256 KiB build links there too. On QEMU
SeaBIOS asks the i440FX's PAM registers for writable shadow RAM at 0xC0000-0xFFFFF and
copies its code there from the flash itself; here that area is always RAM, the copy is
made before it starts, and SeaBIOS, finding no i440FX, says "Unable to unlock ram" and
runs on from it.

An OVMF variables file is a CFI flash right below the code, where QEMU's pflash puts it
(devices/legacy/pflash.py): OVMF detects it, programs and erases it, and what it writes is
in the file (fdatasync'ed) before it sees the operation done. A file without write
permission is a write-protected flash: the file is never changed. Without a vars file
there is no flash: OVMF's probe finds a ROM and keeps its variables in memory.

What is checked before anything starts (ConfigError, one line): the file exists, its size is
a whole number of 4 KiB pages (a memory slot's unit) from 64 KiB to 16 MiB, and it is a
firmware image: a jump at the reset vector (after any NOPs: SeaBIOS's `ljmp`, OVMF's older
`jmp`), or OVMF's GUIDed table footer just below the reset vector's 32 bytes (newer OVMF
starts with `mov eax, cr0` there, to find out whether it is already in protected mode). A
variables file is not a firmware: it has no reset vector. A vars file must be a firmware
volume, go with a UEFI image, and the two together must fill a flash
device of a power-of-two size, as OVMF's builds do (1920 KiB + 128 KiB, 3568 KiB + 528 KiB).

The boot processor keeps the state KVM gives a new vCPU, which is the reset state; the other
vCPUs wait for INIT/SIPI in the in-kernel LAPIC, as on a PC.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..log import get_logger

if TYPE_CHECKING:
    from ..devices.legacy.pflash import PFlash

log = get_logger("asyncvmm.machine")

KiB = 1 << 10
MiB = 1 << 20
FOUR_GIB = 1 << 32
PAGE = 4 * KiB
MIN_SIZE = 64 * KiB
MAX_SIZE = 16 * MiB  # the top 16 MiB below 4 GiB: the flash region of a PC's chipset
LEGACY_WINDOW_END = 0x10_0000
LEGACY_COPY_SIZE = 256 * KiB  # 0xC0000-0xFFFFF: the legacy window and SeaBIOS's shadow RAM
RESET_VECTOR_FROM_TOP = 16  # 0xFFFFFFF0

# UEFI PI spec, EFI_FIRMWARE_VOLUME_HEADER: Signature "_FVH" at byte 40.
FV_SIGNATURE = b"_FVH"
FV_SIGNATURE_OFFSET = 40

# OVMF's ResetVector: a table of GUIDed entries ends 32 bytes below 4 GiB with this GUID
# (96b582de-1fb2-45f7-baea-a366c55a082d, in its byte order).
OVMF_TABLE_FOOTER_GUID = bytes.fromhex("de82b596b21ff745baeaa366c55a082d")
OVMF_TABLE_FOOTER_FROM_TOP = 48

# Memory slots after the RAM's (vstate/memory.py uses 0 and 1).
ROM_SLOT = 8
VARS_SLOT = 9


class Opcode(IntEnum):
    """What a reset vector may start with (x86 one-byte opcodes)."""

    NOP = 0x90
    JMP_FAR = 0xEA  # jmp ptr16:16 — SeaBIOS
    JMP_NEAR = 0xE9  # jmp rel16 — OVMF's older reset vector
    JMP_SHORT = 0xEB


def _read(path: str, what: str) -> bytes:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{what} {path}: {e.strerror}") from None
    if os.path.isdir(path):
        raise ConfigError(f"{what} {path}: is a directory")
    if not MIN_SIZE <= st.st_size <= MAX_SIZE or st.st_size % PAGE:
        raise ConfigError(
            f"{what} {path}: {st.st_size} bytes is not a firmware image's size "
            f"(a whole number of 4 KiB pages, 64 KiB to 16 MiB)"
        )
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"{what} {path}: {e.strerror}") from None


def is_firmware_volume(data: bytes) -> bool:
    return data[FV_SIGNATURE_OFFSET : FV_SIGNATURE_OFFSET + 4] == FV_SIGNATURE


def has_ovmf_footer(data: bytes) -> bool:
    at = len(data) - OVMF_TABLE_FOOTER_FROM_TOP
    return data[at : at + 16] == OVMF_TABLE_FOOTER_GUID


def jumps_at_reset_vector(data: bytes) -> bool:
    vector = data[-RESET_VECTOR_FROM_TOP:].lstrip(bytes([Opcode.NOP]))
    return bool(vector) and vector[0] in (Opcode.JMP_FAR, Opcode.JMP_NEAR, Opcode.JMP_SHORT)


@dataclass(frozen=True)
class Firmware:
    """A validated firmware image, and its variables file if one was given."""

    path: str
    code: bytes
    vars_path: str = ""
    vars: bytes = b""

    @property
    def uefi(self) -> bool:
        return is_firmware_volume(self.code)

    @property
    def base(self) -> int:
        """Where the code starts: its last byte is at 0xFFFFFFFF."""
        return FOUR_GIB - len(self.code)

    @property
    def vars_base(self) -> int:
        return self.base - len(self.vars)

    @classmethod
    def load(cls, path: str, vars_path: str = "") -> "Firmware":
        what = "-l bootrom"
        code = _read(path, what)
        if not (jumps_at_reset_vector(code) or has_ovmf_footer(code)):
            raise ConfigError(f"{what} {path}: not a firmware image (no jump at its reset vector, 16 bytes from its end)")
        if not vars_path:
            return cls(path, code)
        vars_ = _read(vars_path, "-l bootrom variables")
        if not is_firmware_volume(code):
            raise ConfigError(f"-l bootrom variables {vars_path}: {path} is not a UEFI image, it has no variables file")
        if not is_firmware_volume(vars_):
            raise ConfigError(f"-l bootrom variables {vars_path}: not a UEFI variable store (no firmware volume header)")
        total = len(code) + len(vars_)
        if total & (total - 1) or total > MAX_SIZE:
            raise ConfigError(
                f"-l bootrom variables {vars_path}: does not match {path} ({len(vars_) // KiB} KiB + "
                f"{len(code) // KiB} KiB is not one flash device; use the VARS file of the same build)"
            )
        return cls(path, code, vars_path, vars_)


def parse_bootrom(spec: str) -> tuple[str, str]:
    """`-l bootrom,FILE[,VARSFILE]`'s value after "bootrom,": (FILE, VARSFILE or "")."""
    path, _, vars_path = spec.partition(",")
    if not path:
        raise ConfigError("-l bootrom: name the firmware file: -l bootrom,FILE[,VARSFILE]")
    return path, vars_path


class RomWrites:
    """The MMIO side of the read-only slots: a write to flash is dropped (counted)."""

    def __init__(self):
        self.writes = 0

    def read(self, offset: int, size: int) -> int:  # never: KVM reads the slot itself
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes += 1


class FirmwareMapping:
    """The image (and vars) in host memory, registered with KVM; the legacy window filled."""

    def __init__(self, vmfd, mem, fw: Firmware, mmio=None):
        self.fw = fw
        self._maps: list[mmap.mmap] = []
        self.rom_writes = RomWrites()
        self.flash: PFlash | None = None  # the variables, with a vars file
        self._vmfd = vmfd
        try:
            self._build(vmfd, mem, fw, mmio)
        except BaseException:
            self.close()  # the machine never gets it to close
            raise

    def _build(self, vmfd, mem, fw: Firmware, mmio) -> None:
        self._map(vmfd, ROM_SLOT, fw.base, fw.code)
        if fw.vars:
            from ..devices.legacy.pflash import PFlash, open_store  # noqa: PLC0415

            try:
                fd, writable = open_store(fw.vars_path)
            except OSError as e:
                raise ConfigError(f"-l bootrom variables {fw.vars_path}: {e.strerror}") from None
            self.flash = PFlash(fd, len(fw.vars), writable, slot=self._vars_slot)
            self._vars_hva = self._hva(self.flash.array)
            self._vars_slot(True)
        low = min(LEGACY_COPY_SIZE, len(fw.code))
        mem.write(LEGACY_WINDOW_END - low, fw.code[-low:])
        if mmio is not None:
            mmio.register(fw.base, len(fw.code), self.rom_writes, "bootrom")
            if self.flash is not None:
                mmio.register(fw.vars_base, len(fw.vars), self.flash, "pflash")
        log.info(
            f"bootrom: {fw.path} ({len(fw.code) // KiB} KiB) at {fw.base:#x}"
            + (f", variables {fw.vars_path} ({len(fw.vars) // KiB} KiB, "
               f"{'a flash' if self.flash.writable else 'write-protected'}) at {fw.vars_base:#x}" if self.flash else "")
        )

    @staticmethod
    def _hva(m: mmap.mmap) -> int:
        from .._native import ffi  # noqa: PLC0415

        return int(ffi.cast("uintptr_t", ffi.from_buffer(m)))

    def _vars_slot(self, mapped: bool) -> None:
        """The flash in read-array mode is memory; in any other mode its reads exit too."""
        fw = self.fw
        if mapped:
            self._vmfd.set_memory_region(VARS_SLOT, fw.vars_base, len(fw.vars), self._vars_hva, readonly=True)
        else:
            self._vmfd.set_memory_region(VARS_SLOT, fw.vars_base, 0, 0, readonly=True)

    def _map(self, vmfd, slot: int, gpa: int, data: bytes) -> None:
        m = mmap.mmap(-1, len(data), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_DONTFORK"):
            m.madvise(mmap.MADV_DONTFORK)
        m[:] = data
        self._maps.append(m)
        vmfd.set_memory_region(slot, gpa, len(data), self._hva(m), readonly=True)

    def close(self) -> None:
        if self.flash is not None:
            self.flash.close()
        for m in self._maps:
            try:
                m.close()
            except BufferError:
                pass
        self._maps.clear()
