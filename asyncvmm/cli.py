"""`asyncvmm run`: the command line, after bhyve's."""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__, cli_help, log
from .config import VmConfig, parse_memory, parse_pin, parse_slot, parse_topology, serial_config
from .errors import EXIT_ERROR, EXIT_HOST, EXIT_OK, EXIT_TRIPLE_FAULT, EXIT_USAGE, ConfigError, VmmError  # noqa: F401

STATUS_HELP = """exit status:
  0  the guest powered off (ACPI S5), or reset with --no-reboot (a reset through the ACPI
     reset register or the i8042, or a triple fault, restarts the guest without it)
  1  the VM stopped on an error (emulation failure, KVM error, unhandled exit, -e)
  2  bad command line or configuration (nothing was started)
  3  the guest triple-faulted, with --no-reboot
  4  stopped hard from the host (SIGINT, SIGHUP, a second SIGTERM, Ctrl-A x on the console)

signals: SIGTERM presses the ACPI power button, as bhyve does (the guest then powers off,
status 0); if the guest does not listen for it, or on a second SIGTERM, the VM is stopped
(status 4).

console: on a terminal, Ctrl-A x quits, Ctrl-A b sends a break, Ctrl-A Ctrl-A sends Ctrl-A,
Ctrl-A h lists these keys (Ctrl-A c: there is no monitor; use asyncvmm ctl).

-s help lists the PCI drivers, -l help the console devices (as bhyve's).
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, status 2, no usage dump
        raise ConfigError(message)

    def _get_formatter(self):
        # Sized as argparse sizes it (shutil.get_terminal_size), without importing shutil,
        # which brings bz2 and lzma: ~2 ms of every start, for help that is rarely printed.
        # Asked once per parser: add_argument makes a formatter for each flag (~40 ioctls).
        if not hasattr(self, "_columns"):
            self._columns = _terminal_columns()
        return self.formatter_class(prog=self.prog, width=self._columns - 2)


def _terminal_columns() -> int:
    """shutil.get_terminal_size().columns: $COLUMNS, else stdout's terminal, else 80."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="asyncvmm", description="A virtual machine monitor for Linux/KVM, on asyncio.", allow_abbrev=False)
    p.add_argument("--version", action="version", version=f"asyncvmm {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    sub.add_parser("ctl", help="control a running VM (asyncvmm ctl --help)", add_help=False)
    sub.add_parser("load", help="read a disk's boot menu, say what it boots (asyncvmm load --help)", add_help=False)
    run = sub.add_parser(
        "run",
        help="boot a guest",
        description="Boot a guest kernel on KVM (flags after bhyve's).",
        epilog=STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # --no-reboo is a typo, not --no-reboot
    )
    run.add_argument("-c", "--cpus", default="1", metavar="N", help="vCPUs: N or cpus=N,sockets=S,cores=C,threads=T")
    run.add_argument("-m", "--memory", default="256M", metavar="SIZE", help="guest RAM: MiB, or with a suffix (64M, 2G)")
    run.add_argument("--kernel", metavar="PATH", help="kernel: a bzImage, or an ELF with a PVH entry")
    run.add_argument("--initrd", metavar="PATH", help="initial ramdisk")
    run.add_argument("--cmdline", default="", metavar="STR", help="kernel command line")
    run.add_argument(
        "-l", "--console", action="append", default=[], metavar="comN,SPEC",
        help="a COM port (com1..com4) to stdio, a file PATH, socket=PATH or tcp=HOST:PORT "
        "(COM1 goes to stdio without one; repeatable; -l help lists them)",
    )
    run.add_argument("-s", "--slot", action="append", default=[], metavar="SLOT,DRIVER,CONF", help=cli_help.slot_flag_help())
    run.add_argument("-p", "--pin", action="append", default=[], metavar="VCPU:HOSTCPU", help="pin vCPU VCPU's thread to host CPU HOSTCPU (repeatable)")
    run.add_argument(
        "--no-reboot", action="store_true",
        help="end when the guest resets or triple-faults, instead of restarting it",
    )
    run.add_argument("-A", "--acpi", action="store_true", default=True, help="ACPI tables (the default)")
    run.add_argument("--no-acpi", dest="acpi", action="store_false", help="no ACPI tables (and no power button)")
    run.add_argument(
        "-e", "--strict-io", action="store_true",
        help="stop the VM at an access to a port or address nothing emulates (debugging)",
    )
    run.add_argument("-W", "--force-msi", action="store_true", help="virtio-pci devices offer one MSI instead of MSI-X (Linux then uses INTx)")
    run.add_argument(
        "-H", dest="yield_on_hlt", action="store_true",
        help="yield the vCPU's thread on HLT: KVM always does (its in-kernel LAPIC sleeps a halted vCPU)",
    )
    run.add_argument(
        "-P", dest="exit_on_pause", action="store_true",
        help="exit on PAUSE: KVM already does (pause-loop exiting yields a spinning vCPU in the kernel)",
    )
    run.add_argument("-g", dest="gdb_port", metavar="PORT", help="a gdb server on 127.0.0.1:PORT (gdb's target remote)")
    run.add_argument(
        "-G", dest="gdb_spec", metavar="[w][ADDRESS:]PORT",
        help="a gdb server on ADDRESS:PORT (default address 127.0.0.1); w: the guest waits for gdb before its first instruction",
    )
    run.add_argument("-a", dest="xapic", action="store_true", help="the local APIC in xAPIC mode (x2APIC hidden from CPUID)")
    run.add_argument("-S", dest="wired", action="store_true", help="wire guest memory (mlock: never swapped or moved)")
    run.add_argument("--cpu", choices=("host", "baseline"), help="CPU template (default: chosen by probing KVM)")
    run.add_argument("--no-quirks", action="store_true", help="no workarounds even on an emulating KVM")
    run.add_argument(
        "--decompress", choices=("auto", "vmm", "kernel"), default="auto",
        help="who decompresses a bzImage: vmm (the VMM unpacks its payload and enters the vmlinux "
        "through PVH, or its 64-bit entry; no KASLR), kernel (its own decompressor, the boot protocol), "
        "auto (default: vmm when KVM emulates guest code, where the kernel's decompressor takes 20-90 s; "
        "kernel on hardware KVM, where it takes tens of ms)",
    )
    run.add_argument(
        "--profile-boot", action="store_true",
        help="when the VM ends, print where the boot's wall time went: VMM set-up, entry to kernel, "
        "kernel to init, exits by kind",
    )
    run.add_argument(
        "--profile-rip", nargs="?", type=float, const=2.0, default=0.0, metavar="MS",
        help="with the profile, sample guest RIPs every MS milliseconds (default 2) and name the "
        "hottest kernel functions",
    )
    run.add_argument("--symbols", metavar="PATH", help="System.map or vmlinux for --profile-rip (default: found beside the kernel)")
    run.add_argument(
        "--seccomp", choices=("off", "log", "kill"),
        help="system call filters per thread (vCPU, loop, helpers): log what a thread should not call, "
        "or kill the VMM when one does (default: kill, or $ASYNCVMM_SECCOMP)",
    )
    run.add_argument("-r", "--restore", metavar="PATH",
                     help="go on from the snapshot at PATH (asyncvmm ctl snapshot; bhyve's -r): the machine is the "
                     "snapshot's; -s, if given, must name its devices; -l may move its consoles")
    run.add_argument("--incoming", metavar="ADDRESS",
                     help="wait at unix:PATH or tcp:HOST:PORT for a VM migrating here (asyncvmm ctl migrate), and run it")
    run.add_argument("--jail", metavar="DIR", help="run confined (root only): a mount namespace whose root, "
                     "a tmpfs on the empty directory DIR, holds only what the VM uses; then as --uid/--gid, "
                     "with no capabilities and no new privileges (asyncvmm/jail.py)")
    run.add_argument("--uid", metavar="UID", help="with --jail: the user the VMM runs as")
    run.add_argument("--gid", metavar="GID", help="with --jail: the group the VMM runs as")
    run.add_argument("-q", "--quiet", action="store_true", help="no VMM messages but errors")
    run.add_argument("name", nargs="?", help="the VM's name, for `asyncvmm ctl` (default: asyncvmm-PID)")
    from .loader.cli import add_run_arguments  # noqa: PLC0415

    add_run_arguments(run)  # booting from a disk's menu without --kernel (asyncvmm/loader)
    return p


def config_from_args(args: argparse.Namespace) -> VmConfig:
    topology = parse_topology(args.cpus)
    if parse_memory(args.memory) < 2 << 20:  # said as it was written: "-m 0", not "0 bytes"
        raise ConfigError(f"-m {args.memory}: a VM needs at least 2 MiB of memory")
    cfg = VmConfig(
        name=args.name or f"asyncvmm-{os.getpid()}",
        cpus=topology.cpus,
        topology=topology,
        memory=parse_memory(args.memory),
        kernel=args.kernel or "",
        initrd=args.initrd or "",
        cmdline=args.cmdline,
        no_reboot=args.no_reboot,
        cpu_template=args.cpu or "",
        quirks=not args.no_quirks,
        decompress=args.decompress,
        profile_boot=args.profile_boot or bool(args.profile_rip),
        profile_rip_ms=args.profile_rip or 0.0,
        symbols=args.symbols or "",
        slots=[parse_slot(s) for s in args.slot],
        pins=dict(parse_pin(p) for p in args.pin),
        acpi=args.acpi,
        strict_io=args.strict_io,
        force_msi=args.force_msi,
        xapic=args.xapic,
        wired=args.wired,
    )
    if args.seccomp:
        cfg.seccomp = args.seccomp
    if args.gdb_port and args.gdb_spec:
        raise ConfigError("-g and -G both name a gdb port: give one")
    if args.gdb_port or args.gdb_spec:
        from .gdb.options import parse_gdb  # noqa: PLC0415

        cfg.gdb = parse_gdb(args.gdb_port, "-g") if args.gdb_port else parse_gdb(args.gdb_spec, "-G")
    serial_config(args.console, cfg)
    if not cfg.kernel and not cfg.bootrom:
        from .loader.cli import boot_from_disks  # noqa: PLC0415

        boot_from_disks(cfg, args)  # the disks' boot menu names the kernel
    return cfg.validate(cli=True)


def entry() -> None:
    """The `asyncvmm` command: main(), then out without the interpreter's teardown.

    When main() returns, every VM, thread, fd and terminal mode it made is closed or
    restored (asyncvmm registers no atexit work); freeing the ~250 imported modules' objects
    would add 10-25 ms to every command, a tenth of a VM's start-up."""
    status = main()
    if sys.gettrace() is not None or sys.getprofile() is not None:
        sys.exit(status)  # coverage, cProfile: they write their results at the interpreter's exit
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can be said
            pass
    os._exit(status)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    log.use_cli_output()  # the VMM's messages (the logging module's) as one line each on stderr
    if argv and argv[0] == "ctl":  # bhyvectl's analogue has its own parser
        from .control.ctl import main as ctl_main  # noqa: PLC0415

        return ctl_main(argv[1:])
    if argv and argv[0] == "load":  # bhyveload's analogue (asyncvmm/loader)
        from .loader.cli import main_load  # noqa: PLC0415

        return main_load(argv[1:])
    try:
        args, extra = _parser().parse_known_args(argv)
        if extra:  # bhyve's flags that are not here yet say so; anything else is argparse's error
            raise ConfigError(cli_help.not_yet(extra) or f"unrecognized arguments: {' '.join(extra)}")
        if args.command == "run":
            log.set_quiet(args.quiet)
            if "help" in args.slot or "help" in args.console:  # bhyve's -s help, -l help
                print(cli_help.slot_help() if "help" in args.slot else cli_help.console_help())
                return EXIT_OK
            if args.incoming:
                from .snapshot.migrate import run_incoming  # noqa: PLC0415

                return run_incoming(args)
            snapshot = None
            if args.restore:
                from .snapshot.take import load_for_cli  # noqa: PLC0415

                cfg, snapshot = load_for_cli(args)
            else:
                cfg = config_from_args(args)
            if args.jail is not None or args.uid is not None or args.gid is not None:
                from .jail import enter, parse_jail  # noqa: PLC0415

                jail = parse_jail(args.jail, args.uid, args.gid)
                if jail is not None:
                    enter(jail, cfg)  # before any thread starts, and before seccomp
            from .vstate import probe  # noqa: PLC0415

            # The KVM probe, the VM's creation and its RAM's memory slots wait in the kernel:
            # let them overlap the imports (RAM only when it is plain: Vm checks the rest)
            probe.start(spare_vm=True, memory=cfg.memory if snapshot is None and not cfg.wired else 0)
            from .runner import run_to_end  # noqa: PLC0415 (keeps --help and errors fast)

            return run_to_end(cfg, snapshot)
    except ConfigError as e:
        log.error(str(e))
        return EXIT_USAGE
    except VmmError as e:
        log.error(str(e))
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_HOST
    return EXIT_USAGE
