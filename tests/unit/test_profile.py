"""The boot profile without a guest: console marks, the report, and symbols."""

import struct

from asyncvmm.boot.symbols import Symbols, elf_symbols, find_symbols, load, parse_system_map
from asyncvmm.profile import BootProfile, ConsoleMarks

SYSTEM_MAP = """\
ffffffff81000000 T _stext
ffffffff81000000 T _text
ffffffff81001000 t do_one_initcall
ffffffff81002000 T memmap_init_range
ffffffff81003000 D some_data
ffffffff81004000 W weak_function
"""


def test_system_map_lookup():
    s = parse_system_map(SYSTEM_MAP)
    assert len(s) == 5  # the data symbol is not a function
    assert s.lookup(0xFFFFFFFF81001234) == ("do_one_initcall", 0x234)
    assert s.lookup(0xFFFFFFFF81002000)[0] == "memmap_init_range"
    assert s.lookup(0xFFFFFFFF80000000) is None


def test_debians_placeholder_system_map_is_no_symbols(tmp_path):
    path = tmp_path / "System.map-6.1.0-50-cloud-amd64"
    path.write_text("ffffffffffffffff B The real System.map is in the linux-image-<version>-dbg package\n")
    assert load(str(path)) is None
    (tmp_path / "vmlinuz-6.1.0-50-cloud-amd64").write_bytes(b"MZ")
    assert find_symbols(str(tmp_path / "vmlinuz-6.1.0-50-cloud-amd64"), b"MZ") is None


def test_system_map_found_beside_the_kernel(tmp_path):
    (tmp_path / "System.map").write_text(SYSTEM_MAP)
    s = find_symbols(str(tmp_path / "bzImage"), b"MZ")
    assert s is not None and s.source.endswith("System.map")


def elf_with_symtab(symbols):
    """An ELF64 with only section headers: null, .symtab, .strtab."""
    strtab = b"\0" + b"".join(name.encode() + b"\0" for name, _ in symbols)
    syms = [bytes(24)]
    at = 1
    for name, value in symbols:
        syms.append(struct.pack("<IBBHQQ", at, 0x12, 0, 1, value, 16))  # GLOBAL FUNC, section 1
        at += len(name) + 1
    symtab = b"".join(syms)
    shoff = 64 + len(symtab) + len(strtab)
    shdrs = bytes(64)
    shdrs += struct.pack("<IIQQQQIIQQ", 0, 2, 0, 0, 64, len(symtab), 2, 1, 8, 24)
    shdrs += struct.pack("<IIQQQQIIQQ", 0, 3, 0, 0, 64 + len(symtab), len(strtab), 0, 0, 1, 0)
    ehdr = b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0, 0, shoff, 0, 64, 56, 0, 64, 3, 0)
    return ehdr + symtab + strtab + shdrs


def test_elf_symtab():
    s = elf_symbols(elf_with_symtab([("start_kernel", 0xFFFFFFFF82000000), ("rest_init", 0xFFFFFFFF81000100)]))
    assert s.lookup(0xFFFFFFFF82000010) == ("start_kernel", 0x10)
    assert s.lookup(0xFFFFFFFF81000100) == ("rest_init", 0)
    assert elf_symbols(b"\x7fELF\x02\x01\x01" + bytes(100)) is None


def test_console_marks_across_chunks():
    c = ConsoleMarks()
    c.feed(b"[    0.000000] Linux version 6.1\n[    1.500000] one\n[  ", now=100.0)
    c.feed(b" 2.000000] Run /init as init pro", now=102.4)
    c.feed(b"cess\n[    3.000000] Kernel panic - not syncing: Attempted to kill init!\n", now=103.5)
    assert c.first_output == 100.0
    assert c.clock_zero == 98.5  # the line with the least lag
    assert c.init == 103.5 and c.init_line.endswith("Run /init as init process")
    assert c.panic == "Attempted to kill init!"
    assert c.lines == 4


def stats():
    return {
        "vcpus": [{
            "exits": {"IO": 1000, "HLT": 5}, "ns_exits": {"IO": 2_000_000_000, "INTR": 1_000_000},
            "fast_io": 900, "ns_fast_io": 1_000_000, "kicks": 40, "ns_in_run": 50_000_000_000, "ns_waiting": 10,
        }],
        "ports": {"com1": 800, "pit": 100},
        "quirks": {"int3-as-#BP": 1},
        "pit": {"irqs": 30, "deferred": 20},
    }


