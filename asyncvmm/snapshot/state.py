"""A machine's whole state as plain data, and a machine built from it.

    state = save_machine(machine)       # the VM paused, its devices drained and held
    restore_machine(machine, state)     # a machine just built from state["config"]

A restore builds the machine the normal way, from the configuration the snapshot keeps
(the devices, their host backends — disks re-opened by path, TAPs, consoles — are made as
for a boot), with guest RAM mapped from the snapshot, and then puts the state back before
any vCPU runs: the device models first (they may move interrupt lines while their
registers come back), then KVM's irqchip, PIT and clock, then each vCPU.
"""

from __future__ import annotations

import dataclasses
import os

from ..config import PciSlot, VmConfig
from ..errors import ConfigError
from . import devices, kvm_state

FORMAT_NOTE = "asyncvmm snapshot state"

# VmConfig fields a snapshot does not keep: how this process watches or confines the VM, not
# the machine (a restore takes its own --seccomp, or the default, never the saver's).
NOT_KEPT = {"gdb", "profile_boot", "profile_rip_ms", "symbols", "seccomp"}


# -- the configuration ---------------------------------------------------------------------
def config_to_dict(cfg: VmConfig) -> dict:
    out = {}
    for f in dataclasses.fields(cfg):
        if f.name in NOT_KEPT:
            continue
        v = getattr(cfg, f.name)
        if f.name == "slots":
            v = [dataclasses.asdict(s) for s in v]
        elif f.name == "topology":
            v = dataclasses.asdict(v) if v is not None else None
        elif f.name == "pins":
            v = {str(k): c for k, c in v.items()}
        out[f.name] = v
    return out


def config_from_dict(d: dict) -> VmConfig:
    from ..boot.cpuid import Topology  # noqa: PLC0415

    known = {f.name for f in dataclasses.fields(VmConfig)}
    kw = {k: v for k, v in d.items() if k in known and k not in NOT_KEPT}
    kw["slots"] = [PciSlot(**s) for s in d.get("slots", [])]
    kw["topology"] = Topology(**d["topology"]) if d.get("topology") else None
    kw["pins"] = {int(k): c for k, c in d.get("pins", {}).items()}
    return VmConfig(**kw)


def slot_names(slots) -> str:
    return " ".join(f"-s {s.slot}:{s.function},{s.driver}" + (f",{s.options}" if s.options else "") for s in slots) or "none"


def check_slots(saved: VmConfig, asked: list[PciSlot]) -> None:
    """`asked` (the command line's -s) must be the snapshot's machine's devices."""
    if [dataclasses.astuple(s) for s in asked] != [dataclasses.astuple(s) for s in saved.slots]:
        raise ConfigError(f"the snapshot's machine has {slot_names(saved.slots)}; the command line asks for "
                          f"{slot_names(asked)} (leave -s out to take the snapshot's)")


# -- the host's files the machine uses -----------------------------------------------------
def disk_stamps(cfg: VmConfig) -> dict[str, dict]:
    """Each disk image's identity: its size and its modification time (ns). A disk written
    after the snapshot, or another file at its path, would not hold what the guest's
    memory says it holds."""
    from ..devices.slots import slot_name  # noqa: PLC0415
    from ..devices.virtio.block.image import BlockOptions  # noqa: PLC0415

    out = {}
    for s in cfg.slots:
        if s.driver != "virtio-blk":
            continue
        path = BlockOptions.parse(s.options, slot_name(s)).path
        st = os.stat(path)
        out[f"{s.slot}:{s.function}"] = {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return out


def check_disks(stamps: dict[str, dict]) -> None:
    for where, d in stamps.items():
        try:
            st = os.stat(d["path"])
        except OSError as e:
            raise ConfigError(f"disk {d['path']} (slot {where}): {e.strerror}") from None
        if st.st_size != d["size"]:
            raise ConfigError(f"disk {d['path']} (slot {where}): its size changed since the snapshot "
                              f"({d['size']} bytes then, {st.st_size} now)")
        if st.st_mtime_ns != d["mtime_ns"]:
            raise ConfigError(f"disk {d['path']} (slot {where}): it was modified after the snapshot "
                              "(its modification time differs): the guest's memory no longer matches it")


# -- the machine ----------------------------------------------------------------------------
def prepare(machine) -> list[int]:
    """Which of KVM's listed MSRs this machine's vCPUs give (found once, one ioctl per MSR:
    a fraction of a millisecond for KVM's few dozen). The vCPUs must be out of KVM_RUN: a
    vCPU ioctl waits for KVM_RUN to return, which a halted guest never does."""
    msrs = getattr(machine, "_snapshot_msrs", None)
    if msrs is None:
        msrs = machine._snapshot_msrs = kvm_state.savable_msrs(machine.vcpus.fds[0].fd, machine.vm.kvm.msr_index_list())
    return msrs


def save_machine(machine) -> dict:
    """Everything but RAM (the VM paused, its devices drained: snapshot/take.py)."""
    vm, vcpus = machine.vm, machine.vcpus
    msrs = prepare(machine)
    return {
        "format": FORMAT_NOTE,
        "config": config_to_dict(machine.config),
        "disks": disk_stamps(machine.config),
        "kvm": {"emulating": vm.emulating, "vmm_pit": machine.legacy.pit is not None},
        "vm": kvm_state.save_vm(vm.fd.fd, kernel_pit=machine.legacy.pit is None),
        "vcpus": [kvm_state.save_vcpu(v, msrs) for v in vcpus.fds],
        "legacy": devices.save_legacy(machine.legacy),
        "pci": devices.save_pci(machine.pci),
        **({"pflash": machine.firmware.flash.state()} if _flash(machine) is not None else {}),
    }


def _flash(machine):
    """The OVMF variables flash (its file is the guest's, like a disk: not in the snapshot)."""
    return machine.firmware.flash if machine.firmware is not None else None


def restore_machine(machine, snap) -> None:
    """Snapshot `snap` onto `machine`, built from its config with RAM mapped from the
    full snapshot at the root of its chain: a diff's pages (and its bases') are copied
    over that first. From here on the machine logs dirty pages, so that a diff snapshot
    can be taken over `snap`."""
    from .dirty import DirtyLog  # noqa: PLC0415

    for diff in snap.diffs():
        diff.apply_diff(machine.vm.mem)
    # The log starts before the devices do: restoring a queue serves the requests the
    # snapshot caught waiting in it, and a read that completes at once writes guest RAM then.
    machine.dirty_log = DirtyLog(machine)
    machine.dirty_log.start()
    apply_state(machine, snap.state)
    machine.last_snapshot = (os.path.abspath(snap.path), snap.state_crc)


def apply_state(machine, state: dict) -> None:
    """save_machine's data onto a machine built from its config (RAM already in place)."""
    if len(state["vcpus"]) != len(machine.vcpus.fds):
        raise ConfigError(f"the snapshot has {len(state['vcpus'])} vCPUs, this machine {len(machine.vcpus.fds)}")
    devices.check_legacy(machine.legacy, state["legacy"])
    devices.check_pci(machine.pci, state["pci"])
    devices.restore_legacy(machine.legacy, state["legacy"])
    devices.restore_pci(machine.pci, state["pci"])
    if "pflash" in state and _flash(machine) is not None:
        _flash(machine).set_state(state["pflash"])
    kvm_state.restore_vm(machine.vm.fd.fd, state["vm"])
    for v, s in zip(machine.vcpus.fds, state["vcpus"], strict=True):
        kvm_state.restore_vcpu(v, s)
