"""The exit hand-off between a vCPU thread and the loop (cext/vcpu_loop.c): every posted
exit is in the latency histogram, and spinning is left out where it cannot help."""

from __future__ import annotations

import contextlib
import os

from asyncvmm._native import ffi, lib
from conftest import needs_kvm

from asyncvmm.config import VmConfig
from asyncvmm.console import FileConsole
from asyncvmm.loop import run as run_loop
from asyncvmm.machine import BootImages, Machine, StopReason

pytestmark = needs_kvm

N = 20000


def exitbench(guests, port: int, pins: dict[int, int] | None = None) -> tuple[dict, list[int], list[int]]:
    cfg = VmConfig(memory=64 << 20, kernel=str(guests / "exitbench.elf"), cmdline=f"n={N} port={port:#x}",
                   no_reboot=True, pins=pins or {}).validate()
    console = FileConsole("/dev/null")
    m = Machine(cfg, console, BootImages.load(cfg))
    try:
        m.build()
        stop = run_loop(m.run())
        assert stop.reason is StopReason.RESET, stop.message
        stats = m.vcpu_stats(0)
        hist = ffi.new("uint64_t[]", lib.AVMM_HIST_BUCKETS)
        assert lib.avmm_vcpu_exit_hist(m.vcpus.cvm, 0, hist, lib.AVMM_HIST_BUCKETS) == lib.AVMM_HIST_BUCKETS
        spin = ffi.new("uint64_t[4]")
        lib.avmm_vm_spin_stats(m.vcpus.cvm, spin)
        return stats, list(hist), list(spin)
    finally:
        m.close()
        console.close()


def test_histogram_buckets_are_log_linear():
    lo = [lib.avmm_hist_bucket_ns(i) for i in range(lib.AVMM_HIST_BUCKETS + 1)]
    assert lo[:9] == list(range(9)) and lo[16] == 16 and lo[24] == 32
    assert all(b > a for a, b in zip(lo, lo[1:]))
    assert all((b - a) / a <= 0.125 for a, b in zip(lo[8:], lo[9:]))  # 12.5% at most
    assert lo[-1] > 8e9  # the last bucket starts beyond 8 s


def test_every_posted_exit_is_in_the_histogram(guests):
    stats, hist, spin = exitbench(guests, 0x80)
    assert stats["posted"] >= N
    assert sum(hist) == stats["posted"]
    vcpu_spins, vcpu_hits, loop_polls, loop_hits = spin
    assert vcpu_hits <= vcpu_spins and loop_hits <= loop_polls


def test_no_spinning_when_the_vcpu_and_the_loop_share_a_cpu(guests):
    """Both threads on one CPU: a spin would only keep the other from running, so neither
    spins, and the guest still finishes (every exit answered through wake-ups)."""
    cpu = sorted(os.sched_getaffinity(0))[-1]
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})  # the loop's thread (this one)
    try:
        stats, hist, spin = exitbench(guests, 0x80, pins={0: cpu})
    finally:
        os.sched_setaffinity(0, old)
    assert stats["posted"] >= N and sum(hist) == stats["posted"]
    assert spin[0] <= 1 and spin[2] <= 1, spin  # at most the very first (the loop's CPU not yet known)


def test_kvm_probe_in_a_thread_gives_the_same_answer_and_leaves_nothing_behind():
    """probe.start() (the CLI calls it before the heavy imports): the answer is the
    synchronous probe's, and the probe's thread and fds are gone once it is taken."""
    from conftest import open_fds

    from asyncvmm.vstate import probe

    saved = probe._result, probe._thread
    try:
        probe._result, probe._thread = None, None
        sync = probe.probe()
        fds = open_fds()
        probe._result, probe._thread = None, None
        probe.start()
        assert probe._thread is not None
        got = probe.probe()
        assert got == sync
        assert not probe._thread.is_alive()
        assert open_fds() == fds
        probe.start()  # answered already: no second thread
        assert probe.probe() is got
    finally:
        probe._result, probe._thread = saved


@contextlib.contextmanager
def _spare_vm_from_a_fresh_probe(memory: int):
    """probe.start(spare_vm=True) (the CLI's) in this process, as if it had just begun:
    yields the spare (kvm, vm, mem); afterwards the probe's state is put back and nothing
    the test opened may be left open."""
    from conftest import open_fds

    from asyncvmm.vstate import probe

    saved = probe._result, probe._thread, probe._spare
    try:
        fds = open_fds()
        probe._result, probe._thread, probe._spare = None, None, None
        probe.start(spare_vm=True, memory=memory)
        probe._thread.join()
        yield probe._spare
        assert open_fds() == fds
    finally:
        probe._result, probe._thread, probe._spare = saved


def _run_hello(m: Machine) -> None:
    stop = run_loop(m.run())
    assert stop.reason is StopReason.RESET, stop.message


def test_the_probe_threads_spare_vm_is_taken_once_and_used_by_the_machine(guests):
    """The probe thread also makes the VM with its irqchip and RAM; the next Vm adopts it
    (no second VM fd), a later take gets nothing, and the machine built on it runs the
    guest; nothing is left open afterwards."""
    from asyncvmm.vstate import probe

    with _spare_vm_from_a_fresh_probe(64 << 20) as (kvm, vmfd, mem):
        assert kvm.fd >= 0 and vmfd.fd >= 0 and mem.size == 64 << 20
        m, console = _hello(guests)
        try:
            m.build()
            assert m.vm.fd is vmfd and m.vm.kvm is kvm and m.vm.mem is mem  # adopted, not made again
            assert probe.take_spare_vm() is None
            _run_hello(m)
        finally:
            m.close()
            console.close()
        assert vmfd.fd == -1 and kvm.fd == -1


def test_a_spare_vm_whose_ram_does_not_fit_is_put_away_whole(guests):
    """The spare VM's RAM is mapped in its slots already; a machine that wants other RAM
    (here another size) closes that VM and makes its own, leaving nothing open."""
    with _spare_vm_from_a_fresh_probe(32 << 20) as (kvm, vmfd, mem):
        m, console = _hello(guests)
        try:
            m.build()
            assert m.vm.fd is not vmfd and m.vm.mem is not mem and m.vm.mem.size == 64 << 20
            assert vmfd.fd == -1 and kvm.fd == -1 and mem.regions == []
            _run_hello(m)
        finally:
            m.close()
            console.close()


def _hello(guests) -> tuple[Machine, FileConsole]:
    cfg = VmConfig(memory=64 << 20, kernel=str(guests / "hello.elf"), no_reboot=True).validate()
    console = FileConsole("/dev/null")
    return Machine(cfg, console, BootImages.load(cfg)), console
