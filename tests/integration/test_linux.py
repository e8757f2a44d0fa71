"""The slow tier: the small Linux kernel (tools/kernel/build-small-kernel), checked through
what the kernel does by itself. CI may boot Linux at most twice: two VM runs, one full
boot each, and every Linux check shares them.

  run 1   -c 2; vda: an ext4 image made here, converted to qcow2 and served by
          qemu-storage-daemon (vhost-user-blk), mounted by the kernel as root=/dev/vda rw;
          vdb: a disk with an MBR partition table; a virtio-net on a TAP in a network
          namespace with dnsmasq (DHCP) and a UDP listener for netconsole; a virtio-rnd (the
          kernel's hwrng reads it: ctl stats counts the bytes) and a virtio-console whose
          first port is hvc0 (console=hvc0: the kernel's log, from when the port is up,
          arrives on its Unix socket).
          FIRST_BOOT_CHECKS read its log; SysRq h and q; SysRq s and u (the file system
          is written out and remounted read-only); gdb with the vmlinux through -g (a
          breakpoint on update_process_times, bt, linux_banner read by virtual address);
          SysRq o powers it off through ACPI S5.
          Then the host reads the image: qemu-img check clean; converted back to raw, mount
          count and time changed, e2fsck -fn clean.
  run 2   booted through the disk loader (asyncvmm/loader), no --kernel: vda is the disk
          tools/images/build-disk-image makes (GPT, ESP, GRUB for BIOS and UEFI, the small
          kernel in the ext4 root's /boot, grub.cfg from Debian's grub-mkconfig), given ,ro;
          its default entry's command line (root=PARTUUID=... ro) with the user's `rw`
          appended: the kernel reads the GPT, finds vda3 write-protected and mounts it
          read-only; SysRq b resets through the ACPI reset register (0xCF9) and the VM
          restarts the guest, whose second boot is watched until its CPUs are up (not to
          init: the only partial boot), then the VM is stopped. The image is unchanged.

On this emulating KVM user space cannot run, so the kernel is the client: the root file
system's /sbin/init (tools/kernel/spin-init.S) spins in user mode without a system call,
so the kernel stays up after "Run /sbin/init" (with its console open, which is when
serial SysRq works). The kernel is the bzImage: on an emulating KVM the VMM unpacks its
payload and enters it through PVH, and appends the parameters this KVM needs (issue 3's
quirks); --profile-boot's report is checked at the end of run 1.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port, needs_kvm
from linux_guest import PRINTK_TIME, debian_disk_image, small_kernel, spin_initramfs, unfiltered_vcpus
from netns import Netns

from asyncvmm import VM, VmConfig
from asyncvmm.config import parse_slot
from asyncvmm.devices.virtio.net.tap import format_mac, stable_mac
from asyncvmm.gdb.options import GdbOptions
from asyncvmm.loop import run as run_loop
from asyncvmm.machine import StopReason
from asyncvmm.quirks import LINUX_CLEARCPUID, PIT_MIN_IRQ_INTERVAL_NS, linux_parameters
from asyncvmm.runner import STATUS

pytestmark = [pytest.mark.slow, needs_kvm]

CPUS = 2
ROOT_SLOT, PARTS_SLOT, NET_SLOT, RND_SLOT, CONSOLE_SLOT = 3, 4, 5, 6, 7
ROOT_MIB = 32
PARTS_SECTORS = 16384
GUEST_IP, HOST_IP = "10.0.2.15", "10.0.2.1"
NETCONSOLE_PORT = 6666
# What a user types: the VMM adds what this KVM needs.
# console=hvc0 first: the kernel logs on both, /dev/console is the last (ttyS0, for SysRq).
CMDLINE = (f"console=hvc0 console=ttyS0 panic=-1 root=/dev/vda rw ip=dhcp "
           f"netconsole=6665@{GUEST_IP}/eth0,{NETCONSOLE_PORT}@{HOST_IP}/")
RIP_SAMPLE_MS = 5
BOOT_TIMEOUT = 420.0  # one boot, seconds of wall time (about 60-200 s here, loaded)
UP = rb"Run /sbin/init as init process"


# -- checks of a boot's log ---------------------------------------------------------------
def check_cpus_came_up(log: str) -> None:
    assert f"smp: Brought up 1 node, {CPUS} CPUs" in log, "the kernel did not bring up both vCPUs"
    assert "ACPI: Using ACPI (MADT) for SMP configuration information" in log


def check_acpi_is_clean(log: str) -> None:
    """No ACPI error, warning or firmware bug about our tables."""
    bad = [line for line in log.splitlines()
           if re.search(r"ACPI (Error|Warning|BIOS Error|BIOS Warning)|ACPI Exception|\[Firmware (Bug|Warn)\]", line)
           # not about tables: the AMD TSC's HWCR MSR bit (TscFreqSel) KVM leaves clear
           and "TSC doesn't count with P0 frequency" not in line]
    assert not bad, "\n".join(bad)
    for line in (
        "ACPI: PM: (supports S0 S5)",
        "ACPI: Interpreter enabled",
        "ACPI: PCI Root Bridge [PCI0] (domain 0000 [bus 00-ff])",
        "PCI: MMCONFIG at [mem 0xb0000000-0xbfffffff] reserved in ACPI motherboard resources",
        "ACPI: button: Power Button [PWRF]",
        "ttyS0 at I/O 0x3f8 (irq = 4",  # COM1 through its PNP0501 device
    ):
        assert line in log, f"missing from the log: {line!r}"


def check_every_pci_device_was_found(log: str) -> None:
    """The host bridge and the disk enumerated on bus 0 behind the DSDT's root (Linux
    takes ECAM, as the MCFG says, for the extended config space), their BARs inside the
    root's windows."""
    for slot, ids in ((0, "8086:29c0"), (ROOT_SLOT, "1af4:1042"), (PARTS_SLOT, "1af4:1042"), (NET_SLOT, "1af4:1041"),
                      (RND_SLOT, "1af4:1044"), (CONSOLE_SLOT, "1af4:1043")):
        assert f"pci 0000:00:{slot:02x}.0: [{ids}]" in log, f"no {ids} at 00:{slot:02x}.0"
    bad = [line for line in log.splitlines()
           if re.search(r"can't claim|no space for|failed to assign|BAR \d+: .*conflict", line)]
    assert not bad, "\n".join(bad)
    assert f"virtio_blk virtio0: [vda] {ROOT_MIB * 2048} 512-byte logical blocks" in log
    assert f"virtio_blk virtio1: [vdb] {PARTS_SECTORS} 512-byte logical blocks" in log


