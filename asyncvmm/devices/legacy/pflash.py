"""The OVMF variables store: a CFI parallel flash, as QEMU's pflash_cfi01 shows it to OVMF.

A PC's firmware flash is an Intel-style CFI device (the command set of Intel's StrataFlash
and of the CFI "Intel/Sharp extended" command set, ID 0x0001). It is read like memory until
a command is written to it; then reads return the status register (or the ID/query data)
until "read array" (0xFF) puts it back. QEMU's split OVMF (OVMF_CODE.fd + OVMF_VARS.fd) has
two such devices; the variables' one sits right below the code, at the top of 4 GiB.

OVMF (OvmfPkg/QemuFlashFvbServicesRuntimeDxe/QemuFlash.c) uses byte accesses only:

    detection   at the first byte of the store that is not 0x00, 0x50 or 0x70:
                write 0x50 (clear status), read: the array byte again (not 0x50: not RAM);
                write 0x70 (read status), read: 0x00 (not the array byte: not a ROM);
                newer builds then program the byte with itself and check SR.4;
                then 0xFF (read array)
    write       for each byte: 0x10 (program), the byte; 0xFF after the last one
    erase       at the block's first byte: 0x20 (block erase), 0xD0 (confirm)
                (no 0xFF after it: the next program's 0xFF ends status mode)

A status of 0x00 after "clear status" is what OVMF reads as a flash (QEMU's model: SR.7,
ready, is set by the first program or erase). As in QEMU, a program stores the byte as
given (a real flash can only clear bits; OVMF writes only erased bytes or the same value).

The array is the VARS file, mapped shared: in read-array mode it is a read-only KVM memory
slot (reads at memory speed, writes exit as MMIO to `write`); in any other mode the slot is
removed, so reads exit too and get the status (QEMU's "romd" mode off). A programmed byte
or an erased block is written to the file at once (a SIGKILLed VMM loses nothing), and the
file is fdatasync'ed before the guest can see any of it done: before a read of the status
and before any command but the next program (OVMF's "0x10, byte" runs end with 0xFF). So a
run of programs costs one fdatasync, not one a byte, and what the guest saw done is on the
disk.

A file without write permission (or on a read-only file system) is a write-protected flash:
programs and erases set their error bits and the file is never changed. A bad command
sequence sets both error bits (the spec's "command sequence error"); the guest clears them
with 0x50. Nothing a guest writes here stops the VMM.
"""

from __future__ import annotations

import mmap
import os
import stat
from enum import IntEnum, IntFlag

from ...log import get_logger

log = get_logger("asyncvmm.machine")

BLOCK_SIZE = 4096  # QEMU's pc flash sector, OVMF's PcdOvmfFirmwareBlockSize


class Command(IntEnum):
    """The commands (the first write cycle's byte; Intel StrataFlash / CFI command set 0x0001)."""

    READ_ARRAY = 0xFF
    READ_ID = 0x90  # manufacturer and device codes
    CFI_QUERY = 0x98
    READ_STATUS = 0x70
    CLEAR_STATUS = 0x50
    PROGRAM = 0x10  # single byte program ("word program" on wider parts)
    PROGRAM_ALT = 0x40  # the same, the other code
    BLOCK_ERASE = 0x20  # the setup cycle; the block is erased by the confirm
    ERASE_CONFIRM = 0xD0
    AMD_RESET = 0xF0  # an AMD-style probe's reset: read array, as QEMU takes it
    RESET_ZERO = 0x00  # QEMU takes it as read array too


class Status(IntFlag):
    """The status register (SR)."""

    READY = 0x80  # SR.7 write state machine ready
    ERASE_SUSPENDED = 0x40
    ERASE_ERROR = 0x20  # SR.5
    PROGRAM_ERROR = 0x10  # SR.4
    VPP_LOW = 0x08
    PROGRAM_SUSPENDED = 0x04
    BLOCK_LOCKED = 0x02
    SEQUENCE_ERROR = ERASE_ERROR | PROGRAM_ERROR  # both: an improper command sequence


