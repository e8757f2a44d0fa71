"""seccomp filters per kind of thread (asyncvmm/seccomp.py, cext/seccomp.c).

A filter can never be removed, so every thread that installs one here runs in a child
process: kill mode is seen as the child's death by SIGSYS, log mode as the call going
through and the kernel's audit record (`type=1326 ... syscall=N`, in dmesg when this
process may read it). Then real VMs: under `asyncvmm run --seccomp=kill` every thread of
the VMM is filtered and the guest runs to its end; in-process, vCPU threads carry theirs."""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import ROOT, needs_kvm, run_vmm
from linux_guest import LinuxGuest, seccomp_modes

from asyncvmm import VM, VmConfig, seccomp
from asyncvmm.errors import ConfigError
from asyncvmm.loop import run as run_loop
from asyncvmm.machine import StopReason

SYS_OPENAT, SYS_SOCKET, SYS_EXECVE, SYS_IOCTL, SYS_CLONE = 257, 41, 59, 16, 56
SYS_PTRACE, SYS_SETUID, SYS_MOUNT, SYS_UNSHARE, SYS_BPF = 101, 105, 165, 272, 321
X32_SYSCALL_BIT = 0x40000000
CLONE_NEWNS = 0x00020000


def child(kind: str, mode: str, body: str) -> subprocess.CompletedProcess:
    """A Python child whose thread installs `kind`'s filter in `mode`, then runs `body`."""
    body_lines = "".join(f"    {line}\n" for line in textwrap.dedent(body).strip().splitlines())
    code = (
        "import ctypes, fcntl, os, socket, sys, threading\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "from asyncvmm import seccomp\n"
        "from asyncvmm._native import lib\n"
        "efd = os.eventfd(0)  # made before the filter, as a vCPU's are\n"
        "def thread():\n"
        f"    seccomp.install(seccomp.Kind.{kind}, {mode!r})\n"
        "    print('filtered', flush=True)\n"
        f"{body_lines}"
        "    print('survived', flush=True)\n"
        "t = threading.Thread(target=thread)\n"
        "t.start(); t.join()\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)


def audit_records(pid: int) -> list[int] | None:
    """Syscall numbers the kernel's audit log has for `pid`'s seccomp, or None (unreadable)."""
    r = subprocess.run(["dmesg"], capture_output=True, text=True)
    if r.returncode:
        return None
    return [int(n) for n in re.findall(rf"type=1326 .*? pid={pid} .*?syscall=(\d+)", r.stdout)]


# What each kind of thread must not do, and a call it may make (that must still work).
REFUSED = {
    "VCPU": [
        (SYS_OPENAT, 'os.open("/etc/hostname", os.O_RDONLY)'),
        (SYS_IOCTL, "fcntl.ioctl(0, lib.KVM_GET_SREGS, bytes(512))  # not KVM_RUN / KVM_GET_REGS"),
        (SYS_SOCKET, "socket.socket(socket.AF_UNIX)"),
        (SYS_CLONE, "threading.Thread(target=print).start()  # clone3: ENOSYS, then clone: refused"),
    ],
    "HELPER": [
        (SYS_SOCKET, "socket.socket(socket.AF_UNIX)"),
        (SYS_IOCTL, "fcntl.ioctl(0, lib.KVM_RUN, 0)"),
        (SYS_OPENAT, 'os.open("/tmp/asyncvmm-seccomp-test", os.O_WRONLY | os.O_CREAT)'),
        (SYS_CLONE, "threading.Thread(target=print).start()"),
    ],
    "IOTHREAD": [
        (SYS_OPENAT, 'os.open("/etc/hostname", os.O_RDONLY)'),
        (SYS_IOCTL, "fcntl.ioctl(0, lib.TUNSETOFFLOAD, 0)  # a TAP's ioctls are the loop's"),
        (SYS_SOCKET, "socket.socket(socket.AF_UNIX)"),
    ],
    "LOOP": [
        (SYS_EXECVE, 'os.execv("/bin/true", ["true"])'),
        (SYS_CLONE, "os.fork()  # clone without CLONE_THREAD: a new process"),
        (SYS_SOCKET, "socket.socket(socket.AF_PACKET, socket.SOCK_RAW)"),
        (SYS_PTRACE, "libc.ptrace(0, 0, None, None)  # PTRACE_TRACEME"),
        (SYS_SETUID, "os.setuid(os.getuid())"),
        (SYS_MOUNT, 'libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)'),
        (SYS_UNSHARE, f"libc.unshare({CLONE_NEWNS})"),
        (SYS_BPF, f"libc.syscall({SYS_BPF}, 0, None, 0)"),
    ],
}


@pytest.mark.parametrize(
    "kind, nr, call", [(k, nr, call) for k, calls in REFUSED.items() for nr, call in calls],
    ids=lambda v: v if isinstance(v, str) and v.isupper() else None,
)
def test_kill_mode_kills_the_process_on_a_refused_call(kind, nr, call):
    r = child(kind, "kill", call)
    assert r.returncode == -signal.SIGSYS, (r.returncode, r.stdout, r.stderr)
    assert "filtered" in r.stdout and "survived" not in r.stdout


def test_a_device_thread_may_wait_in_ppoll_and_move_frames():
    """virtio-net's own thread (cext/net_thread.c): ppoll on its doorbells and TAP, poll
    (avmm_net_poll), readv/writev of frames, eventfd reads and writes."""
    r = child("IOTHREAD", "kill", """
        import select
        os.eventfd_write(efd, 1)
        p = select.poll()
        p.register(efd, select.POLLIN)
        assert p.poll(0)
        os.eventfd_read(efd)
        assert libc.ppoll(None, 0, ctypes.byref((ctypes.c_long * 2)(0, 0)), None) == 0  # no fds, no wait
        os.writev(efd, [(1).to_bytes(8, "little")])
        assert os.readv(efd, [bytearray(8)]) == 8
    """)
    assert r.returncode == 0 and "survived" in r.stdout, (r.returncode, r.stdout, r.stderr)


@pytest.mark.parametrize("kind", ["VCPU", "HELPER", "LOOP"])
def test_another_abi_kills_even_in_log_mode(kind):
    # x32 numbers (and i386's through int 0x80, another AUDIT_ARCH) would reach calls the
    # lists never name: every filter ends the process on them, whatever the mode.
    r = child(kind, "log", f"libc.syscall({X32_SYSCALL_BIT | 39})  # x32 getpid")
    assert r.returncode == -signal.SIGSYS, (r.returncode, r.stdout, r.stderr)


def test_log_mode_lets_the_call_through_and_the_kernel_says_which():
    # The kernel prints audit records through printk's rate limit (10 per 5 s): after the
    # kill tests' records this one may be suppressed ("kauditd_printk_skb: N callbacks
    # suppressed"), so a call whose record does not come is made again once the limit's
    # window has passed.
    for _ in range(3):
        r = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent("""
                import os, threading
                from asyncvmm import seccomp
                def thread():
                    seccomp.install(seccomp.Kind.VCPU, "log")
                    fd = os.open("/etc/hostname", os.O_RDONLY)  # not a vCPU's call: logged, done
                    os.close(fd)
                    print("survived", flush=True)
                t = threading.Thread(target=thread); t.start(); t.join()
                """)],
            stdout=subprocess.PIPE, text=True, cwd=ROOT,
        )
        out, _ = r.communicate(timeout=60)
        assert r.returncode == 0 and "survived" in out
        records = audit_records(r.pid)
        if records is None:
            pytest.skip("the kernel log is not readable here: the call went through, its record is unseen")
        deadline = time.monotonic() + 6
        while SYS_OPENAT not in records and time.monotonic() < deadline:  # the audit record may lag
            time.sleep(0.2)
            records = audit_records(r.pid)
        if SYS_OPENAT in records:
            break
    assert SYS_OPENAT in records, records