def check_the_command_line(log: str, emulating: bool) -> None:
    """The user's command line first, then exactly the parameters the VMM appended (on an
    emulating KVM only), and the kernel took the clearcpuid list: it names each bit."""
    got = re.search(r"Kernel command line: (.*)", log).group(1).split()
    typed = CMDLINE.split()
    assert got[: len(typed)] == typed
    if not emulating:
        assert got == typed
        return
    assert got[len(typed) :] == linux_parameters()
    cleared = re.search(r"Clearing CPUID bits: (.*)", log).group(1).split()
    assert cleared == [name for name, _, _ in LINUX_CLEARCPUID]


def check_kvm_and_its_clock(log: str) -> None:
    assert "Hypervisor detected: KVM" in log
    assert "kvm-clock: Using msrs" in log


def check_root_mounted_rw(log: str) -> None:
    """virtio-blk: the kernel mounted the ext4 image as its root, read-write."""
    assert "EXT4-fs (vda): mounted filesystem" in log
    assert re.search(r"VFS: Mounted root \(ext4 filesystem\) on device 254:0\.", log), "root not mounted read-write"


def check_partitions(log: str) -> None:
    """The partition table written on the host, as the kernel read it through virtio-blk."""
    assert re.search(r"\bvdb: vdb1 vdb2\r?$", log, re.M), "no 'vdb: vdb1 vdb2' in the log"


def check_dhcp_lease(log: str) -> None:
    """virtio-net: the kernel's IP autoconfiguration got its lease from dnsmasq on the TAP."""
    assert f"IP-Config: Got DHCP answer from {HOST_IP}, my address is {GUEST_IP}" in log
    assert "IP-Config: Complete:" in log
    assert "netconsole: network logging started" in log