class Mode(IntEnum):
    """What a read returns, and what the next write is."""

    ARRAY = 0  # the data (the memory slot is mapped)
    STATUS = 1  # the status register
    ID = 2  # the identifier codes
    QUERY = 3  # the CFI query table
    PROGRAM = 4  # the next write is the data to program; reads give the status
    ERASE = 5  # the next write must be the confirm; reads give the status


MANUFACTURER_INTEL = 0x89
DEVICE_ID = 0x18  # a 28F128J3-like part: the code only has to be stable


def cfi_table(size: int) -> bytes:
    """The CFI query structure (JEDEC JESD68), from offset 0x10, for an x8 device of one
    uniform erase-block region."""
    blocks = size // BLOCK_SIZE
    t = bytearray(0x31)
    t[0x10:0x13] = b"QRY"
    t[0x13:0x15] = (0x0001).to_bytes(2, "little")  # primary command set: Intel/Sharp extended
    t[0x15:0x17] = (0x0031).to_bytes(2, "little")  # its extended table's address
    t[0x1B], t[0x1C] = 0x45, 0x55  # Vcc 4.5-5.5 V
    t[0x1F], t[0x21] = 0x01, 0x01  # typical byte program 2 µs, block erase 2 ms (log2)
    t[0x27] = size.bit_length() - 1  # device size, log2 bytes
    t[0x28:0x2A] = (0x0000).to_bytes(2, "little")  # interface: x8 asynchronous
    t[0x2C] = 1  # erase block regions
    t[0x2D:0x2F] = (blocks - 1).to_bytes(2, "little")
    t[0x2F:0x31] = (BLOCK_SIZE // 256).to_bytes(2, "little")
    return bytes(t)


def open_store(path: str) -> tuple[int, bool]:
    """The VARS file's fd, and whether it is writable. No write permission bit (root too),
    or a file system that refuses writing: a write-protected flash."""
    st = os.stat(path)
    if st.st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        try:
            return os.open(path, os.O_RDWR | os.O_CLOEXEC), True
        except OSError:
            pass
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC), False


