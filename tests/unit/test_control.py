"""ctl's parts without a VM: the register checks, the parsers of both spellings, the
command table against the server's handlers, and the text the answers become."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from asyncvmm.control import bhyvectl, commands, ctl, report
from asyncvmm.control.handlers import HANDLERS
from asyncvmm.control.regs_text import format_regs, format_set, segment_access
from asyncvmm.errors import ConfigError
from asyncvmm.vstate import registers
from asyncvmm.vstate.registers import Cr0, Cr4, Efer


def seg(**kw):
    base = dict(base=0, limit=0xFFFFFFFF, selector=8, type=11, present=1, dpl=0, db=1, s=1, l=0, g=1, avl=0,
                unusable=0)
    return SimpleNamespace(**{**base, **kw})


def cpu(long_mode=False):
    """A vCPU's structs as KVM gives them: 32-bit protected mode, or 64-bit long mode."""
    regs = SimpleNamespace(**{n: 0 for n in registers.GPRS}, rip=0x100000, rflags=0x2)
    sregs = SimpleNamespace(cr0=int(Cr0.PE | Cr0.ET), cr2=0, cr3=0, cr4=0, cr8=0, efer=0, apic_base=0xFEE00900,
                            cs=seg(), ds=seg(type=3), es=seg(type=3), fs=seg(type=3), gs=seg(type=3),
                            ss=seg(type=3), tr=seg(type=11, s=0), ldt=seg(type=2, s=0),
                            gdt=SimpleNamespace(base=0x1000, limit=0x27), idt=SimpleNamespace(base=0, limit=0))
    if long_mode:
        sregs.cr0 |= Cr0.PG
        sregs.cr4 |= Cr4.PAE
        sregs.efer = int(Efer.LME | Efer.LMA)
        sregs.cs.l, sregs.cs.db = 1, 0
    dbg = SimpleNamespace(db=[0, 0, 0, 0], dr6=0xFFFF0FF0, dr7=0x400)
    return regs, sregs, dbg


def write(changes, long_mode=False):
    regs, sregs, dbg = cpu(long_mode)
    registers.apply(regs, sregs, dbg, registers.normalize(changes))
    return regs, sregs, dbg


def test_writes_land_in_the_right_struct():
    regs, sregs, dbg = write({"rip": 0x100abc, "r15": 7, "cr3": 0x5000, "dr7": 0x401, "dr0": 0x1234,
                              "ldtr": 0x10, "gdtr": {"base": 0x2000, "limit": 0x3f},
                              "ds": {"base": 0x10, "limit": 0xfff, "access": 0x93}})
    assert (regs.rip, regs.r15, sregs.cr3, dbg.dr7, dbg.db[0]) == (0x100ABC, 7, 0x5000, 0x401, 0x1234)
    assert sregs.ldt.selector == 0x10 and (sregs.gdt.base, sregs.gdt.limit) == (0x2000, 0x3F)
    assert (sregs.ds.base, sregs.ds.limit, sregs.ds.type, sregs.ds.s, sregs.ds.present, sregs.ds.db) == (
        0x10, 0xFFF, 3, 1, 1, 0)
    assert segment_access(vars(sregs.ds)) == 0x93