def check_the_tick(timers: str, emulating: bool) -> None:
    """What the kernel ticks with, from SysRq q. On hardware KVM: the LAPIC timer the MADT
    gives it. On an emulating KVM the linux-cmdline quirk turns that off (noapictimer,
    lapic=notscdeadline): each CPU's LAPIC timer is a dummy the PIT's broadcast serves."""
    if not emulating:
        assert re.search(r"Per CPU device: 0\s+Clock Event Device:\s+lapic", timers), f"not the LAPIC's:\n{timers}"
        return
    assert re.search(r"Broadcast device\s+Clock Event Device:\s+pit\s", timers), f"the PIT is not the broadcast device:\n{timers}"
    mask = re.search(r"tick_broadcast_mask: ([0-9a-f,]+)", timers)
    assert mask and int(mask.group(1).replace(",", ""), 16) == (1 << CPUS) - 1, f"not every CPU is broadcast to:\n{timers}"


async def tick_deliveries(vm: VM, seconds: float) -> tuple[dict, list[int]]:
    """Over `seconds` of the running guest: the VMM's PIT counters (at the end), how many
    IRQ0s it raised meanwhile and how many interrupts KVM injected into each vCPU."""
    before = vm.stats()["pit"]["irqs"]
    injected = [v.get("irq_injections", 0) for v in vm.profile.kvm_vcpu_counters()]
    await asyncio.sleep(seconds)
    pit = vm.stats()["pit"]
    after = [v.get("irq_injections", 0) for v in vm.profile.kvm_vcpu_counters()]
    assert len(after) == CPUS, "no KVM counters (KVM_GET_STATS_FD)"
    return pit, [pit["irqs"] - before, *(a - b for a, b in zip(after, injected))]


def check_every_cpu_ticks(pit: dict, deltas: list[int], uptime_s: float) -> None:
    """The PIT is the tick of every CPU, bounded: over a few idle seconds each vCPU took at
    least about one interrupt per IRQ0 raised (the first CPU IRQ0, the others the broadcast
    IPI; a few may coalesce on a busy host), and IRQ0 came at most every 20 ms all along."""
    raised, *per_vcpu = deltas
    assert raised >= 10, f"the PIT raised {raised} IRQ0s in the window: it is not the tick ({pit})"
    assert all(n >= raised // 2 for n in per_vcpu), f"{raised} IRQ0s, interrupts injected per vCPU: {per_vcpu}"
    assert pit["deferred"] > 0, f"the bound never deferred an IRQ0 (the guest asks for HZ=100): {pit}"
    bound = uptime_s / (PIT_MIN_IRQ_INTERVAL_NS / 1e9) + 1
    assert pit["irqs"] <= bound, f"{pit['irqs']} IRQ0s in {uptime_s} s: more than one every 20 ms"


FIRST_BOOT_CHECKS = [check_cpus_came_up, check_acpi_is_clean, check_every_pci_device_was_found,
                     check_kvm_and_its_clock, check_root_mounted_rw, check_partitions, check_dhcp_lease]


# -- what the kernel is given -----------------------------------------------------------
def root_image(path: Path, init: Path) -> None:
    """An ext4 file system with /sbin/init (the spinning init) and an empty /dev."""
    tree = path.parent / (path.name + ".tree")
    (tree / "sbin").mkdir(parents=True)
    (tree / "dev").mkdir()
    (tree / "sbin" / "init").write_bytes(init.read_bytes())
    (tree / "sbin" / "init").chmod(0o755)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "avmmroot", "-d", str(tree), str(path), f"{ROOT_MIB}M"], check=True)


def partitioned_disk(path: Path) -> None:
    """A disk with an MBR holding two Linux partitions (type 0x83)."""
    mbr = bytearray(512)
    half = PARTS_SECTORS // 2
    for i, (first, count) in enumerate(((2048, half - 2048), (half, PARTS_SECTORS - half))):
        # status, CHS first (unused), type, CHS last (unused), LBA first, sectors
        struct.pack_into("<B3sB3sII", mbr, 446 + 16 * i, 0, b"\xfe\xff\xff", 0x83, b"\xfe\xff\xff", first, count)
    mbr[510:512] = b"\x55\xaa"
    with open(path, "wb") as f:
        f.write(mbr)
        f.truncate(PARTS_SECTORS * 512)


def superblock(image: Path) -> dict[str, str]:
    out = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True, check=True).stdout
    return dict(line.split(":", 1) for line in out.splitlines() if ":" in line)