class PFlash:
    """One CFI flash over a file. `map(hva_of)` is the memory slot's side: it is called
    with True to (re)map the array, False to remove it (`None`: no KVM, the unit tests)."""

    def __init__(self, fd: int, size: int, writable: bool, slot=None):
        self.fd = fd
        self.size = size
        self.writable = writable
        self.mode = Mode.ARRAY
        self.status = Status(0)
        self._slot = slot
        self._cfi = cfi_table(size)
        self.counters = {"programs": 0, "erases": 0, "errors": 0, "mode_changes": 0, "syncs": 0}
        self._unsynced = False  # written to the file, not yet fdatasync'ed
        try:
            self.array = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        except BaseException:
            os.close(fd)  # it is ours from here on
            raise

    def _set_mode(self, mode: Mode) -> None:
        if (mode is Mode.ARRAY) != (self.mode is Mode.ARRAY):
            self.counters["mode_changes"] += 1
            if self._slot is not None:
                self._slot(mode is Mode.ARRAY)
        self.mode = mode

    def _error(self, bits: Status) -> None:
        self.status |= bits | Status.READY
        self.counters["errors"] += 1

    # -- reads ---------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if self.mode is Mode.ARRAY:  # only when the slot is not mapped yet (or in tests)
            return int.from_bytes(self.array[offset : offset + size].ljust(size, b"\xff"), "little")
        self._sync()  # the guest may learn that its last program or erase is done
        value = 0
        for i in range(size):  # an x8 device: each byte lane from its own address
            value |= self._read_byte(offset + i) << (8 * i)
        return value

    def _read_byte(self, offset: int) -> int:
        if self.mode is Mode.ID:
            return {0: MANUFACTURER_INTEL, 1: DEVICE_ID}.get(offset & 0xFF, 0)
        if self.mode is Mode.QUERY:
            at = offset & 0xFF
            return self._cfi[at] if at < len(self._cfi) else 0
        return int(self.status)

    # -- writes ----------------------------------------------------------------------------
    def write(self, offset: int, size: int, value: int) -> None:
        if self.mode is Mode.PROGRAM:
            self._program(offset, value.to_bytes(size, "little"))
            return
        cmd = value & 0xFF
        if cmd not in (Command.PROGRAM, Command.PROGRAM_ALT):
            self._sync()  # 0xFF maps the array again, 0x70 shows the status: on the disk first
        if self.mode is Mode.ERASE:
            if cmd == Command.ERASE_CONFIRM:
                self._erase(offset)
            elif cmd == Command.READ_ARRAY:
                self._set_mode(Mode.ARRAY)
            else:
                self._error(Status.SEQUENCE_ERROR)
                self._set_mode(Mode.STATUS)
            return
        if cmd in (Command.READ_ARRAY, Command.AMD_RESET, Command.RESET_ZERO):
            self._set_mode(Mode.ARRAY)
        elif cmd == Command.CLEAR_STATUS:
            self.status = Status(0)
            self._set_mode(Mode.ARRAY)  # QEMU's: the array reads again (OVMF's probe needs it)
        elif cmd == Command.READ_STATUS:
            self._set_mode(Mode.STATUS)
        elif cmd == Command.READ_ID:
            self._set_mode(Mode.ID)
        elif cmd == Command.CFI_QUERY:
            self._set_mode(Mode.QUERY)
        elif cmd in (Command.PROGRAM, Command.PROGRAM_ALT):
            self._set_mode(Mode.PROGRAM)
        elif cmd == Command.BLOCK_ERASE:
            self._set_mode(Mode.ERASE)
        elif self.mode is Mode.QUERY:
            pass  # any other write leaves query mode alone (QEMU's)
        else:  # not a command this flash knows (buffered write, lock bits, suspend, ...)
            self._error(Status.SEQUENCE_ERROR)
            self._set_mode(Mode.STATUS)

    def _program(self, offset: int, data: bytes) -> None:
        self._set_mode(Mode.STATUS)
        if not self.writable or offset + len(data) > self.size:
            self._error(Status.PROGRAM_ERROR)
            return
        if not self._store(offset, data):
            self._error(Status.PROGRAM_ERROR)
            return
        self.counters["programs"] += 1
        self.status |= Status.READY

    def _erase(self, offset: int) -> None:
        self._set_mode(Mode.STATUS)
        start = offset - offset % BLOCK_SIZE
        if not self.writable or not self._store(start, b"\xff" * BLOCK_SIZE):
            self._error(Status.ERASE_ERROR)
            return
        self.counters["erases"] += 1
        self.status |= Status.READY

    def _store(self, offset: int, data: bytes) -> bool:
        """In the file now (the page cache); on the disk at the next `_sync`."""
        try:
            if os.pwrite(self.fd, data, offset) != len(data):
                return False
        except OSError as e:
            log.warning(f"pflash: writing the variables file: {e.strerror}")
            return False
        self._unsynced = True
        return True

    def _sync(self) -> None:
        if not self._unsynced:
            return
        self._unsynced = False
        self.counters["syncs"] += 1
        try:
            os.fdatasync(self.fd)
        except OSError as e:  # the guest sees it failed: both error bits
            log.warning(f"pflash: syncing the variables file: {e.strerror}")
            self._error(Status.SEQUENCE_ERROR)

    def state(self) -> dict:
        self._sync()
        return {"mode": int(self.mode), "status": int(self.status)}

    def set_state(self, s: dict) -> None:
        self.status = Status(s["status"])
        self._set_mode(Mode(s["mode"]))

    def close(self) -> None:
        if self.fd >= 0:
            self._sync()
        try:
            self.array.close()
        except BufferError:
            pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
