"""What `asyncvmm run` says about itself: bhyve's `-s help` and `-l help`, and bhyve's flags
that asyncvmm does not have yet (each refused with why, as `ctl` refuses bhyvectl's)."""

from __future__ import annotations

from .config import PLANNED_DRIVERS

# bhyve's run flags asyncvmm does not take yet: flag -> (what it is in bhyve, what to do
# meanwhile). Delete a flag's entry when it lands.
NOT_YET: dict[str, tuple[str, str]] = {
    "-I": ("an I/O APIC", "the I/O APIC is always there (KVM's in-kernel irqchip), leave -I out"),
}


def not_yet(extra: list[str]) -> str | None:
    """The explanation for the first of bhyve's flags in `extra` (the arguments argparse did
    not take) that asyncvmm does not have yet; None if there is none."""
    for arg in extra:
        flag = arg[:2]  # -g1234 as well as -g 1234
        if arg.startswith("-") and not arg.startswith("--") and flag in NOT_YET:
            what, meanwhile = NOT_YET[flag]
            return f"{flag}: bhyve's {flag} ({what}) is not an asyncvmm option: {meanwhile}"
    return None


def slot_help() -> str:
    """bhyve's `-s help`: the drivers there are."""
    from .devices.slots import driver_names  # noqa: PLC0415

    lines = ["-s SLOT[:FUNC],DRIVER[,CONF] (or BUS:SLOT:FUNC; bus 0), drivers:"]
    lines += [f"  {name}" for name in driver_names()]
    lines.append(f"not in asyncvmm yet: {', '.join(sorted(PLANNED_DRIVERS))}")
    lines.append("(the README lists each driver's CONF)")
    return "\n".join(lines)


def console_help() -> str:
    """bhyve's `-l help`: the devices -l configures, and their backends."""
    from .platform import COM_PORTS  # noqa: PLC0415

    ports = [f"  {p.name}    a 16550 UART at {p.port:#x}, IRQ {p.irq} (Linux: console=ttyS{i})"
             for i, p in enumerate(COM_PORTS)]
    return "\n".join([
        "-l DEVICE,BACKEND, devices:",
        *ports,
        "backends: stdio (a terminal is put in raw mode; Ctrl-A h lists the escape keys), a file PATH, "
        "socket=PATH (a Unix socket), tcp=HOST:PORT (listening; one client at a time)",
    ])


def slot_flag_help() -> str:
    """The -s flag's line in --help."""
    from .devices.slots import driver_names  # noqa: PLC0415

    return f"a PCI device; DRIVER is one of {', '.join(driver_names())} (-s help lists them)"