class Network:
    """The TAP (made by the VM) moved into a namespace of its own, with dnsmasq serving
    DHCP on it only (the guest's MAC pinned to GUEST_IP) and a UDP listener for netconsole."""

    def __init__(self, tmp: Path, tap: str, mac: bytes):
        self.ns = Netns("linux")
        self.tap, self.mac = tap, mac
        self.leases = tmp / "dnsmasq.leases"
        self.netconsole = tmp / "netconsole.log"
        self.dnsmasq_log = tmp / "dnsmasq.log"

    def __enter__(self) -> "Network":
        self.ns.__enter__()
        return self

    def start(self) -> None:
        """Once the VM made its TAP."""
        self.ns.take(self.tap, addr=f"{HOST_IP}/24")
        self.ns.spawn("dnsmasq", "--no-daemon", "--conf-file=/dev/null", f"--interface={self.tap}",
                      "--bind-interfaces", "--except-interface=lo", "--port=0", "--log-dhcp",
                      f"--dhcp-range={GUEST_IP},{GUEST_IP},1h", f"--dhcp-host={format_mac(self.mac)},{GUEST_IP}",
                      f"--dhcp-leasefile={self.leases}", stdout=open(self.dnsmasq_log, "wb"), stderr=subprocess.STDOUT)
        listener = ("import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
                    f"s.bind(('{HOST_IP}',{NETCONSOLE_PORT}))\nf=open(sys.argv[1],'ab',buffering=0)\n"
                    "while True:\n d,a=s.recvfrom(65536)\n f.write(d)\n")
        self.ns.spawn(sys.executable, "-c", listener, str(self.netconsole))

    def __exit__(self, *exc) -> None:
        self.ns.__exit__()  # dnsmasq, the listener, the namespace (the TAP goes with the VM)


# -- the run ------------------------------------------------------------------------------
async def boot_log(vm: VM, boots: int, timeout: float = BOOT_TIMEOUT) -> str:
    """The console output of boot number `boots`, up to the kernel starting /init."""
    m = await vm.console.expect(rb"(?s)(Linux version .*?" + UP + rb")", timeout=timeout)
    assert vm.boots == boots, f"expected boot {boots}, the VM is at boot {vm.boots}"
    return m.group(1).decode(errors="replace")


async def sysrq(vm: VM, key: bytes) -> None:
    """A serial break, then the SysRq key (the 8250 driver takes the next byte as one)."""
    await vm.sysrq(key.decode())


async def sysrq_output(vm: VM, key: bytes, first: bytes, last: bytes, quiet: float = 2.0) -> str:
    """What the kernel prints for a SysRq key, from `first` to `last`, without timestamps;
    returns once the console has been quiet for `quiet` seconds (a key sent while the
    kernel still prints may have its own message lost, as a reset's would)."""
    await sysrq(vm, key)
    m = await vm.console.expect(rb"(?s)(" + first + rb".*?" + last + rb")", timeout=120)
    text = m.group(1).decode(errors="replace")
    while True:
        try:
            await vm.console.expect(rb"\n", timeout=quiet)
        except TimeoutError:
            break
    return "\n".join(PRINTK_TIME.sub("", line) for line in text.splitlines())


async def check_gdb(port: int, failures: list[str]) -> None:
    """gdb with the kernel's vmlinux on the running kernel (-g): a breakpoint on a function
    every timer tick reaches, its caller in `bt`, the banner read by virtual address (the
    stub walks the kernel's 4-level page tables). The kernel has no debug information and
    no frame pointers: bt's first caller is what can be relied on."""
    vmlinux = small_kernel() / "vmlinux"
    args = ["gdb", "-batch", "-nx", "-ex", "set confirm off", "-ex", f"file {vmlinux}",
            "-ex", f"target remote 127.0.0.1:{port}", "-ex", "break update_process_times", "-ex", "continue",
            "-ex", "bt 3", "-ex", "x/s &linux_banner", "-ex", "info registers cr3 rip", "-ex", "delete", "-ex", "detach"]
    proc = await asyncio.create_subprocess_exec(*args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT)
    out = (await asyncio.wait_for(proc.communicate(), 120))[0].decode(errors="replace")
    if not re.search(r"Breakpoint 1, 0x[0-9a-f]+ in update_process_times \(\)", out):
        failures.append(f"gdb: no stop at update_process_times:\n{out}")
    if not re.search(r"^#1\s+0x[0-9a-f]+ in tick_\w+ \(\)", out, re.M):
        failures.append(f"gdb: bt does not name update_process_times's caller (tick_*):\n{out}")
    if not re.search(r"<linux_banner>:\s+\"Linux version 6\.1", out):
        failures.append(f"gdb: x/s &linux_banner did not read the version string:\n{out}")
    if "detached" not in out:
        failures.append(f"gdb: did not detach:\n{out}")


