"""The emulating-KVM quirks that need no guest (the others are in the guest tests)."""

from asyncvmm.quirks import XSAVEERPTR, Quirks


def entries():
    return [{"function": 0x8000_0008, "index": 0, "flags": 0, "eax": 0x3030, "ebx": 0x1, "ecx": 0, "edx": 0}]


def test_xsaveerptr_is_set_only_with_quirks():
    leaf, reg, bit = XSAVEERPTR
    assert Quirks(True).adjust_cpuid(entries())[0][reg] == 0x1 | (1 << bit)
    assert Quirks(False).adjust_cpuid(entries())[0][reg] == 0x1


# -- kvm-pv-hypercalls ----------------------------------------------------------------------
from asyncvmm._native import lib  # noqa: E402

from asyncvmm.quirks import append_parameters, clearcpuid_value, linux_parameters  # noqa: E402


def kvm_features(eax):
    return [{"function": lib.KVM_CPUID_FEATURES, "index": 0, "flags": 0, "eax": eax, "ebx": 0, "ecx": 0, "edx": 0}]


def test_hypercall_features_are_hidden_and_the_rest_kept():
    # What this KVM offers: clocksource(2), async PF, steal time, PV EOI, PV unhalt,
    # PV TLB flush, send IPI, poll control, sched yield, ...
    offered = 0x1007EFB
    eax = Quirks(True).adjust_cpuid(kvm_features(offered))[0]["eax"]
    for bit in (lib.KVM_FEATURE_PV_UNHALT, lib.KVM_FEATURE_PV_SEND_IPI, lib.KVM_FEATURE_PV_SCHED_YIELD,
                lib.KVM_FEATURE_HC_MAP_GPA_RANGE, lib.KVM_FEATURE_MIGRATION_CONTROL):
        assert not eax & (1 << bit)
    assert eax == offered & ~(1 << 7 | 1 << 11 | 1 << 13)  # kvm-clock, PV EOI, steal time... stay
    assert Quirks(False).adjust_cpuid(kvm_features(offered))[0]["eax"] == offered


# -- linux-cmdline --------------------------------------------------------------------------


def test_the_clearcpuid_list_is_the_measured_one():
    # KVM-HERE.md: what a stock 6.1 kernel needed here, in Linux's feature numbering.
    assert clearcpuid_value() == (
        "59,129,137,141,145,147,148,151,153,154,156,157,200,288,293,295,298,304,306,308,311,312,317,514,520,521,522,534"
    )
    assert len(clearcpuid_value()) <= 127
    assert linux_parameters()[1:] == ["noxsave", "mitigations=off", "nopti", "cryptomgr.notests",
                                      "lapic=notscdeadline", "noapictimer"]


def test_parameters_are_appended_after_what_the_user_typed():
    cmdline, added = append_parameters("console=ttyS0 panic=-1", ["a=1", "b"])
    assert cmdline == "console=ttyS0 panic=-1 a=1 b" and added == ["a=1", "b"]


def test_a_parameter_the_user_gave_is_kept():
    cmdline, added = append_parameters("mitigations=auto console=ttyS0", ["mitigations=off", "nopti"])
    assert cmdline == "mitigations=auto console=ttyS0 nopti" and added == ["nopti"]


def test_parameters_go_before_the_init_arguments():
    assert append_parameters("console=ttyS0 -- single x=1", ["nopti"]) == ("console=ttyS0 nopti -- single x=1", ["nopti"])
    assert append_parameters("-- single", ["nopti"]) == ("nopti -- single", ["nopti"])
    assert append_parameters("", ["nopti"]) == ("nopti", ["nopti"])
    assert append_parameters("nopti", ["nopti"]) == ("nopti", [])


def test_linux_cmdline_only_with_quirks():
    q = Quirks(True)
    cmdline, added = q.linux_cmdline("console=ttyS0")
    assert added == linux_parameters() and cmdline.startswith("console=ttyS0 clearcpuid=")
    assert q.applied["linux-cmdline"] == len(added)
    assert Quirks(False).linux_cmdline("console=ttyS0") == ("console=ttyS0", [])