@pytest.mark.parametrize("changes, needle", [
    ({"rip": 1 << 32}, "beyond 32 bits"),
    ({"cr0": 1 << 40}, "reserved bits"),
    ({"cr0": int(Cr0.PG)}, "needs protected mode"),
    ({"cr0": int(Cr0.PE | Cr0.NW)}, "NW without CD"),
    ({"cr4": 1 << 15}, "cr4=0x8000: reserved"),
    ({"efer": 1 << 1}, "efer=0x2: reserved"),
    ({"efer": int(Efer.LMA)}, "LMA without long mode"),
    ({"rflags": 0}, "bit 1 is always 1"),
    ({"rflags": 0x2 | 1 << 3}, "reserved bits 0x8"),
    ({"cr8": 16}, "0 to 15"),
    ({"cs": {"access": 0x100}}, "reserved bits"),
    ({"dr6": 1 << 40}, "bits 63..32"),
    ({"rax": 1 << 64}, "out of range"),
    ({"rax": -1}, "out of range"),
    ({"cs": {"limit": 1 << 32}}, "out of range"),
    ({"gdt": 5}, "give its base and limit"),
    ({"cs": {"color": 1}}, "no such field"),
    ({"xmm0": 1}, "no such register"),
    ({}, "no register to set"),
])
def test_a_state_no_cpu_can_be_in_is_refused(changes, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        write(changes)


def test_long_mode_checks_canonical_rip():
    regs, _, _ = write({"rip": 0xFFFF_FFFF_8100_0000}, long_mode=True)
    assert regs.rip == 0xFFFF_FFFF_8100_0000
    with pytest.raises(ConfigError, match="not a canonical address"):
        write({"rip": 0x0000_8000_0000_0000}, long_mode=True)
    with pytest.raises(ConfigError, match="needs CR4.PAE"):
        write({"cr4": 0}, long_mode=True)
    with pytest.raises(ConfigError, match="64-bit code"):
        write({"cs": {"access": 0x209B}})  # L in 32-bit protected mode
    with pytest.raises(ConfigError, match="dr1=.*canonical"):
        write({"dr1": 1 << 50}, long_mode=True)


def test_assignments_parse_both_forms():
    assert registers.assignments(["rip=0x1000", "RAX=10", "cs.base=0", "cs.limit=0xffff", "ldtr=0x18"]) == {
        "rip": 0x1000, "rax": 10, "cs": {"base": 0, "limit": 0xFFFF}, "ldt": 0x18}
    for words, needle in ((["rip"], "REG=VALUE"), (["rip=x"], "not a number"), (["rip=1", "rip=2"], "twice"),
                          (["cs=8", "cs.base=0"], "both")):
        with pytest.raises(ConfigError, match=needle):
            registers.assignments(words)
    assert registers.msr_index("pat") == 0x277 and registers.msr_index("lstar") == 0xC0000082
    assert registers.msr_index("0x10") == 0x10


def test_bhyvectl_translation():
    req = bhyvectl.parse(["--vm=v", "--cpu=1", "--set-rip=0x1000", "--set-rbx=5", "--set-cs=0x10",
                          "--set-desc-ds", "--desc-base=0x100", "--desc-limit=0xffff", "--desc-access=0x93",
                          "--get-rip", "--inject-nmi", "--json"])
    assert req.vm == "v" and req.cpu == 1 and req.json
    assert req.sets == {"rip": 0x1000, "rbx": 5, "cs": {"selector": 0x10},
                        "ds": {"base": 0x100, "limit": 0xFFFF, "access": 0x93}}
    assert req.gets == {"rip"} and "inject-nmi" in req.flags
    req = bhyvectl.parse(["--vm", "v", "--set-desc-gdtr", "--desc-base=0x2000", "--desc-limit=0x27",
                          "--desc-access=0x93", "--set-rtc-time=5", "--rtc-nvram-offset=20", "--set-rtc-nvram=1"])
    assert req.sets == {"gdt": {"base": 0x2000, "limit": 0x27}}
    assert (req.rtc_time, req.rtc_offset, req.rtc_nvram) == (5, 20, 1)
    for argv, needle in ((["--get-rip"], "--vm=NAME"), (["--vm=v", "--get-vmcs-link"], "has no meaning on KVM"),
                         (["--vm=v", "--set-desc-cs"], "needs --desc-base"),
                         (["--vm=v", "--set-rip=-1"], "0 or more"), (["--vm=v", "--set-rip"], "needs a value"),
                         (["--vm=v", "--get-rip=1"], "takes no value"),
                         (["--vm=v", "--checkpoint=x", "--suspend=y"], "once")):
        with pytest.raises(ConfigError, match=needle):
            bhyvectl.parse(argv)


def test_every_command_has_a_handler_and_every_handler_a_command():
    sent = {c.name for c in commands.COMMANDS if c.run is None} | {"destroy", "poweroff", "state"}
    assert sent - {"list"} <= set(HANDLERS)
    assert set(HANDLERS) <= {c.name for c in commands.COMMANDS}


def test_help_is_generated_and_lists_each_command_once():
    text = ctl.help_text()
    listed = [line.split()[0] for line in text.split("\ncommands:\n")[1].split("\n\n")[0].splitlines()
              if line.startswith("  ") and not line.startswith("   ")]
    assert listed == [c.name for c in commands.COMMANDS] + ["--json"]
    usage = text.split("\n\n")[0]
    for c in commands.COMMANDS:
        assert f"asyncvmm ctl {c.name} " in usage


def test_regs_text_says_how_the_vm_is():
    answer = {"vcpu": 0, "state": "running", "rip": 0x100000, "rflags": 0x202, "rax": 1, "cr0": 0x11,
              "cs": {"selector": 8, "base": 0, "limit": 0xFFFFFFFF, "type": 11, "present": 1, "dpl": 0, "db": 1,
                     "s": 1, "l": 0, "g": 1, "avl": 0, "unusable": 0}}
    text = format_regs(answer)
    assert text.startswith("vCPU 0 (the VM runs; paused for the read)\n")
    assert "rip 0x0000000000100000  rflags 0x0000000000000202 [IF]" in text
    assert "cs   0x0008    0x0000000000000000  0xffffffff  code rx, dpl 0, present, 32-bit, 4K granular" in text
    assert format_regs({**answer, "state": "paused"}).startswith("vCPU 0 (the VM is paused)\n")
    assert format_set({**answer, "state": "paused"}, ["rax", "cs"]) == (
        "vCPU 0: set rax 0x0000000000000001, cs selector 0x0008 base 0x0000000000000000 limit 0xffffffff "
        "access 0xc09b (it stays paused)")


def test_stats_report_has_units_groups_and_no_json():
    stats = {
        "vcpus": [{"exits": {"IO": 10, "HLT": 2}, "fast_io": 8, "posted": 2, "kicks": 1, "ns_in_run": 5_000_000,
                   "ns_waiting": 1_000_000, "ns_exits": {"IO": 2_000_000}, "ns_fast_io": 100_000, "samples": 3,
                   "samples_dropped": 0, "first_high_rip_ns": 123, "first_high_rip_after_s": 1.5}],
        "ports": {"com1": 10}, "unclaimed_ports": {}, "mmio": {}, "unclaimed_mmio": {},
        "console": {"tx_bytes": 100}, "quirks": {"on": ["vmm-pit", "fwait"], "applied": {"fwait": 3}},
        "pci": {"virtio-blk@3.0": {"location": "00:03.0", "status": "15", "features": "0x1", "transport": {},
                                   "disk": "/d.img", "requests": {"reads": 1, "bytes_read": 512},
                                   "poll_window_ns": 20000, "queues": [{"chains": 1, "errors": {}}]}},
        "loop": {"wakeups": 1, "batches": 1, "exits": 2, "mean_batch": 2.0, "poll_window_ns": 50000},
        "uptime_s": 2.5,
    }
    text = report.format_stats(stats)
    assert "{" not in text and "first high rip" not in text
    lines = text.splitlines()
    assert lines[:5] == ["vCPU 0", "  exits: 12", "    kind       count  time serving, ms",
                         "    IO            10                 2", "    HLT            2                 0"]
    assert any(line.startswith("  time in the guest (KVM_RUN), ms:") and line.endswith(" 5") for line in lines)
    assert any("first RIP sample in the kernel's upper half, s after start:" in line for line in lines)
    assert "00:03.0 virtio-blk" in lines
    assert any(line.startswith("  status:") and line.endswith("15 (ACKNOWLEDGE DRIVER FEATURES_OK DRIVER_OK)")
               for line in lines)
    assert "  queue 0: chains 1" in lines
    assert any(line.startswith("  poll window, µs:") and line.endswith("20") for line in lines)
    assert "quirks on: vmm-pit, fwait" in lines and "quirks applied (times): fwait 3" in lines
    assert "uptime, s: 2.5" in lines
    assert "ports nobody claims (accesses): none" in lines


def test_events_and_intinfo_text():
    quiet = {"vcpu": 0, "exception": {"injected": 0, "pending": 0, "vector": 0, "has_error_code": 0,
                                      "error_code": 0},
             "interrupt": {"injected": 0, "vector": 0, "soft": 0, "shadow": 0},
             "nmi": {"injected": 0, "pending": 0, "masked": 0}}
    assert bhyvectl.intinfo_lines(quiet) == ["pending:\tn/a", "current:\tn/a"]
    assert report.format_events(quiet).splitlines() == ["vCPU 0", "  exception: none", "  interrupt: none",
                                                        "  NMI: none; not masked"]
    pf = {**quiet, "exception": {"injected": 1, "pending": 0, "vector": 14, "has_error_code": 1, "error_code": 2},
          "nmi": {"injected": 0, "pending": 1, "masked": 1}}
    assert bhyvectl.intinfo_lines(pf) == ["pending:\tnmi vector 2", "current:\texception vector 14 errcode 0x2"]
    assert "  exception: vector 14 (#PF) being delivered, error code 0x2" in report.format_events(pf)
    irq = {**quiet, "interrupt": {"injected": 1, "vector": 32, "soft": 0, "shadow": 0}}
    assert bhyvectl.intinfo_lines(irq)[1] == "current:\textint vector 32"


def test_rtc_and_state_text():
    assert bhyvectl.rtc_time_line(1_000_000_000) == "rtc time 0x3b9aca00: Sun Sep 09 01:46:40 2001"
    assert report.format_rtc({"time": 1_000_000_000, "offset": 20, "value": 0x5A}) == (
        "RTC: 2001-09-09 01:46:40 UTC (1000000000 s since 1970)\nRTC NVRAM[20]: 0x5a")
    assert commands.parse_time("2001-09-09 01:46:40") == 1_000_000_000
    assert commands.parse_time("1000000000") == 1_000_000_000
    text = report.format_state({"name": "a", "state": "running", "memory": 64 << 20,
                                "devices": [{"slot": "0:3:0", "driver": "virtio-net", "options": "tap0"}]})
    assert text.splitlines() == ["name:    a", "state:   running", "memory:  64 MiB", "devices: 1",
                                 "  0:3:0    virtio-net   tap0"]
    assert json.loads(json.dumps({"s": report.format_topology({"sockets": 1, "cores": 2, "threads": 1,
                                                               "maxcpus": 2})}))["s"].endswith("2 vCPU(s)")
