"""floor.py - the start-up floor of a Python program that boots a guest on KVM: an anchor.

    .venv/bin/python perf/floor.py [--sync | --uvloop] GUEST.elf [CMDLINE]

What rawkvm.c does, less its in-kernel PIT (asyncvmm has none): a PVH ELF on one vCPU
in 32-bit protected mode, its port I/O served inline (OUT 0x3F8 to stdout, IN 0x3FD ->
0x60, OUT 0x64 <- 0xFE stops, other IN -> 0xff), in as little Python as it takes: os,
mmap, struct, fcntl.ioctl and ctypes for one address; no asyncvmm, no cffi. With asyncio
(the default) the vCPU runs in a thread the loop waits for, as a VMM on asyncio must
(KVM_RUN blocks); --uvloop runs that loop on uvloop (which imports ssl); --sync imports
no asyncio at all. So the steps up from `python -c pass` to asyncvmm are: the
interpreter, KVM and the guest (--sync), the event loop's standard library (asyncio,
--uvloop), and what asyncvmm adds on top (its modules, its devices, its checks).
perf/README.md, start-up, has the figures.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import sys

RAM_SIZE = 64 << 20
TSS_ADDR = 0xFFFBD000
START_INFO_GPA, MEMMAP_GPA, CMDLINE_GPA = 0x1000, 0x1800, 0x2000
XEN_ELFNOTE_PHYS32_ENTRY = 18
HVM_START_MAGIC = 0x336EC578
MAP_NORESERVE = 0x4000  # <sys/mman.h>; the mmap module of 3.11 does not name it

# <linux/kvm.h>: _IO(KVMIO, n) = 0xAE00 | n; _IOW/_IOR/_IOWR add the size and direction.
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


KVM_GET_API_VERSION = _ioc(0, 0x00, 0)
KVM_CREATE_VM = _ioc(0, 0x01, 0)
KVM_GET_VCPU_MMAP_SIZE = _ioc(0, 0x04, 0)
KVM_GET_SUPPORTED_CPUID = _ioc(3, 0x05, 8)
KVM_CREATE_VCPU = _ioc(0, 0x41, 0)
KVM_SET_USER_MEMORY_REGION = _ioc(1, 0x46, 32)
KVM_SET_TSS_ADDR = _ioc(0, 0x47, 0)
KVM_CREATE_IRQCHIP = _ioc(0, 0x60, 0)
KVM_RUN = _ioc(0, 0x80, 0)
KVM_SET_REGS = _ioc(1, 0x82, 144)
KVM_GET_SREGS = _ioc(2, 0x83, 312)
KVM_SET_SREGS = _ioc(1, 0x84, 312)
KVM_SET_CPUID2 = _ioc(1, 0x90, 8)
KVM_EXIT_IO, KVM_EXIT_IO_OUT = 2, 1

SEGMENT = struct.Struct("<QIHBBBBBBBBBx")  # struct kvm_segment: base limit selector type present dpl db s l g avl unusable
CPUID_ENTRY_SIZE, CPUID_MAX = 40, 256


def load_pvh_elf(image: bytes, ram: mmap.mmap) -> int:
    """Copy the PT_LOAD segments of a 32-bit ELF to their physical addresses; the PVH entry."""
    if image[:4] != b"\x7fELF" or image[4] != 1:
        raise SystemExit("floor: not a 32-bit ELF")
    phoff, = struct.unpack_from("<I", image, 28)
    phentsize, phnum = struct.unpack_from("<HH", image, 42)
    entry = None
    for i in range(phnum):
        p_type, off, _vaddr, paddr, filesz, memsz, _flags, _align = struct.unpack_from("<8I", image, phoff + i * phentsize)
        if p_type == 1:  # PT_LOAD
            ram[paddr : paddr + filesz] = image[off : off + filesz]
            ram[paddr + filesz : paddr + memsz] = bytes(memsz - filesz)
        elif p_type == 4:  # PT_NOTE
            at = off
            while at + 12 <= off + filesz:
                namesz, descsz, n_type = struct.unpack_from("<III", image, at)
                name = image[at + 12 : at + 12 + namesz].rstrip(b"\0")
                desc = at + 12 + (namesz + 3) // 4 * 4
                if name == b"Xen" and n_type == XEN_ELFNOTE_PHYS32_ENTRY:
                    entry, = struct.unpack_from("<I", image, desc)
                at = desc + (descsz + 3) // 4 * 4
    if entry is None:
        raise SystemExit("floor: no Xen PHYS32_ENTRY note: not a PVH image")
    return entry


def boot(path: str, cmdline: str):
    """Make the VM and its vCPU, ready at the PVH entry: (kvm_run mapping, vCPU fd)."""
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    if fcntl.ioctl(kvm, KVM_GET_API_VERSION) != 12:
        raise SystemExit("floor: unexpected KVM API version")
    vm = fcntl.ioctl(kvm, KVM_CREATE_VM)
    fcntl.ioctl(vm, KVM_SET_TSS_ADDR, TSS_ADDR - (1 << 32))  # ioctl() takes a C int: the same 32 bits
    fcntl.ioctl(vm, KVM_CREATE_IRQCHIP)
    ram = mmap.mmap(-1, RAM_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
    region = struct.pack("<IIQQQ", 0, 0, 0, RAM_SIZE, _address_of(ram))
    fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION, region)
    with open(path, "rb") as f:
        entry = load_pvh_elf(f.read(), ram)
    ram[MEMMAP_GPA : MEMMAP_GPA + 48] = struct.pack("<QQII QQII", 0, 0xA0000, 1, 0, 0x100000, RAM_SIZE - 0x100000, 1, 0)
    ram[CMDLINE_GPA : CMDLINE_GPA + len(cmdline) + 1] = cmdline.encode() + b"\0"
    ram[START_INFO_GPA : START_INFO_GPA + 56] = struct.pack(
        "<IIIIQQQQII", HVM_START_MAGIC, 1, 0, 0, 0, CMDLINE_GPA, 0, MEMMAP_GPA, 2, 0)

    vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
    run = mmap.mmap(vcpu, fcntl.ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    cpuid = bytearray(8 + CPUID_ENTRY_SIZE * CPUID_MAX)
    struct.pack_into("<I", cpuid, 0, CPUID_MAX)
    fcntl.ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid)
    fcntl.ioctl(vcpu, KVM_SET_CPUID2, cpuid)

    sregs = bytearray(312)
    fcntl.ioctl(vcpu, KVM_GET_SREGS, sregs)
    code = SEGMENT.pack(0, 0xFFFFFFFF, 0x8, 0xB, 1, 0, 1, 1, 0, 1, 0, 0)
    data = SEGMENT.pack(0, 0xFFFFFFFF, 0x10, 0x3, 1, 0, 1, 1, 0, 1, 0, 0)
    tr = SEGMENT.pack(0, 0x67, 0, 0xB, 1, 0, 0, 0, 0, 0, 0, 0)
    sregs[0:192] = code + data * 5 + tr + sregs[168:192]  # cs ds es fs gs ss tr (ldt as it was)
    struct.pack_into("<Q", sregs, 224, 0x1 | 0x10)  # cr0: PE | ET
    struct.pack_into("<Q", sregs, 248, 0)  # cr4
    struct.pack_into("<Q", sregs, 264, 0)  # efer
    fcntl.ioctl(vcpu, KVM_SET_SREGS, sregs)
    regs = bytearray(144)
    struct.pack_into("<Q", regs, 8, START_INFO_GPA)  # rbx
    struct.pack_into("<QQ", regs, 128, entry, 0x2)  # rip, rflags
    fcntl.ioctl(vcpu, KVM_SET_REGS, regs)
    return run, vcpu, (kvm, vm, ram)


def _address_of(buf: mmap.mmap) -> int:
    """The mapping's address (for KVM_SET_USER_MEMORY_REGION): mmap does not say it, ctypes
    does (~1 ms of import; asyncvmm has cffi for this)."""
    import ctypes  # noqa: PLC0415

    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def run_vcpu(run: mmap.mmap, vcpu: int) -> int:
    """KVM_RUN until the guest resets through the i8042; its port I/O served inline."""
    out = sys.stdout.buffer
    while True:
        fcntl.ioctl(vcpu, KVM_RUN, 0)
        reason, = struct.unpack_from("<I", run, 8)
        if reason != KVM_EXIT_IO:
            sys.stderr.write(f"floor: exit reason {reason}\n")
            return 1
        direction, size, port, count, data_offset = struct.unpack_from("<BBHIQ", run, 32)
        if direction == KVM_EXIT_IO_OUT:
            if port == 0x3F8:
                out.write(run[data_offset : data_offset + size * count])
            elif port == 0x64 and run[data_offset] == 0xFE:
                out.flush()
                return 0
        else:
            run[data_offset : data_offset + size * count] = (b"\x60" if port == 0x3FD else b"\xff") * (size * count)


def main(argv: list[str]) -> int:
    mode = "asyncio"
    if argv and argv[0] in ("--sync", "--uvloop"):
        mode = argv.pop(0)[2:]
    if not 1 <= len(argv) <= 2:
        sys.stderr.write(__doc__.split("\n\n")[1] + "\n")
        return 2
    path, cmdline = argv[0], (argv[1] if len(argv) > 1 else "")
    if mode == "sync":
        run, vcpu, _keep = boot(path, cmdline)
        return run_vcpu(run, vcpu)
    import asyncio  # noqa: PLC0415

    async def vmm() -> int:
        run, vcpu, _keep = boot(path, cmdline)
        return await asyncio.to_thread(run_vcpu, run, vcpu)

    if mode == "uvloop":
        import uvloop  # noqa: PLC0415

        return uvloop.run(vmm())
    return asyncio.run(vmm())


if __name__ == "__main__":
    status = main(sys.argv[1:])
    sys.stdout.flush()
    os._exit(status)  # as asyncvmm's entry does: no interpreter teardown
