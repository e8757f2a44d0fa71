"""Snapshots of a running machine, restore, and live migration (docs/SNAPSHOT.md).

    file.py        the snapshot file: header, parts, checksums; sparse RAM
    kvm_state.py   KVM's side: vCPU registers, irqchip, PIT, clock
    devices.py     the device models' registers
    state.py       the machine's whole state; the configuration; the disks' stamps
    take.py        pausing, draining and holding a VM, writing its snapshot
"""
