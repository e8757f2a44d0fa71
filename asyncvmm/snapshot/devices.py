"""The device models' state in a snapshot: the legacy port devices, and every PCI function
(configuration space, BARs, MSI/MSI-X, INTx, the virtio transport and the device behind it).

Each model's state is its registers as plain data (JSON). Restoring puts the registers back
and then redoes what the registers imply on the host — BAR windows on the buses and their
doorbell ioeventfds, MSI/MSI-X routes committed to KVM, the UART fast path re-armed, a
virtio device activated on its queues (its `restore()` taken before any queue is served) —
through the models' own code paths, so nothing is set up in two ways.

Times the VMM's own models keep on CLOCK_MONOTONIC (the VMM's PIT) are saved relative to
the moment of the snapshot and re-based on the moment of restore: the guest sees no time
pass while it was saved. The RTC follows wall time, as a real one does.
"""

from __future__ import annotations

import enum
import time
from collections import deque

from ..devices.legacy import uart16550
from ..devices.legacy.i8042 import Command as I8042Command
from ..errors import ConfigError

UART_FIELDS = ("_ier", "_lcr", "_mcr", "_scr", "_dll", "_dlm", "_fifo_enabled", "_rx_capacity", "_trigger",
               "_rbr_last", "_lsr_errors", "_thre_pending", "_msr_inputs", "_msr_deltas", "_irq_level", "_thr_ok")
I8042_FIELDS = ("command_byte", "output_port", "_output", "_output_aux", "_last_output", "_last_was_command", "resets")
RTC_FIELDS = ("_index", "_status_a", "_status_b", "_set_at", "_set_to", "_weekday_shift")
ACPI_PM_FIELDS = ("status", "enable", "control", "smi_enable", "_level")
FW_CFG_FIELDS = ("selected", "offset", "dma_high")  # the items are rebuilt from the config
PIT_COUNTER_FIELDS = ("mode", "access", "bcd", "gate", "reload", "null_count", "loaded", "counting", "offset",
                      "write_lsb_next", "read_lsb_next", "partial", "latched_count", "latched_status")
TRANSPORT_FIELDS = ("status", "device_feature_select", "driver_feature_select", "driver_features", "config_vector",
                    "queue_select", "config_generation", "active")
QUEUE_FIELDS = ("size", "vector", "enabled", "desc", "driver", "device")


def _get(obj, names) -> dict:
    out = {}
    for n in names:
        v = getattr(obj, n)
        out[n] = list(v) if isinstance(v, (list, deque)) else v.value if isinstance(v, enum.Enum) else v
    return out


def _put(obj, state: dict, names) -> None:
    for n in names:
        old, v = getattr(obj, n), state[n]
        if isinstance(old, enum.Enum) and v is not None:
            v = type(old)(v)
        setattr(obj, n, v)


# -- the legacy devices -------------------------------------------------------------------
def save_legacy(legacy) -> dict:
    now = time.monotonic_ns()
    out: dict = {"serial": {}, "isa_lines": {}}
    for name, port in legacy.serial.items():
        u = port.uart
        out["serial"][name] = {**_get(u, UART_FIELDS), "rx": list(u._rx),
                               "sysrq_key": port.sysrq_key.hex() if port.sysrq_key else None}
    for irq, line in legacy.irq_lines.items():
        out["isa_lines"][str(irq)] = {"outputs": dict(line._outputs), "level": line.level}
    i = legacy.i8042
    out["i8042"] = {**_get(i, I8042_FIELDS), "_pending": int(i._pending) if i._pending is not None else None}
    r = legacy.rtc
    out["rtc"] = {**_get(r, RTC_FIELDS), "cmos": bytes(r._cmos).hex(),
                  "frozen": sorted(r._frozen.items()) if r._frozen is not None else None}
    if legacy.acpi_pm is not None:
        out["acpi_pm"] = _get(legacy.acpi_pm, ACPI_PM_FIELDS)
    if legacy.fw_cfg is not None:
        out["fw_cfg"] = _get(legacy.fw_cfg, FW_CFG_FIELDS)
    if legacy.reset_control is not None:
        out["reset_control"] = int(legacy.reset_control.value)
    if legacy.pit is not None:  # the VMM's PIT (the vmm-pit quirk); KVM's is in kvm_state
        pit = legacy.pit
        model = pit.model
        out["pit"] = {
            "counters": [{**_get(c, PIT_COUNTER_FIELDS), "start_ns": c.start_ns - now} for c in model._counters],
            "port_b": model._port_b, "last_irq": pit._last_irq - now, "since": pit._since - now,
        }
    return out