def test_allowed_calls_still_work_under_kill():
    # A vCPU thread's ioctl on KVM_RUN reaches the kernel (EBADF on a closed fd), its
    # eventfd writes and futexes work; a helper may open a file read-only and read it.
    r = child("VCPU", "kill", """
        try:
            fcntl.ioctl(999, lib.KVM_RUN, 0)
        except OSError as e:
            assert e.errno == 9, e
        os.eventfd_write(efd, 1)
        lock = threading.Lock()
        with lock:
            pass
        """)
    assert r.returncode == 0 and "survived" in r.stdout, (r.returncode, r.stderr)
    r = child("HELPER", "kill", """
        with open("/etc/hostname", "rb") as f:
            f.read()
        """)
    assert r.returncode == 0 and "survived" in r.stdout, (r.returncode, r.stderr)


def test_bad_mode_is_one_line_and_status_2(guests):
    r = run_vmm("run", "--kernel", str(guests / "hello.elf"), "--seccomp", "sometimes")
    assert r.status == 2 and "--seccomp" in r.err and "Traceback" not in r.err
    with pytest.raises(ConfigError, match="seccomp="):
        VmConfig(kernel=str(guests / "hello.elf"), seccomp="sometimes").validate()


@needs_kvm
@pytest.mark.parametrize("mode", ["log", "kill"])
def test_the_vmm_runs_a_guest_with_every_thread_filtered(guests, mode):
    r = run_vmm("run", "-m", "64", "--kernel", str(guests / "hello.elf"), "--cmdline", "filtered", "--no-reboot",
                f"--seccomp={mode}", timeout=90)
    assert r.status == 0, (r.status, r.err[-2000:])
    assert "hello from the guest" in r.out and "cmdline: filtered" in r.out