def test_report():
    p = BootProfile(sample_period_ns=5_000_000, show_rips=True, created=10.0, images=10.1, built=10.2, started=10.25, stopped=80.0)
    p.console.feed(b"[    1.000000] hello\n", now=11.5)
    p.console.feed(b"[   50.000000] Run /init as init process\n", now=60.75)
    p.stop_message = "guest reset"
    p.stats = stats()
    p.symbols = Symbols([0xFFFFFFFF81000000, 0xFFFFFFFF81001000], ["alpha", "beta"], "System.map")
    p.samples = [[0x1000000] * 10 + [0xFFFFFFFF81000010] * 60 + [0xFFFFFFFF81001000] * 30]
    phases = {name: round(seconds, 3) for name, seconds, _ in p.phases()}
    assert phases == {"VMM set-up": 0.25, "entry to kernel": 0.25, "kernel to init": 50.25, "after init": 19.25}
    text = p.report()
    assert "IO                     1000      2.000 s (of which 900 served in C" in text
    assert "accesses by device: com1 800, pit 100" in text
    assert "VMM PIT: 30 IRQ0s raised, 20 deferred" in text
    assert "RIP samples: 100 (every 5 ms, all vCPUs), named from System.map" in text
    assert " 60.0%        60  alpha" in text and " 30.0%        30  beta" in text
    assert "for its first 10 samples: about 0.05 s" in text


def test_report_when_init_is_not_reached():
    p = BootProfile(sample_period_ns=0, created=1.0, images=1.1, built=1.2, started=1.3, stopped=9.0, stop_message="KVM error")
    names = [name for name, _, _ in p.phases()]
    assert names == ["VMM set-up", "kernel (init not reached)"]
    assert "total" in p.report()


def test_entry_to_kernel_from_the_first_high_rip_sample():
    p = BootProfile(created=1.0, images=1.1, built=1.2, started=2.0, stopped=30.0, stop_message="guest reset")
    p.stats = {"vcpus": [{"first_high_rip_ns": 22_500_000_000}]}  # the decompressor ran 20.5 s
    p.console.feed(b"[    0.100000] Linux version 6.1\n", now=25.0)
    p.console.feed(b"[    3.000000] Run /init as init process\n", now=27.0)
    phases = {name: (round(seconds, 3), what) for name, seconds, what in p.phases()}
    assert phases["entry to kernel"][0] == 20.5 and "first RIP sample" in phases["entry to kernel"][1]
    assert phases["kernel to init"][0] == 4.5


def test_kvms_own_counters():
    p = BootProfile(sample_period_ns=0, created=1.0, images=1.1, built=1.2, started=1.3, stopped=60.0, stop_message="reset")
    p.stats = stats()  # 50 s in KVM_RUN
    p.kvm_vcpus = [{
        "exits": 9000, "io_exits": 1000, "halt_exits": 200, "signal_exits": 40, "mmio_exits": 0,
        "insn_emulation": 60_000_000, "insn_emulation_fail": 1, "irq_injections": 2500,
        "halt_wait_ns": 9_000_000_000, "halt_poll_success_ns": 500_000_000, "halt_poll_fail_ns": 500_000_000,
        "halt_wakeup": 190, "pf_taken": 300, "pf_fixed": 290, "pf_guest": 10,
    }]
    text = p.report()
    assert "  exits 9000: port I/O 1000, halt 200, signal 40\n" in text  # MMIO 0 is left out
    # 50 s in KVM_RUN, 10 s of it halted: 40 s for 60 M instructions
    assert "instructions emulated 60000000 (1 failed): 667 ns each over the 40.0 s in KVM_RUN not halted" in text
    assert "injected: interrupts 2500 (50/s in KVM_RUN)" in text
    assert "halted 10.000 s (9.000 s asleep, 1.000 s polling); wake-ups 190" in text
    assert "page faults 300: fixed 290, the guest's 10" in text


def test_no_kvm_counters_no_section():
    p = BootProfile(sample_period_ns=0, created=1.0, images=1.1, built=1.2, started=1.3, stopped=60.0)
    p.stats = stats()
    assert "KVM's own counters" not in p.report()