def check_legacy(legacy, state: dict) -> None:
    """The snapshot's legacy devices are this machine's (before anything is restored)."""
    have, saved = sorted(legacy.serial), sorted(state["serial"])
    if have != saved:
        raise ConfigError(f"the snapshot has COM ports {', '.join(saved) or 'none'}, this machine "
                          f"{', '.join(have) or 'none'}")
    if ("acpi_pm" in state) != (legacy.acpi_pm is not None):
        raise ConfigError("the snapshot's machine and this one differ in ACPI (-A/--no-acpi)")
    if ("fw_cfg" in state) != (legacy.fw_cfg is not None):
        raise ConfigError("the snapshot's machine and this one differ in firmware (-l bootrom)")
    if ("pit" in state) != (legacy.pit is not None):
        raise ConfigError("the snapshot's PIT is " + ("the VMM's" if "pit" in state else "KVM's") +
                          ", this machine's is not (--no-quirks, or another KVM)")


def restore_legacy(legacy, state: dict) -> None:
    now = time.monotonic_ns()
    for name, s in state["serial"].items():
        port = legacy.serial[name]
        u = port.uart
        _put(u, s, UART_FIELDS)
        u._rx = deque(s["rx"])
        dlab = u._lcr & uart16550._LCR_DLAB
        u._readers, u._writers = (uart16550._READERS_DLAB, uart16550._WRITERS_DLAB) if dlab else \
            (uart16550._READERS, uart16550._WRITERS)
        port.sysrq_key = bytes.fromhex(s["sysrq_key"]) if s["sysrq_key"] else None
    for irq, s in state["isa_lines"].items():
        line = legacy.irq_lines.get(int(irq))
        if line is not None:
            line._outputs.update({k: v for k, v in s["outputs"].items() if k in line._outputs})
            line.level = s["level"]
    i = legacy.i8042
    _put(i, state["i8042"], I8042_FIELDS)
    p = state["i8042"]["_pending"]
    i._pending = I8042Command(p) if p is not None else None
    r = legacy.rtc
    _put(r, state["rtc"], RTC_FIELDS)
    r._cmos[:] = bytes.fromhex(state["rtc"]["cmos"])
    frozen = state["rtc"]["frozen"]
    r._frozen = {int(k): v for k, v in frozen} if frozen is not None else None
    if legacy.acpi_pm is not None:
        _put(legacy.acpi_pm, state["acpi_pm"], ACPI_PM_FIELDS)
    if legacy.fw_cfg is not None:
        _put(legacy.fw_cfg, state["fw_cfg"], FW_CFG_FIELDS)
    if legacy.reset_control is not None:
        legacy.reset_control.value = type(legacy.reset_control.value)(state.get("reset_control", 0))
    if legacy.pit is not None:
        s = state["pit"]
        model = legacy.pit.model
        for c, cs in zip(model._counters, s["counters"], strict=True):
            _put(c, cs, PIT_COUNTER_FIELDS)
            c.start_ns = now + cs["start_ns"]
        model._port_b = s["port_b"]
        legacy.pit._last_irq = now + s["last_irq"]
        legacy.pit._since = now + s["since"]
    for port in legacy.serial.values():
        port.fast_state = None  # re-armed from the restored registers
        port.changed()