def test_a_tick_the_user_chose_is_left_whole():
    # lapic=notscdeadline and noapictimer are one choice: noapictimer alone would leave
    # Linux with no timer interrupt at all, so either one typed means neither is added.
    rest = linux_parameters()[:-2]
    for typed in ("lapic=notscdeadline", "noapictimer", "lapic", "console=ttyS0 noapictimer"):
        cmdline, added = Quirks(True).linux_cmdline(typed)
        assert added == rest and cmdline == " ".join([typed, *rest]), typed
    # After ` -- ` the words are init's: the kernel's tick is still the quirk's.
    cmdline, added = Quirks(True).linux_cmdline("console=ttyS0 -- noapictimer")
    assert added == linux_parameters() and cmdline.endswith("lapic=notscdeadline noapictimer -- noapictimer")


# -- vmm-pit ----------------------------------------------------------------------------------
import asyncio  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

from asyncvmm.devices.legacy.i8254 import PIT_HZ, Port  # noqa: E402
from asyncvmm.quirks import BoundedRatePit  # noqa: E402


class FakeVm:
    def __init__(self):
        self.irqfds = []

    def irqfd(self, efd, gsi):
        self.irqfds.append((efd, gsi))


def edges(pit):
    try:
        return os.eventfd_read(pit.efd)
    except BlockingIOError:
        return 0


def run_for(pit, seconds):
    async def main():
        pit.attach(asyncio.get_running_loop())
        await asyncio.sleep(seconds)
        pit.detach()
    asyncio.run(main())


def test_bounded_pit_raises_irq0_at_most_every_20_ms():
    vm = FakeVm()
    pit = BoundedRatePit(vm, 0)
    try:
        assert vm.irqfds == [(pit.efd, 0)]
        m = pit.model
        m.write(Port.CONTROL, 0x34)  # channel 0, mode 2, 1000 Hz
        m.write(Port.CHANNEL0, (PIT_HZ // 1000) & 0xFF)
        m.write(Port.CHANNEL0, (PIT_HZ // 1000) >> 8)
        t0 = time.monotonic()
        run_for(pit, 0.3)
        elapsed = time.monotonic() - t0
        n = edges(pit)
        assert n == pit.irqs
        assert 5 <= n <= elapsed / 0.020 + 1  # bounded, and still ticking
        assert pit.deferred >= n - 1
    finally:
        pit.close()
    assert pit.efd == -1


def test_bounded_pit_one_shot_fires_once():
    pit = BoundedRatePit(FakeVm(), 0)
    try:
        m = pit.model
        m.write(Port.CONTROL, 0x38)  # mode 4, Linux's oneshot clockevent
        m.write(Port.CHANNEL0, (PIT_HZ // 1000) & 0xFF)  # 1 ms
        m.write(Port.CHANNEL0, (PIT_HZ // 1000) >> 8)
        run_for(pit, 0.1)
        assert edges(pit) == 1
    finally:
        pit.close()


def test_bounded_pit_is_quiet_when_stopped():
    pit = BoundedRatePit(FakeVm(), 0)
    try:
        pit.model.write(Port.CONTROL, 0x30)  # mode 0, no count: Linux's shutdown
        run_for(pit, 0.05)
        assert edges(pit) == 0
    finally:
        pit.close()


class SlowClock:
    """A clock that moves 50 us each time it is read: a busy loop between a guest write
    and the callback that looks at it."""

    def __init__(self):
        self.ns = 10**12

    def __call__(self):
        self.ns += 50_000
        return self.ns


def test_a_count_that_runs_out_before_the_callback_looks_still_raises_irq0():
    # Linux's min_delta: mode 4 with 15 clocks (12.6 us), shorter than the callback's delay.
    pit = BoundedRatePit(FakeVm(), 0, clock=SlowClock())
    try:
        async def main():
            pit.attach(asyncio.get_running_loop())
            pit.model.write(Port.CONTROL, 0x38)
            pit.model.write(Port.CHANNEL0, 15)
            pit.model.write(Port.CHANNEL0, 0)
            assert pit._timer is not None  # the edge is owed, not lost
            await asyncio.sleep(0.05)
            pit.detach()
        asyncio.run(main())
        assert edges(pit) == 1
    finally:
        pit.close()


def test_the_hidden_pv_features_are_named():
    q = Quirks(True)
    q.adjust_cpuid(kvm_features(0x1007EFB))
    assert q.hidden_pv_features == ["kvm_pv_unhalt", "kvm_pv_send_ipi", "kvm_pv_sched_yield"]
