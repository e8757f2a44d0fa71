"""Which way a kernel image enters the guest, and when the VMM unpacks a bzImage.

    the image                        how it is entered
    ELF with a PVH note              its PVH entry (pvh.py)
    ELF vmlinux without one          its 64-bit ELF entry with boot_params (linux.load_vmlinux)
    bzImage, payload unpacked        the payload vmlinux: its PVH entry if it has the note,
      by the VMM                       else its 64-bit ELF entry, boot_params from the bzImage
    bzImage                          the 64-bit boot protocol: the kernel decompresses itself

Whether the VMM unpacks a bzImage (`--decompress`): `vmm` always, `kernel` never, `auto`
(the default) when KVM emulates guest kernel code (vstate/probe.py). There the kernel's
own decompressor costs 20-90 s of emulated instructions, the VMM's a fraction of a
second. On hardware KVM it costs tens of milliseconds, and only the kernel's decompressor
can place the kernel at a random address (KASLR): there the kernel keeps that job, as it
has under any boot loader.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from ..errors import BootError
from . import linux, pvh
from .cpu_state import BootCpuState

if TYPE_CHECKING:
    from .unpack import Unpacked


class Decompress(StrEnum):
    AUTO = "auto"
    VMM = "vmm"
    KERNEL = "kernel"


def vmm_unpacks(mode: str, emulating: bool) -> bool:
    mode = Decompress(mode)
    return mode is Decompress.VMM or (mode is Decompress.AUTO and emulating)


@dataclass(frozen=True)
class Prepared:
    """What `prepare` made of a kernel image before the boot (read once, kept across resets)."""

    unpacked: Unpacked | None = None
    note: str = ""  # for the log: what was unpacked, or why it was not


def prepare(kernel: bytes, mode: str, emulating: bool) -> Prepared:
    """Unpack a bzImage's payload if `mode` and the KVM say so (slow: call it off the loop).

    With `vmm` a payload that cannot be unpacked is a BootError; with `auto` the kernel
    then decompresses itself and the note says why.
    """
    if linux.kernel_kind(kernel) != "bzimage" or not vmm_unpacks(mode, emulating):
        return Prepared()
    from .unpack import UnpackError, unpack_bzimage  # noqa: PLC0415 (bz2, lzma: only for a bzImage)

    try:
        unpacked = unpack_bzimage(kernel)
    except UnpackError as e:
        if Decompress(mode) is Decompress.VMM:
            raise BootError(f"--decompress vmm: {e}") from None
        return Prepared(note=f"{e}; the kernel decompresses itself")
    return Prepared(unpacked, f"payload unpacked by the VMM ({unpacked.describe()})")


def check(kernel: bytes) -> None:
    """Refuse an image load() would refuse for what it is, before anything is built (so a
    wrong file is one line: no KVM probe, no machine). What depends on the guest's RAM is
    load()'s to say."""
    kind = linux.kernel_kind(kernel)
    if kind is None:
        raise BootError("not a kernel: neither an ELF with a PVH entry nor a bzImage")
    if kind == "elf":
        if pvh.pvh_entry(kernel) is None and not linux.is_linux(kernel):  # parses the ELF headers
            raise BootError("kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY) and is not a Linux vmlinux")
    else:
        linux.bzimage_info(kernel)


@dataclass(frozen=True)
class Boot:
    """How the kernel was loaded."""

    state: BootCpuState
    path: str  # one line for the log: which entry, and who decompressed
    cmdline: str  # the command line the kernel got
    linux: bool
    appended: list[str] = field(default_factory=list)  # what the linux-cmdline quirk added


def load(
    mem,
    kernel: bytes,
    initrd: bytes | None,
    cmdline: str,
    *,
    prepared: Prepared = Prepared(),
    linux_cmdline: Callable[[str], tuple[str, list[str]]] | None = None,
    rsdp: int = 0,
) -> Boot:
    """Load `kernel` (+ `initrd`) into `mem` the way the table above says.

    `linux_cmdline`, given for Linux guests only, turns the user's command line into the
    one the kernel gets (the linux-cmdline quirk) and says what it added.
    """
    kind = linux.kernel_kind(kernel)
    if kind is None:
        raise BootError("the kernel is not a kernel: neither an ELF with a PVH entry nor a bzImage")
    is_linux = linux.is_linux(kernel)
    appended: list[str] = []
    if is_linux and linux_cmdline is not None:
        cmdline, appended = linux_cmdline(cmdline)
    modules = [(initrd, "initrd")] if initrd is not None else []

    def boot(state: BootCpuState, path: str) -> Boot:
        return Boot(state, path, cmdline, is_linux, appended)

    if kind == "elf":
        if pvh.pvh_entry(kernel) is not None:
            return boot(pvh.load_pvh(mem, kernel, cmdline, modules, rsdp), "through its PVH entry")
        if is_linux:
            state = linux.load_vmlinux(mem, kernel, cmdline, initrd, rsdp=rsdp)
            return boot(state, "a vmlinux without a PVH note, through its 64-bit ELF entry with boot_params")
        raise BootError("kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY) and is not a Linux vmlinux")

    unpacked = prepared.unpacked
    if unpacked is None:
        state = linux.load_bzimage(mem, kernel, cmdline, initrd, rsdp=rsdp)
        why = f" ({prepared.note})" if prepared.note else ""
        return boot(state, f"through the Linux 64-bit boot protocol: the kernel decompresses itself{why}")
    vmlinux = unpacked.vmlinux
    if pvh.pvh_entry(vmlinux) is not None:
        state = pvh.load_pvh(mem, vmlinux, cmdline, modules, rsdp)
        return boot(state, f"{prepared.note}, entered through the vmlinux's PVH entry")
    state = linux.load_vmlinux(mem, vmlinux, cmdline, initrd, setup=kernel, rsdp=rsdp)
    return boot(state, f"{prepared.note}, entered through the vmlinux's 64-bit ELF entry with boot_params")