def run_checks(checks, log: str, boot: str, failures: list[str]) -> None:
    for check in checks:
        try:
            check(log)
        except AssertionError as e:
            failures.append(f"{boot}: {check.__name__}: {e}")


def test_linux_disks_network_smp_and_power_off(tmp_path, capfd, emulating_kvm):
    kernel = small_kernel() / "bzImage"
    init = spin_initramfs().parent / "init"
    root, parts = tmp_path / "root.img", tmp_path / "parts.img"
    root_image(root, init)
    partitioned_disk(parts)
    before = superblock(root)
    root_raw, root = root, tmp_path / "root.qcow2"  # the root disk is a qcow2, through qemu-storage-daemon
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(root_raw), str(root)], check=True)
    name = "linux-slow"
    tap = f"avl{os.getpid() % 100000}"
    mac = stable_mac(name, f"{NET_SLOT}.0")
    hvc = tmp_path / "hvc0.sock"
    cfg = VmConfig(name=name, cpus=CPUS, memory=256 << 20, kernel=str(kernel), cmdline=CMDLINE,
                   slots=[parse_slot(f"{ROOT_SLOT},virtio-blk,{root}"), parse_slot(f"{PARTS_SLOT},virtio-blk,{parts}"),
                          parse_slot(f"{NET_SLOT},virtio-net,{tap}"), parse_slot(f"{RND_SLOT},virtio-rnd"),
                          parse_slot(f"{CONSOLE_SLOT},virtio-console,console={hvc}")],
                   profile_boot=True, profile_rip_ms=RIP_SAMPLE_MS, gdb=GdbOptions(free_port()))
    failures: list[str] = []
    times: dict[str, float] = {}
    console_log = tmp_path / "console.log"
    report: list[str] = []
    net_stats: list[dict] = []
    hvc_out = bytearray()  # what arrived on virtio-console's first port (hvc0)
    ctl_stats: list[dict] = []

    async def read_hvc(reader: asyncio.StreamReader) -> None:
        while data := await reader.read(65536):
            hvc_out.extend(data)

    async def main(net: Network):
        async with VM(cfg) as vm:
            net.start()
            reader, writer = await asyncio.open_unix_connection(str(hvc))  # a client, as a user's
            hvc_task = asyncio.ensure_future(read_hvc(reader))
            try:
                return await steps(vm)
            finally:  # the whole console, for whoever reads a failure
                console_log.write_bytes(bytes(vm.console.transcript))
                hvc_task.cancel()
                writer.close()

    async def steps(vm: VM):
        t0 = time.monotonic()
        first = await boot_log(vm, 1)
        failures.extend(f"boot 1: a vCPU thread without its seccomp filter: {t}" for t in unfiltered_vcpus())
        times["boot"] = time.monotonic() - t0
        run_checks(FIRST_BOOT_CHECKS, first, "boot 1", failures)
        run_checks([lambda log: check_the_command_line(log, emulating_kvm)], first, "boot 1", failures)

        # The kernel stays up after init: SysRq over the serial line works.
        help_text = await sysrq_output(vm, b"h", rb"sysrq: HELP :", rb"show-all-timers\(q\)")
        if "reboot(b)" not in help_text or "show-all-timers(q)" not in help_text:
            failures.append(f"boot 1: SysRq h: {help_text!r}")
        timers = await sysrq_output(vm, b"q", rb"sysrq: Show clockevent devices", rb"Wakeup Device")
        run_checks([lambda text: check_the_tick(text, emulating_kvm)], timers, "boot 1: SysRq q", failures)
        if emulating_kvm:
            pit, deltas = await tick_deliveries(vm, 5.0)
            uptime = vm.stats()["uptime_s"]
            run_checks([lambda _: check_every_cpu_ticks(pit, deltas, uptime)], "", "boot 1: the tick", failures)
        # Write the file system out and remount it read-only, so the host finds it clean.
        await sysrq_output(vm, b"s", rb"sysrq: Emergency Sync", rb"Emergency Sync complete")
        await sysrq_output(vm, b"u", rb"sysrq: Emergency Remount R/O", rb"Emergency Remount complete")
        net_stats.append(vm.stats()["pci"][f"virtio-net@{NET_SLOT}.0"])
        ctl = await asyncio.create_subprocess_exec(sys.executable, "-m", "asyncvmm", "ctl", "stats", name, "--json",
                                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, _ = await asyncio.wait_for(ctl.communicate(), 60)
        ctl_stats.append(json.loads(out) if ctl.returncode == 0 else {"status": ctl.returncode})
        t1 = time.monotonic()
        await check_gdb(cfg.gdb.port, failures)
        times["gdb"] = time.monotonic() - t1

        await sysrq(vm, b"o")
        await vm.console.expect(rb"sysrq: Power Off", timeout=60)
        stop = await asyncio.wait_for(vm.wait(), 120)
        report.append(vm.profile.report())
        return stop, bytes(vm.console.transcript)

    with Network(tmp_path, tap, mac) as net:
        try:
            stop, transcript = run_loop(main(net))
        except (TimeoutError, EOFError) as e:
            raise AssertionError(f"{e} (the console: {console_log})") from None
        time.sleep(0.5)  # the last datagrams
        netconsole = net.netconsole.read_bytes() if net.netconsole.exists() else b""
        leases = net.leases.read_text() if net.leases.exists() else ""
    assert not os.path.exists(f"/sys/class/net/{tap}"), "the TAP outlived the VM"
    err = capfd.readouterr().err
    with capfd.disabled():
        print(f"\nrun 1 wall time: {', '.join(f'{k} {v:.1f} s' for k, v in times.items())}")
    assert stop.reason is StopReason.POWEROFF, (stop, transcript[-3000:])
    assert stop.message == "guest powered off through ACPI S5"  # not a triple fault, not the host
    assert STATUS[stop.reason] == 0  # `asyncvmm run`'s status for it
    assert b"reboot: Power down" in transcript
    # netconsole: the kernel's log lines came over UDP through virtio-net and the TAP.
    for line in (b"Linux version 6.1", b"IP-Config: Complete:", b"Run /sbin/init as init process"):
        if line not in netconsole:
            failures.append(f"netconsole: {line!r} did not arrive over UDP ({len(netconsole)} bytes did)")
    # virtio-console: the kernel's log on hvc0, from when the port is up (the hvc console is
    # registered at boot with nowhere to write; what it printed before is not replayed): the
    # root mount and init come after, and every line is one the serial console has too.
    hvc_lines = [line for line in hvc_out.decode(errors="replace").replace("\r", "").splitlines() if line.strip()]
    serial = set(transcript.decode(errors="replace").replace("\r", "").splitlines())
    for line in (b"VFS: Mounted root (ext4 filesystem)", b"Run /sbin/init as init process"):
        if line not in hvc_out:
            failures.append(f"virtio-console: {line!r} did not arrive on hvc0's socket ({len(hvc_out)} bytes did)")
    if len(hvc_lines) < 5 or not all(line in serial for line in hvc_lines[:-1]):
        failures.append(f"virtio-console: hvc0's lines are not the kernel's log: {hvc_lines[:5]}")
    # virtio-rnd: the kernel's hwrng read entropy from it; `asyncvmm ctl stats` shows it.
    entropy = ctl_stats[0].get("pci", {}).get(f"virtio-rnd@{RND_SLOT}.0", {}).get("entropy", {}) if ctl_stats else {}
    if not entropy.get("bytes", 0) > 0:
        failures.append(f"virtio-rnd: no entropy served in ctl stats: {ctl_stats[:1]}")
    if format_mac(mac) not in leases or GUEST_IP not in leases:
        failures.append(f"dnsmasq's lease file: {leases!r}")
    pairs = net_stats[0]["pairs"][0] if net_stats else {}
    if not (pairs.get("rx_packets", 0) >= 1 and pairs.get("tx_packets", 0) >= 10 and not pairs.get("tx_errors", 1)):
        failures.append(f"virtio-net counters: {pairs}")
    if net_stats and not net_stats[0].get("thread", {}).get("serving"):  # MSI-X: the device's own thread
        failures.append(f"virtio-net was not served by its own thread: {net_stats[0].get('thread')}")
    # The host reads what the kernel wrote: a clean qcow2, the mount it recorded, a clean file system.
    if not re.search(r"disk \S+root.qcow2: qemu-storage-daemon \(pid \d+\) stopped", err):
        failures.append("VMM log: qemu-storage-daemon was not said to stop")
    check = subprocess.run(["qemu-img", "check", str(root)], capture_output=True, text=True)
    if check.returncode != 0:
        failures.append(f"qemu-img check: status {check.returncode}: {check.stdout}{check.stderr}")
    qcow2, root = root, tmp_path / "root.back.img"
    subprocess.run(["qemu-img", "convert", "-q", "-O", "raw", str(qcow2), str(root)], check=True)
    after = superblock(root)
    if int(after["Mount count"]) != int(before["Mount count"]) + 1 or after["Last mount time"] == before["Last mount time"]:
        failures.append(f"ext4 superblock: mount count {before['Mount count'].strip()} -> {after['Mount count'].strip()}, "
                        f"last mount {before['Last mount time'].strip()} -> {after['Last mount time'].strip()}")
    fsck = subprocess.run(["e2fsck", "-fn", str(root)], capture_output=True, text=True)
    if fsck.returncode != 0:
        failures.append(f"e2fsck -fn: status {fsck.returncode}: {fsck.stdout}{fsck.stderr}")
    check_the_vmm_log(err, report[0], emulating_kvm, failures)
    assert not failures, "\n".join(failures)


def test_linux_read_only_root_and_acpi_reset(tmp_path, capfd):
    from asyncvmm.loader.cli import boot_from_disks  # noqa: PLC0415

    small_kernel()
    root = tmp_path / "disk.img"
    subprocess.run(["cp", "--sparse=always", str(debian_disk_image()), str(root)], check=True)
    digest = hashlib.sha256(root.read_bytes()).hexdigest()
    # ip=dhcp: the kernel's lease comes through passt (user-mode networking, no TAP).
    cfg = VmConfig(name="linux-slow-ro", cpus=1, memory=256 << 20, cmdline="rw ip=dhcp",
                   slots=[parse_slot(f"{ROOT_SLOT},virtio-blk,{root},ro"), parse_slot(f"{NET_SLOT},virtio-net,passt")])
    boot_from_disks(cfg)  # what `asyncvmm run -s 3,virtio-blk,disk.img,ro --cmdline rw` does
    partuuid = re.search(r"root=PARTUUID=(\S+)", cfg.cmdline).group(1)
    assert cfg.cmdline == f"root=PARTUUID={partuuid} ro console=ttyS0 panic=-1 rw ip=dhcp"
    console_log = tmp_path / "console.log"
    times: dict[str, float] = {}
    snap = tmp_path / "linux.snap"
    unfiltered: list[str] = []  # vCPU threads without their seccomp filter

    async def main():
        async with VM(cfg) as vm:
            try:
                t0 = time.monotonic()
                log = await boot_log(vm, 1)
                unfiltered.extend(unfiltered_vcpus())
                times["boot"] = time.monotonic() - t0
                await sysrq_output(vm, b"h", rb"sysrq: HELP :", rb"show-all-timers\(q\)")
                await vm.snapshot(str(snap))  # the booted kernel, restored after this run (below)
                await vm.resume()
                await sysrq(vm, b"b")
                await vm.console.expect(rb"sysrq: Resetting", timeout=60)
                t1 = time.monotonic()
                # The second boot comes up: its banner, then its CPU (not to init: see above).
                m = await vm.console.expect(rb"(?s)(Linux version .*?smp: Brought up 1 node, 1 CPU)", timeout=BOOT_TIMEOUT)
                times["second boot to its CPUs"] = time.monotonic() - t1
                boots = vm.boots
                await vm.kill()
                return log, m.group(1).decode(errors="replace"), boots
            finally:
                console_log.write_bytes(bytes(vm.console.transcript))

    try:
        log, second, boots = run_loop(main())
    except (TimeoutError, EOFError) as e:
        raise AssertionError(f"{e} (the console: {console_log})") from None
    err = capfd.readouterr().err
    with capfd.disabled():
        print(f"\nrun 2 wall time: {', '.join(f'{k} {v:.1f} s' for k, v in times.items())}")
    # The loader booted the image's default entry from its third partition, and the kernel
    # found its root there by the PARTUUID grub-mkconfig wrote.
    assert re.search(r"loader: booting entry 0 'Debian GNU/Linux' of the GRUB menu /boot/grub/grub.cfg: kernel "
                     r"/boot/vmlinuz-\S+ from disk.img partition 3 \(gpt, Linux\), ext4", err), err
    assert re.search(r"\bvda: vda1 vda2 vda3\r?$", log, re.M), "the kernel did not read the GPT"
    assert f"Kernel command line: root=PARTUUID={partuuid} ro console=ttyS0 panic=-1 rw ip=dhcp" in log
    # passt answered the kernel's DHCP with this host's own address (its default).
    lease = re.search(r"IP-Config: Got DHCP answer from [\d.]+, my address is ([\d.]+)", log)
    assert lease and "IP-Config: Complete:" in log, log[-3000:]
    assert f"inet {lease.group(1)}/" in subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True).stdout
    assert re.search(rf"{NET_SLOT}:0 virtio-net passt \(pid \d+, as ", err), err
    # The disk says it is read-only (VIRTIO_BLK_F_RO): the kernel's read-write mount of it
    # is refused (EACCES) and it mounts the root read-only instead.
    assert re.search(r"VFS: Mounted root \(ext4 filesystem\) readonly on device 254:3\.", log), log[-3000:]
    assert "guest reset through the reset control register (0xCF9): restarting the guest" in err, err
    assert boots == 2 and "Linux version 6.1" in second
    assert not unfiltered, unfiltered
    assert hashlib.sha256(root.read_bytes()).hexdigest() == digest, "the read-only image changed"

    # The snapshot of the first boot, restored in a new VM object (its machine rebuilt from the
    # snapshot's config): its UART, interrupts and ACPI go on — SysRq o powers it off via S5.
    async def restored():
        async with VM.from_snapshot(str(snap), name="linux-slow-ro-restored") as vm:
            await sysrq(vm, b"o")
            async with asyncio.timeout(120):
                stop = await vm.wait()
            return stop, bytes(vm.console.transcript)

    stop, transcript = run_loop(restored())
    assert b"sysrq: Power Off" in transcript and b"reboot: Power down" in transcript, transcript[-2000:]
    assert stop.message == "guest powered off through ACPI S5"


