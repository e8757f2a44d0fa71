"""The ACPI tables: lengths and checksums, and what the real decoders read in them.

The tables are disassembled with ACPICA's iasl (`iasl -d`, Debian's acpica-tools, which
tools/setup installs) and loaded into ACPICA's own core with acpiexec, the code Linux
runs; what they read is compared with what asyncvmm.platform and the device models say
the machine is. (iasl 20200925 cannot read an RSDP from a file: the RSDP is checked
field by field here and followed by the `acpi` test guest, as a kernel does.)
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from asyncvmm import platform as p
from asyncvmm.boot import acpi
from asyncvmm.boot.cpuid import Topology
from asyncvmm.devices.legacy import acpi_pm
from asyncvmm.vstate.memory import MiB

SDTS = ("XSDT", "FACP", "DSDT", "APIC", "MCFG")
needs_iasl = pytest.mark.skipif(not shutil.which("iasl"), reason="iasl missing (tools/setup installs acpica-tools)")
needs_acpiexec = pytest.mark.skipif(not shutil.which("acpiexec"), reason="acpiexec missing (acpica-tools)")


def build(cpus: int = 2, ram: int = 256 * MiB, topology: Topology | None = None) -> acpi.Tables:
    topo = topology or Topology.of(cpus)
    return acpi.build(topo.apic_ids(), ram)


@pytest.mark.parametrize("cpus", [1, 2, 16, 200])
def test_every_table_has_its_length_and_checksum(cpus):
    t = build(cpus)
    for sig in SDTS:
        data = t.table(sig)
        (length,) = struct.unpack_from("<I", data, 4)
        assert length == len(data) and data[:4] == sig.encode()
        assert sum(data) % 256 == 0, sig
    rsdp = t.table("RSD PTR ")
    assert sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    assert t.table("FACS")[:4] == b"FACS" and len(t.table("FACS")) == 64
    assert len(t.table("FACP")) == 276  # the ACPI 6 FADT


def test_layout_fits_the_reserved_bios_area_without_overlaps():
    t = build(200)
    assert t.rsdp == p.ACPI_TABLES_START and t.rsdp % 16 == 0
    assert t.addresses["FACS"] % 64 == 0
    spans = sorted((t.addresses[s], t.addresses[s] + len(t.table(s))) for s in (*SDTS, "FACS", "RSD PTR "))
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:]))
    assert spans[-1][1] <= p.ACPI_TABLES_END
    assert t.base + len(t.image) == spans[-1][1]


def test_rsdp_points_at_the_xsdt():
    t = build()
    sig, _, oem, rev, rsdt, length, xsdt, _ = acpi.RSDP.unpack(t.table("RSD PTR "))
    assert (sig, oem, rev, rsdt, length, xsdt) == (b"RSD PTR ", b"ASYNCV", 2, 0, 36, t.addresses["XSDT"])


def test_tables_go_into_guest_ram(mem):
    t = build()
    t.write(mem)
    assert mem.read(p.ACPI_TABLES_START, len(t.image)) == t.image


def test_a_machine_too_big_for_xapic_ids_is_refused():
    with pytest.raises(ValueError, match="APIC ID 255"):
        acpi.build([0, 255], 256 * MiB)


# -- iasl --------------------------------------------------------------------------------
def disassemble(t: acpi.Tables, tmp: Path) -> dict[str, str]:
    """`iasl -d` of every table: signature -> the .dsl text."""
    out = {}
    for sig in (*SDTS, "FACS"):
        dat = tmp / f"{sig.lower()}.dat"
        dat.write_bytes(t.table(sig))
        r = subprocess.run(["iasl", "-d", str(dat)], capture_output=True, text=True, cwd=tmp, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        out[sig] = dat.with_suffix(".dsl").read_text()
    return out


def fields(dsl: str) -> list[tuple[str, str]]:
    """A data table's decoded fields, in order: '[02Eh 0046   2]   SCI Interrupt : 0009'
    and the decoded flag lines under them ('   Hardware Reduced (V5) : 0')."""
    got = []
    for line in dsl.splitlines():
        m = re.match(r"^(?:\[[0-9A-F]+h [0-9]+ +[0-9]+\])?\s+([^:\[]+?) : (.*)$", line)
        if m and not line.lstrip().startswith("*"):
            got.append((m.group(1).strip(), m.group(2).strip()))
    return got


def field(dsl: str, name: str) -> str:
    """The value of field `name`; a field the table has twice (the FADT's 32-bit and
    64-bit DSDT addresses) must say the same both times."""
    values = [v for k, v in fields(dsl) if k == name]
    assert values, f"iasl shows no field {name!r}"
    assert len(values) == 1 or len({hexval(v) for v in values}) == 1, (name, values)
    return values[0]


def hexval(text: str) -> int:
    return int(text.split()[0].strip('"'), 16)


@pytest.fixture(scope="module")
def dsl(tmp_path_factory):
    return disassemble(build(cpus=6, topology=Topology(2, 3, 1)), tmp_path_factory.mktemp("iasl"))


@needs_iasl
def test_iasl_reads_the_headers(dsl):
    for sig in ("XSDT", "FACP", "APIC", "MCFG"):  # the DSDT is AML: iasl writes it as ASL
        assert field(dsl[sig], "Signature").startswith(f'"{sig}"')
        assert field(dsl[sig], "Oem ID") == '"ASYNCV"'
        assert field(dsl[sig], "Oem Table ID") == '"ASYNCVMM"'
    assert hexval(field(dsl["FACP"], "Revision")) == 6 and hexval(field(dsl["FACP"], "FADT Minor Revision")) == 5
    assert "DefinitionBlock (\"\", \"DSDT\", 2, \"ASYNCV\", \"ASYNCVMM\", 0x00000001)" in dsl["DSDT"]


@needs_iasl
def test_iasl_reads_the_xsdt(tmp_path):
    t = build()
    xsdt = disassemble(t, tmp_path)["XSDT"]
    entries = [hexval(v) for k, v in fields(xsdt) if k.startswith("ACPI Table Address")]
    assert entries == [t.addresses["FACP"], t.addresses["APIC"], t.addresses["MCFG"]]


@needs_iasl
def test_iasl_reads_the_fadt(dsl):
    f = dsl["FACP"]
    t = build(cpus=6, topology=Topology(2, 3, 1))
    expect = {
        "DSDT Address": t.addresses["DSDT"],
        "SCI Interrupt": p.ACPI_SCI_IRQ, "SMI Command Port": 0,
        "PM1A Event Block Address": p.ACPI_PM1_EVT_PORT, "PM1B Event Block Address": 0,
        "PM1A Control Block Address": p.ACPI_PM1_CNT_PORT, "PM1B Control Block Address": 0,
        "PM Timer Block Address": p.ACPI_PM_TMR_PORT, "GPE0 Block Address": 0,
        "PM1 Event Block Length": p.ACPI_PM1_EVT_LEN, "PM1 Control Block Length": p.ACPI_PM1_CNT_LEN,
        "PM Timer Block Length": p.ACPI_PM_TMR_LEN, "C2 Latency": 101, "C3 Latency": 1001,
        "RTC Century Index": 0x32, "Value to cause reset": acpi_pm.RESET_VALUE,
    }
    for name, value in expect.items():
        assert hexval(field(f, name)) == value, name
    # FIRMWARE_CTRL, and X_FIRMWARE_CTRL 0 as ACPI requires when the 32-bit one is set.
    assert [hexval(v) for k, v in fields(f) if k == "FACS Address"] == [t.addresses["FACS"], 0]
    flags = {
        "Control Method Power Button (V1)": 0,  # the power button is the fixed PM1 one
        "Control Method Sleep Button (V1)": 1, "Reset Register Supported (V2)": 1, "Hardware Reduced (V5)": 0,
        "32-bit PM Timer (V1)": 1, "WBINVD instruction is operational (V1)": 1, "All CPUs support C1 (V1)": 1,
        "Legacy Devices Supported (V2)": 1, "8042 Present on ports 60/64 (V2)": 0, "VGA Not Present (V4)": 1,
        "MSI Not Supported (V4)": 0, "CMOS RTC Not Present (V5)": 0,
    }
    for name, value in flags.items():
        assert int(field(f, name)) == value, name
    # The generic address structures, in table order: reset register, then the X_ blocks.
    gas = []
    for k, v in fields(f):
        if k == "Space ID":
            gas.append({"space": v.split()[1]})
        elif gas and k in ("Bit Width", "Address", "Encoded Access Width"):
            gas[-1][k] = hexval(v)
    reset, x_pm1a_evt, x_pm1b_evt, x_pm1a_cnt, x_pm1b_cnt, x_pm2_cnt, x_pm_tmr = gas[:7]
    # the reset register is the chipset's 0xCF9 (as QEMU's q35)
    assert reset == {"space": "[SystemIO]", "Bit Width": 8, "Encoded Access Width": 1, "Address": p.RESET_CONTROL_PORT}
    assert x_pm_tmr == {"space": "[SystemIO]", "Bit Width": 32, "Encoded Access Width": 3, "Address": p.ACPI_PM_TMR_PORT}
    assert x_pm1a_evt == {"space": "[SystemIO]", "Bit Width": 32, "Encoded Access Width": 2,
                          "Address": p.ACPI_PM1_EVT_PORT}
    assert x_pm1a_cnt == {"space": "[SystemIO]", "Bit Width": 16, "Encoded Access Width": 2,
                          "Address": p.ACPI_PM1_CNT_PORT}
    assert x_pm1b_evt["Address"] == 0 and all(g["Address"] == 0 for g in gas[4:6] + gas[7:])


def madt_subtables(dsl_text: str) -> list[dict[str, str]]:
    subs: list[dict[str, str]] = []
    for k, v in fields(dsl_text):
        if k == "Subtable Type":
            subs.append({"type": v.split("[", 1)[1].rstrip("]")})
        elif subs:
            subs[-1][k] = v
    return subs


@needs_iasl
def test_iasl_reads_the_madt(dsl):
    m = dsl["APIC"]
    assert hexval(field(m, "Local Apic Address")) == p.LAPIC_START
    assert int(field(m, "PC-AT Compatibility")) == 1
    subs = madt_subtables(m)
    lapics = [s for s in subs if s["type"] == "Processor Local APIC"]
    assert [(hexval(s["Processor ID"]), hexval(s["Local Apic ID"]), s["Processor Enabled"]) for s in lapics] == [
        (i, apic, "1") for i, apic in enumerate([0, 1, 2, 4, 5, 6])
    ]
    (ioapic,) = [s for s in subs if s["type"] == "I/O APIC"]
    assert hexval(ioapic["Address"]) == p.IOAPIC_START and hexval(ioapic["Interrupt"]) == 0
    overrides = {hexval(s["Source"]): (hexval(s["Interrupt"]), s["Polarity"], s["Trigger Mode"])
                 for s in subs if s["type"] == "Interrupt Source Override"}
    # IRQ0 on GSI 0 (KVM's PIT with its default routing), the SCI level and active high.
    assert overrides == {p.PIT_IRQ: (0, "0", "0"), p.ACPI_SCI_IRQ: (p.ACPI_SCI_IRQ, "1", "3")}
    (nmi,) = [s for s in subs if s["type"] == "Local APIC NMI"]
    assert hexval(nmi["Processor ID"]) == 0xFF and hexval(nmi["Interrupt Input LINT"]) == 1


@needs_iasl
def test_iasl_reads_the_mcfg_and_facs(dsl):
    m = dsl["MCFG"]
    assert hexval(field(m, "Base Address")) == p.PCI_ECAM_START
    assert hexval(field(m, "Segment Group Number")) == 0
    assert (hexval(field(m, "Start Bus Number")), hexval(field(m, "End Bus Number"))) == (0, 255)
    f = dsl["FACS"]
    assert hexval(field(f, "Length")) == 64 and hexval(field(f, "Version")) == 2


# -- the DSDT, as iasl reads it --------------------------------------------------------------
def block(text: str, opener: str) -> str:
    """The text of the `{...}` that follows `opener` (balanced braces)."""
    start = text.index(opener)
    i = text.index("{", start)
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    raise AssertionError(f"unbalanced block after {opener!r}")


def resources(template: str) -> list[tuple[str, str, dict]]:
    """(macro, its keyword arguments, {comment label: value}) for each descriptor."""
    out: list[tuple[str, str, dict]] = []
    for line in template.splitlines():
        m = re.match(r"^\s*(\w+) \((.*)$", line)
        if m and m.group(1)[0].isupper():
            out.append((m.group(1), m.group(2).rstrip(",) "), {}))
            continue
        m = re.match(r"^\s*(0x[0-9A-Fa-f]+),?\s*// (.+)$", line)
        if m and out:
            out[-1][2][m.group(2).strip()] = int(m.group(1), 16)
        m = re.match(r"^\s*\{([0-9,]+)\}$", line)
        if m and out:
            out[-1][2]["irqs"] = [int(x) for x in m.group(1).split(",")]
    return out


ASL_INT = {"Zero": 0, "One": 1}


def asl_int(token: str) -> int:
    token = token.strip()
    return ASL_INT[token] if token in ASL_INT else int(token, 16)


@needs_iasl
def test_iasl_reads_the_pci_root(dsl):
    d = dsl["DSDT"]
    pci0 = block(d, "Device (PCI0)")
    assert 'Name (_HID, EisaId ("PNP0A08")' in pci0 and 'Name (_CID, EisaId ("PNP0A03")' in pci0
    for name in ("_UID", "_SEG", "_BBN"):
        assert f"Name ({name}, Zero)" in pci0
    mmio64 = p.pci_mmio64_window(256 * MiB)
    crs = resources(block(pci0, "Name (_CRS, ResourceTemplate ()"))
    assert [(macro, v["Range Minimum"], v["Range Maximum"], v["Length"]) for macro, _, v in crs] == [
        ("WordBusNumber", 0, 255, 256),
        ("WordIO", 0, 0xCF7, 0xCF8),
        ("WordIO", p.PCI_IO_START, p.PCI_IO_END - 1, p.PCI_IO_END - p.PCI_IO_START),
        ("DWordMemory", p.PCI_MMIO32_START, p.PCI_MMIO32_START + p.PCI_MMIO32_SIZE - 1, p.PCI_MMIO32_SIZE),
        ("QWordMemory", mmio64[0], mmio64[0] + mmio64[1] - 1, mmio64[1]),
    ]
    for macro, args, v in crs:  # windows the bridge decodes for its children, untranslated
        assert args.startswith("ResourceProducer") and "MinFixed" in args and "MaxFixed" in args, (macro, args)
        assert "PosDecode" in args and v["Translation Offset"] == 0 and v["Granularity"] == 0
    prt = re.findall(r"Package \(0x04\)\s*\{([^}]*)\}", block(pci0, "Name (_PRT, Package (0x80)"))
    entries = [tuple(asl_int(x) for x in e.split(",")) for e in prt]
    assert entries == [(slot << 16 | 0xFFFF, pin, 0, p.pci_intx_gsi(slot, pin)) for slot in range(32) for pin in range(4)]


@needs_iasl
def test_iasl_reads_com1_the_reservations_the_cpus_and_s5(dsl):
    d = dsl["DSDT"]
    com1 = block(d, "Device (COM1)")
    assert 'Name (_HID, EisaId ("PNP0501")' in com1 and "Name (_UID, One)" in com1
    (io, irq) = resources(block(com1, "Name (_CRS, ResourceTemplate ()"))
    assert io == ("IO", "Decode16", {"Range Minimum": p.COM1_PORT, "Range Maximum": p.COM1_PORT, "Alignment": 1,
                                     "Length": 8})
    assert irq[0] == "IRQNoFlags" and irq[2]["irqs"] == [p.COM1_IRQ]
    mres = block(d, "Device (MRES)")
    assert 'Name (_HID, EisaId ("PNP0C02")' in mres
    (ecam, ports) = resources(block(mres, "Name (_CRS, ResourceTemplate ()"))
    assert ecam == ("Memory32Fixed", "ReadWrite", {"Address Base": p.PCI_ECAM_START, "Address Length": p.PCI_ECAM_SIZE})
    assert ports[2] == {"Range Minimum": p.ACPI_PM_PORT, "Range Maximum": p.ACPI_PM_PORT, "Alignment": 1,
                        "Length": p.ACPI_PM_SIZE}
    cpus = re.findall(r'Device \((C[0-9A-F]{3})\)\s*\{\s*Name \(_HID, "ACPI0007"[^\n]*\n\s*Name \(_UID, (\w+)\)', d)
    assert [(n, asl_int(u)) for n, u in cpus] == [(f"C{i:03X}", i) for i in range(6)]  # MADT processor UIDs
    s5 = block(d, "Name (\\_S5, Package (0x04)")
    assert [asl_int(x) for x in s5.split(",")] == [acpi_pm.SleepType.S5, acpi_pm.SleepType.S5, 0, 0]
    assert sorted(re.findall(r"Device \((\w+)\)", d)) == sorted(["PCI0", "COM1", "MRES", *(f"C{i:03X}" for i in range(6))])


@needs_iasl
def test_the_disassembled_dsdt_compiles_without_a_warning(tmp_path):
    t = build(4)
    (tmp_path / "dsdt.dat").write_bytes(t.table("DSDT"))
    subprocess.run(["iasl", "-d", "dsdt.dat"], check=True, capture_output=True, cwd=tmp_path, timeout=60)
    r = subprocess.run(["iasl", "-p", "again", "dsdt.dsl"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 Errors, 0 Warnings, 0 Remarks" in r.stdout, r.stdout


# -- acpiexec: the tables in ACPICA's core, as Linux loads them -----------------------------
@needs_acpiexec
def test_acpica_loads_the_tables_without_a_firmware_warning(tmp_path):
    t = build(2)
    files = []
    for sig in ("FACP", "DSDT", "APIC", "MCFG"):
        (tmp_path / f"{sig}.dat").write_bytes(t.table(sig))
        files.append(f"{sig}.dat")
    cmds = "evaluate \\_S5_; evaluate \\_SB.PCI0._PRT; evaluate \\_SB.PCI0._HID; evaluate \\_SB.C001._UID"
    r = subprocess.run(["acpiexec", "-b", cmds, *files], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    # ACPICA reports table problems as "Firmware Warning/Error (ACPI)" or "ACPI Error/Warning".
    # (acpiexec's own hardware self-tests report the GPEs, PM timer and PM2 block this
    # machine does not have as "Unexpected AE_..." lines: not table problems.)
    assert not re.search(r"Firmware (Warning|Error)|ACPI (Warning|Error|BIOS)", out), out
    assert "Table [DSDT: ASYNCVMM]" in out
    s5 = out.split("Evaluating \\_S5_", 1)[1].split("Evaluating", 1)[0]
    assert re.findall(r"\[Integer\] = ([0-9A-F]+)", s5) == ["0000000000000005", "0000000000000005", "0" * 16, "0" * 16]
    prt = out.split("Evaluating \\_SB.PCI0._PRT", 1)[1].split("Evaluating", 1)[0]
    assert "[Package] Contains 128 Elements" in prt
    hid = out.split("Evaluating \\_SB.PCI0._HID", 1)[1].split("Evaluating", 1)[0]
    assert "[Integer] = 00000000080AD041" in hid  # EISA ID PNP0A08 as ACPICA decodes it
    uid = out.split("Evaluating \\_SB.C001._UID", 1)[1]
    assert "[Integer] = 0000000000000001" in uid
