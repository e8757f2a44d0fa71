"""seccomp-bpf filters per kind of thread, as Firecracker installs them (cext/seccomp.c).

    vCPU threads   KVM_RUN and KVM_GET_REGS (ioctl by request), futexes, eventfd writes,
                   signals, clocks, exit. Installed by each vCPU thread (C) once its own
                   set-up is done, just before its first KVM_RUN.
    helper threads reading and unpacking images, console output: files read-only, memory,
                   tty ioctls only, no sockets, no threads. Installed by each helper thread
                   as it starts (a threading profile hook runs in the new thread first).
    device threads virtio-blk's own thread (cext/blk_thread.c): io_uring_enter, eventfd
                   reads and writes, futexes; no ioctl, no files, no sockets. Installed by
                   the thread itself (C) as it starts.
    the loop       the Python interpreter and everything the loop serves — and, because a
                   guest reset builds a new machine on the loop, /dev/kvm, KVM_CREATE_VM,
                   TAPs and images too: its ioctl and openat are not filtered by argument.
                   What it refuses is what a VMM never does: exec, fork (clone without
                   CLONE_THREAD), ptrace, mount, module loading, bpf, kexec, privilege and
                   namespace changes, sockets other than AF_UNIX, AF_INET and AF_INET6. Installed on
                   every thread of the process at once (TSYNC) by `asyncvmm run` before the
                   VM starts, so every thread made after inherits it (vCPUs and helpers add
                   theirs on top: filters stack, and the strictest answer wins).

Modes: `kill` (the default) — the process is killed (SIGSYS), as Firecracker does; `log` —
a call not on its list is allowed and written to the kernel's audit log (dmesg: `audit:
type=1326 ... syscall=N`), to find what a list misses; `off`. `$ASYNCVMM_SECCOMP` changes
the default.

The embedding API (asyncvmm.VM, VmConfig.seccomp) applies the vCPU filter only: the loop's
thread and the executor's threads belong to the program that embeds the VM, and a filter
can never be removed. Its default is `kill` too: a vCPU thread is the VMM's own C thread,
it runs nothing of the embedding program's, its calls are the closed list below, and it is
the thread that decodes what the guest hands over first — a call off that list means the
VMM has been subverted, and ending the process is the only answer that cannot be bypassed.
"""

from __future__ import annotations

import os
import sys
import threading
from enum import StrEnum

from .errors import VmmError


class SeccompMode(StrEnum):
    OFF = "off"
    LOG = "log"
    KILL = "kill"


DEFAULT = SeccompMode.KILL  # the fast and slow tiers run under it (README: Hardening)


def default_mode() -> str:
    """The mode when none is given: $ASYNCVMM_SECCOMP, else DEFAULT."""
    return os.environ.get("ASYNCVMM_SECCOMP", DEFAULT.value)


class Kind:
    VCPU = 1
    LOOP = 2
    HELPER = 3
    IOTHREAD = 4  # a device's own thread (virtio-blk's, cext/blk_thread.c): installed in C


def action(mode: str) -> int:
    """The C core's enum avmm_seccomp_action for a mode."""
    from ._native import lib  # noqa: PLC0415

    return {
        SeccompMode.OFF: lib.AVMM_SECCOMP_OFF,
        SeccompMode.LOG: lib.AVMM_SECCOMP_LOG,
        SeccompMode.KILL: lib.AVMM_SECCOMP_KILL,
    }[SeccompMode(mode)]


def install(kind: int, mode: str, *, all_threads: bool = False) -> None:
    """Install `kind`'s filter on the calling thread (every thread with all_threads)."""
    if SeccompMode(mode) is SeccompMode.OFF:
        return
    from ._native import lib  # noqa: PLC0415

    r = lib.avmm_seccomp_install(kind, action(mode), int(all_threads))
    if r < 0:
        raise VmmError(f"seccomp: cannot install the filter: errno {-r}")
    if r > 0:
        raise VmmError(f"seccomp: thread {r} has filters of its own: cannot install one for all threads")


_helper_mode: str | None = None  # once helper threads are filtered: their mode
_filtered = threading.local()  # .helper: this thread has the helper filter


def _install_helper() -> None:
    assert _helper_mode is not None
    install(Kind.HELPER, _helper_mode)
    _filtered.helper = True


def filter_helper_threads(mode: str) -> None:
    """From now on, every thread the threading module starts installs the helper filter
    before it runs anything else."""
    global _helper_mode
    if SeccompMode(mode) is SeccompMode.OFF:
        return
    _helper_mode = mode

    def first_call(frame, event, arg):  # runs in the new thread, before its target
        sys.setprofile(None)
        _install_helper()

    threading.setprofile(first_call)


def catch_up() -> None:
    """A helper thread started before the process was confined (the console's output
    thread: the console is opened before the machine is built) calls this before each
    piece of work, and takes the helper filter at the first one after confinement — before
    it writes anything of the guest's. Until then it has the loop's filter (TSYNC)."""
    if _helper_mode is not None and not getattr(_filtered, "helper", False):
        _install_helper()


def program(kind: int, mode: str) -> bytes:
    """`kind`'s BPF program as the kernel holds it once installed (struct sock_filter[])."""
    from ._native import ffi, lib  # noqa: PLC0415

    n = lib.avmm_seccomp_program(kind, action(mode), ffi.NULL, 0)
    if n < 0:
        raise VmmError(f"seccomp: no program for kind {kind}, mode {mode}: errno {-n}")
    buf = ffi.new("char[]", 8 * n)
    lib.avmm_seccomp_program(kind, action(mode), buf, n)
    return ffi.buffer(buf)[:]


def confine_process(mode: str) -> None:
    """`asyncvmm run`: the loop's filter on every thread, then helpers' as they start."""
    if SeccompMode(mode) is SeccompMode.OFF:
        return
    # Set-up first: the KVM probe (a throwaway VM, cached) would otherwise first run in a
    # helper thread (boot/setup.py decides there whether to unpack a bzImage).
    from .vstate import probe  # noqa: PLC0415

    try:
        probe.probe()
    except VmmError:
        pass  # no usable KVM: the VM's start says so
    install(Kind.LOOP, mode, all_threads=True)
    filter_helper_threads(mode)