def check_the_vmm_log(err: str, report: str, emulating: bool, failures: list[str]) -> None:
    """What the VMM said: the boot path and the quirks (only on an emulating KVM), and the
    boot profile of the first boot."""
    expected = [
        "payload unpacked by the VMM (lz4," if emulating else "the kernel decompresses itself",
        "entered through the vmlinux's PVH entry" if emulating else "64-bit boot protocol",
    ]
    if emulating:
        expected += [
            "quirks for an emulating KVM on",
            "quirks: kvm-pv-hypercalls: hidden from the guest: kvm_pv_unhalt, kvm_pv_send_ipi",
            "quirks: vmm-pit:",
            f"appended to the kernel command line: {' '.join(linux_parameters())}",
        ]
    failures += [f"VMM log: missing {line!r}" for line in expected if line not in err]
    if not emulating and "quirks" in err:
        failures.append("VMM log: quirks on hardware KVM")
    phases = dict(re.findall(r"^  (VMM set-up|entry to kernel|kernel to init|after init)\s+([\d.]+) s", report, re.M))
    if set(phases) != {"VMM set-up", "entry to kernel", "kernel to init", "after init"}:
        failures.append(f"profile: phases {sorted(phases)}:\n{report}")
    elif not (float(phases["VMM set-up"]) < 5 and float(phases["entry to kernel"]) < 5):
        failures.append(f"profile: set-up or entry too long (the VMM unpacks):\n{report}")
    if not re.search(r"^  IO\s+\d+\s+[\d.]+ s \(of which \d+ served in C", report, re.M):
        failures.append(f"profile: no IO exits line:\n{report}")
    m = re.search(rf"RIP samples: (\d+) \(every {RIP_SAMPLE_MS} ms, all vCPUs\), named from (\S+?);", report)
    hottest = re.findall(r"^\s+[\d.]+%\s+\d+\s+(\S+)$", report, re.M)
    if not (m and int(m.group(1)) > 1000 and m.group(2).endswith("System.map") and len(hottest) >= 10
            and not all(name.startswith("0x") for name in hottest)):
        failures.append(f"profile: RIP samples not named:\n{report}")