@needs_kvm
def test_a_bzimage_whose_unpacking_is_decided_after_the_kvm_probe(guests):
    # --decompress auto asks the KVM probe (a throwaway VM) from a helper thread: the probe
    # must have run before the helpers' filter, which allows no KVM ioctl.
    r = run_vmm("run", "-m", "128", "--kernel", str(guests / "bzimage64.bin"), "--no-reboot", "--seccomp=kill",
                timeout=90)
    assert r.status == 0, (r.status, r.err[-2000:])


@needs_kvm
def test_a_guest_reset_rebuilds_the_machine_under_the_loop_filter(guests):
    # Without --no-reboot the hello guest's reset restarts it: a new KVM VM, vCPUs, memory,
    # built by the loop's thread under its filter. SIGTERM then ends it.
    p = subprocess.Popen(
        [sys.executable, "-m", "asyncvmm", "run", "-m", "64", "--kernel", str(guests / "hello.elf"),
         "--seccomp=kill", "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
    )
    try:
        out = b""
        deadline = time.monotonic() + 60
        while out.count(b"hello from the guest") < 2 and time.monotonic() < deadline:
            chunk = p.stdout.read1(4096)
            if not chunk:
                break
            out += chunk
        assert out.count(b"hello from the guest") >= 2, (p.poll(), out[-500:])
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(30)
    assert p.returncode in (0, 4), p.returncode  # 4: stopped from the host; not -SIGSYS


@needs_kvm
@pytest.mark.parametrize("flags, mode", [((), "2"), (("--seccomp=off",), "0")], ids=["default", "off"])
def test_run_filters_every_thread_by_default(guests, monkeypatch, flags, mode):
    monkeypatch.delenv("ASYNCVMM_SECCOMP", raising=False)
    with LinuxGuest(guests / "echo.elf", memory="64M", cmdline="", flags=flags, name=f"sc-{os.getpid()}") as g:
        g.wait_for(rb"echo ready", timeout=60)
        modes = g.seccomp_modes()
    assert any(t.startswith("vcpu0/") for t in modes) and len(modes) > 1, modes
    assert set(modes.values()) == {mode}, modes  # the loop's thread, helpers, vCPUs (2: filtered)


def test_the_defaults_and_a_snapshot_that_does_not_keep_the_mode(guests, monkeypatch):
    from asyncvmm.snapshot.state import config_from_dict, config_to_dict  # noqa: PLC0415

    monkeypatch.delenv("ASYNCVMM_SECCOMP", raising=False)
    assert seccomp.DEFAULT == "kill" and VmConfig(kernel=str(guests / "hello.elf")).seccomp == "kill"
    monkeypatch.setenv("ASYNCVMM_SECCOMP", "log")
    assert VmConfig(kernel=str(guests / "hello.elf")).seccomp == "log"
    # The mode is the host's choice, not the machine's: a snapshot taken with the filters
    # off is restored under the restoring process's default (or its --seccomp).
    saved = config_to_dict(VmConfig(kernel=str(guests / "hello.elf"), seccomp="off"))
    assert "seccomp" not in saved
    assert config_from_dict({**saved, "seccomp": "off"}).seccomp == "log"


@needs_kvm
def test_in_process_vcpu_threads_carry_their_filter(guests, monkeypatch):
    monkeypatch.delenv("ASYNCVMM_SECCOMP", raising=False)  # the embedding API's default: kill

    async def main():
        cfg = VmConfig(name=f"sc-{os.getpid()}", memory=64 << 20, kernel=str(guests / "echo.elf"),
                       no_reboot=True)
        async with VM(cfg) as vm:
            await vm.console.expect(rb"echo ready\n")
            modes = {t.split("/")[0]: m for t, m in seccomp_modes().items()}
            vm.console.writer.write(b"abc")
            await vm.console.expect(rb"ABC", timeout=10)
            vm.console.writer.write(b"q")
            stop = await vm.wait()
        return modes, stop

    modes, stop = run_loop(main())
    assert modes["vcpu0"] == "2"  # SECCOMP_MODE_FILTER
    assert modes[next(c for c in modes if not c.startswith("vcpu"))] == "0"  # the caller's threads are its own
    assert stop.reason is StopReason.RESET


PTRACE_SEIZE, PTRACE_INTERRUPT, PTRACE_DETACH, PTRACE_SECCOMP_GET_FILTER = 0x4206, 0x4207, 17, 0x420C
WALL = 0x40000000  # waitpid's __WALL: a thread of another process


def filter_chain(tid: int) -> list[bytes]:
    """The seccomp programs thread `tid` holds, oldest first, as the kernel gives them back
    (PTRACE_SECCOMP_GET_FILTER: the thread is stopped for a moment, then let go)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.restype = ctypes.c_long
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    if libc.ptrace(PTRACE_SEIZE, tid, None, None) < 0:
        raise OSError(ctypes.get_errno(), f"PTRACE_SEIZE {tid}")
    try:
        libc.ptrace(PTRACE_INTERRUPT, tid, None, None)
        os.waitpid(tid, WALL)
        chain = []
        while (n := libc.ptrace(PTRACE_SECCOMP_GET_FILTER, tid, len(chain), None)) > 0:
            buf = ctypes.create_string_buffer(8 * n)
            libc.ptrace(PTRACE_SECCOMP_GET_FILTER, tid, len(chain), buf)
            chain.append(buf.raw)
        return chain
    finally:
        libc.ptrace(PTRACE_DETACH, tid, None, None)


@needs_kvm
@pytest.mark.skipif(os.geteuid() != 0, reason="reading another process's filters takes CAP_SYS_ADMIN")
def test_each_thread_of_the_vmm_holds_the_filters_of_its_kind(guests, monkeypatch):
    # Every thread of a running `asyncvmm run`, its filters read back from the kernel: the
    # loop's thread the loop's program; vCPUs the loop's (inherited) then theirs; every other
    # thread — the executor's, and the console's output thread, started before the process
    # was confined (seccomp.catch_up) — the loop's then the helpers'.
    monkeypatch.delenv("ASYNCVMM_SECCOMP", raising=False)
    with LinuxGuest(guests / "echo.elf", memory="64M", cmdline="", name=f"sc-{os.getpid()}") as g:
        g.wait_for(rb"echo ready", timeout=60)  # written by the console's output thread
        chains = {t: filter_chain(int(t.split("/")[1])) for t in g.seccomp_modes()}
        pid = g.pid
    loop, vcpu, helper = (seccomp.program(k, "kill") for k in (seccomp.Kind.LOOP, seccomp.Kind.VCPU, seccomp.Kind.HELPER))
    kinds = {loop: "loop", vcpu: "vcpu", helper: "helper"}
    got = {t: [kinds.get(p, f"unknown program ({len(p) // 8} instructions)") for p in chain] for t, chain in chains.items()}
    for t, chain in got.items():
        comm, tid = t.split("/")
        want = ["loop"] if int(tid) == pid else ["loop", "vcpu"] if comm.startswith("vcpu") else ["loop", "helper"]
        assert chain == want, (t, got)
    assert any(c == ["loop", "helper"] for c in got.values()), got  # the console's output thread at least