# -- PCI ----------------------------------------------------------------------------------
def _irq_c(c) -> dict:
    return {"masked": int(c.masked), "pending": int(c.pending), "asserted": int(getattr(c, "asserted", 0))}


def save_pci(pci) -> list[dict]:
    out = []
    for _, dev in pci.devices():
        d: dict = {"location": list(dev.location), "name": dev.name, "config": bytes(dev.config.data).hex()}
        if hasattr(dev, "device") and hasattr(dev, "queues"):  # a virtio-pci function
            d["transport"] = {**_get(dev, TRANSPORT_FIELDS),
                              "queues": [_get(q, QUEUE_FIELDS) for q in dev.queues]}
            if dev.msix is not None:
                d["msix"] = {"table": bytes(dev.msix.table).hex(),
                             "pending": [i for i, v in enumerate(dev.msix.vectors) if v.pending]}
            if dev.intx is not None:
                d["intx"] = {"isr": dev.intx.isr[0], **_irq_c(dev.intx.c)}
            d["device"] = dev.device.save() if dev.active else None
        out.append(d)
    return out


def check_pci(pci, state: list[dict]) -> None:
    have = [(list(dev.location), dev.name) for _, dev in pci.devices()]
    saved = [(d["location"], d["name"]) for d in state]
    if have != saved:
        def fmt(devs):
            return ", ".join(f"{n}@{s}.{f}" for (_, s, f), n in devs) or "none"
        raise ConfigError(f"the snapshot's machine has PCI devices {fmt(saved)}; this one {fmt(have)}")
    for (_, dev), d in zip(pci.devices(), state, strict=True):
        # The same function by name but another model (an older asyncvmm's 1b36:0008 host
        # bridge, 8086:7000 LPC, before the Q35 chipset): its registers would mean other things.
        ids, saved_ids = dev.config.get(0, 4), int.from_bytes(bytes.fromhex(d["config"])[:4], "little")
        if ids != saved_ids:
            def pci_id(v: int) -> str:
                return f"{v & 0xFFFF:04x}:{v >> 16:04x}"
            (_, slot, fn) = dev.location
            raise ConfigError(f"the snapshot's PCI 00:{slot:02x}.{fn} ({dev.name}) is {pci_id(saved_ids)}, this machine's "
                              f"{pci_id(ids)} (a snapshot of another machine model, or of an older asyncvmm)")


def restore_pci(pci, state: list[dict]) -> None:
    for (_, dev), d in zip(pci.devices(), state, strict=True):
        dev.config.data[:] = bytes.fromhex(d["config"])
        dev.update_mappings()  # the BARs where the guest put them, their doorbells bound
        if "transport" not in d:
            continue
        t = d["transport"]
        if dev.msix is not None:
            dev.msix.table[:] = bytes.fromhex(d["msix"]["table"])
            dev.msix.control_written()  # routes and masks from the table and the capability
            for i in d["msix"]["pending"]:
                dev.msix.vectors[i].c.pending = 1
        if dev.msi is not None:
            dev.msi.control_written()
        _put(dev, t, TRANSPORT_FIELDS)
        active = dev.active
        dev.active = False
        for q, qs in zip(dev.queues, t["queues"], strict=True):
            _put(q, qs, QUEUE_FIELDS)
        dev._sync_intx_mask()
        if dev.intx is not None:
            s = d["intx"]
            dev.intx.isr[0] = s["isr"]
            dev.intx.c.masked, dev.intx.c.pending, dev.intx.c.asserted = s["masked"], s["pending"], s["asserted"]
        if active and d["device"] is not None:
            dev.device.restore(d["device"])
            dev._activate()  # the device carries on from its saved queues before it serves any
            if not dev.active:
                raise ConfigError(f"{dev.name} {dev._where()}: cannot be activated again on restore")
