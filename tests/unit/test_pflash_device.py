"""The OVMF variables flash (devices/legacy/pflash.py) and the 0xCF9 reset control
register, driven as OVMF and SeaBIOS drive them, over a real file."""

import os

import pytest

from asyncvmm.devices.legacy.pflash import BLOCK_SIZE, MANUFACTURER_INTEL, Mode, PFlash, Status, open_store
from asyncvmm.devices.legacy.reset_control import ResetControl, ResetControlRegister

SIZE = 64 << 10


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "vars.fd"
    data = bytearray(b"\xab" * SIZE)
    data[:16] = bytes(16)  # a firmware volume's zero vector: OVMF's probe skips 0x00
    path.write_bytes(data)
    return path


@pytest.fixture
def flash(store):
    slots = []
    fd, writable = open_store(str(store))
    f = PFlash(fd, SIZE, writable, slot=slots.append)
    f.slots = slots
    yield f
    f.close()


def ovmf_detects(f: PFlash) -> bool:
    """QemuFlashDetected(), with the newer builds' program check."""
    at = next(i for i in range(BLOCK_SIZE) if f.read(i, 1) not in (0x50, 0x70, 0x00))
    original = f.read(at, 1)
    f.write(at, 1, 0x50)
    if f.read(at, 1) == 0x50:
        return False  # RAM
    f.write(at, 1, 0x70)
    probe = f.read(at, 1)
    if probe != 0x00:
        return False  # ROM (the byte again) or RAM (0x70)
    f.write(at, 1, 0x10)
    f.write(at, 1, original)
    f.write(at, 1, 0x70)
    status = f.read(at, 1)
    f.write(at, 1, 0xFF)
    return not status & Status.PROGRAM_ERROR


def test_ovmf_detects_a_flash_and_the_array_is_mapped_after(flash):
    assert ovmf_detects(flash)
    assert flash.mode is Mode.ARRAY
    # every change between the array and the other modes maps or removes the memory slot
    assert flash.slots == [False, True]  # removed at 0x70, back at 0xFF


def test_program_and_erase_reach_the_file(flash, store):
    for i, b in enumerate(b"VARS"):  # QemuFlashWrite: 0x10, byte; 0xFF after the last
        flash.write(0x2000 + i, 1, 0x10)
        flash.write(0x2000 + i, 1, b)
    assert flash.read(0x2000, 1) == Status.READY  # status mode: the status, not the data
    flash.write(0x2003, 1, 0xFF)
    assert flash.read(0x2000, 4) == int.from_bytes(b"VARS", "little")
    assert store.read_bytes()[0x2000:0x2004] == b"VARS"
    flash.write(0x1000, 1, 0x20)  # QemuFlashEraseBlock: 0x20, 0xD0 at the block's start
    flash.write(0x1234, 1, 0xD0)  # (the confirm's address picks the block too)
    assert flash.read(0, 1) == Status.READY and flash.mode is Mode.STATUS
    data = store.read_bytes()
    assert data[0x1000:0x2000] == b"\xff" * BLOCK_SIZE and data[0x2000:0x2004] == b"VARS" and data[0xFFF] == 0xAB
    assert flash.counters["programs"] == 4 and flash.counters["erases"] == 1


def test_id_and_cfi_query(flash):
    flash.write(0, 1, 0x90)
    assert (flash.read(0, 1), flash.read(1, 1)) == (MANUFACTURER_INTEL, 0x18)
    flash.write(0, 1, 0x98)
    assert flash.read(0x10, 4).to_bytes(4, "little") == b"QRY\x01"  # and command set 0x0001
    assert flash.read(0x27, 1) == 16  # 64 KiB
    assert flash.read(0x2D, 2) == SIZE // BLOCK_SIZE - 1 and flash.read(0x2F, 2) == BLOCK_SIZE // 256
    flash.write(0, 1, 0xFF)
    assert flash.read(0x10, 1) == 0xAB


def test_bad_sequences_set_error_bits_and_clear(flash, store):
    before = store.read_bytes()
    flash.write(0, 1, 0x42)  # not a command
    assert flash.read(0, 1) == Status.READY | Status.SEQUENCE_ERROR
    flash.write(0, 1, 0x50)
    flash.write(0, 1, 0x70)
    assert flash.read(0, 1) == 0
    flash.write(0x1000, 1, 0x20)
    flash.write(0x1000, 1, 0x11)  # an erase not confirmed
    assert flash.read(0, 1) & Status.SEQUENCE_ERROR == Status.SEQUENCE_ERROR
    flash.write(SIZE - 1, 1, 0x10)
    flash.write(SIZE - 1, 4, 0x41414141)  # a program past the end
    assert flash.read(0, 1) & Status.PROGRAM_ERROR
    assert store.read_bytes() == before


def test_a_file_without_write_permission_is_write_protected(store):
    os.chmod(store, 0o444)
    before = store.read_bytes()
    fd, writable = open_store(str(store))
    f = PFlash(fd, SIZE, writable)
    try:
        assert not writable
        assert not ovmf_detects(f)  # "FD behaves as FLASH, but programming error"
        f.write(0x1000, 1, 0x20)
        f.write(0x1000, 1, 0xD0)
        assert f.read(0, 1) & Status.ERASE_ERROR
        f.write(0x1000, 1, 0x40)
        f.write(0x1000, 1, 0)
        assert f.read(0, 1) & Status.PROGRAM_ERROR
    finally:
        f.close()
    assert store.read_bytes() == before


def test_state_round_trip(flash):
    flash.write(0, 1, 0x20)
    s = flash.state()
    flash.write(0, 1, 0xFF)
    flash.set_state(s)
    assert flash.mode is Mode.ERASE and flash.slots[-1] is False


def test_reset_control_register():
    resets = []
    r = ResetControlRegister(lambda: resets.append(1))
    r.write(1, 1, ResetControl.SYS_RST)  # SeaBIOS first writes 0x02, then 0x06
    assert resets == [] and r.read(1, 1) == 0x02
    r.write(1, 1, ResetControl.SYS_RST | ResetControl.RST_CPU)
    assert resets == [1]
    r.write(1, 1, 0x0E)
    assert resets == [1, 1] and r.read(1, 1) == 0x0A
    r.write(0, 1, 0x06)  # 0xCF8's other bytes are not the register
    r.write(1, 2, 0x06)
    assert resets == [1, 1] and r.read(0, 1) == 0xFF


def test_one_fdatasync_for_a_run_of_programs_before_the_guest_can_see_it(flash, store):
    for i in range(100):
        flash.write(0x3000 + i, 1, 0x10)
        flash.write(0x3000 + i, 1, 0x5A)
        assert store.read_bytes()[0x3000 + i] == 0x5A  # in the file at once (a SIGKILL keeps it)
    assert flash.counters["syncs"] == 0  # not yet seen done: not yet synced
    flash.write(0x3063, 1, 0xFF)  # back to the array: on the disk first
    assert flash.counters["syncs"] == 1 and flash.counters["programs"] == 100
    flash.write(0x4000, 1, 0x20)
    flash.write(0x4000, 1, 0xD0)
    assert flash.counters["syncs"] == 1
    assert flash.read(0x4000, 1) == Status.READY and flash.counters["syncs"] == 2  # the status read
    flash.read(0x4000, 1)
    assert flash.counters["syncs"] == 2  # nothing new to sync
