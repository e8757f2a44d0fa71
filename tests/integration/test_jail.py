"""`asyncvmm run --jail DIR --uid UID --gid GID`: the VMM seen from outside while it runs a
guest — its root holds only what the VM uses, its credentials are UID/GID with no
capability and no new privileges, seccomp on top — and nothing left behind afterwards.

The jail's user is a throwaway one NOT in group kvm: the jail's own /dev/kvm node is what
lets it run the VM.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import ROOT, needs_kvm, run_vmm
from users import as_user, needs_root_tools, throwaway_user

from asyncvmm.control.client import ControlClient
from asyncvmm.errors import VmmError

pytestmark = [needs_kvm, needs_root_tools]


@pytest.fixture(scope="module")
def jailer():
    with throwaway_user("j", groups=()) as u:
        yield u


@pytest.fixture
def work():
    path = Path(tempfile.mkdtemp(prefix="avmm-jail-"))
    os.chmod(path, 0o755)
    (path / "jail").mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def status_fields(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def files_under(root: Path) -> set[str]:
    """Every path that is not a directory below `root`, as the jailed process sees it."""
    found = set()
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            found.add("/" + str(Path(dirpath, n).relative_to(root)))
    return found


def not_mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return all(line.split()[4] != str(path) for line in f)


def test_a_jailed_vmm_has_only_the_vms_files_and_no_privileges(guests, jailer, work, private_run_dir):
    disk = work / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
    os.chown(disk, jailer.uid, jailer.gid)
    secret = work / "secret.txt"  # beside the disk, but not the VM's
    secret.write_text("not for the guest's VMM\n")
    kernel = guests / "counter.elf"
    name = f"jailed{os.getpid()}"
    out = open(work / "out", "w+b")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncvmm", "run", "-m", "64", "--kernel", str(kernel), "--cmdline", "delay=2000",
         "-s", f"3,virtio-blk,{disk}", "--seccomp=kill",
         "--jail", str(work / "jail"), "--uid", str(jailer.uid), "--gid", str(jailer.gid), name],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
    )
    socket_path = private_run_dir / f"{name}.sock"

    def output() -> str:
        out.seek(0)
        return out.read().decode(errors="replace")

    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, output()
            try:
                state = ControlClient(name).request("state")  # root may, from outside
                break
            except VmmError:
                assert time.monotonic() < deadline, output()
                time.sleep(0.1)
        assert state["state"] == "running"
        pid = state["pid"]
        assert pid == proc.pid  # the VMM itself is jailed (the janitor is another process)

        st = status_fields(pid)
        assert st["Uid"].split() == [str(jailer.uid)] * 4
        assert st["Gid"].split() == [str(jailer.gid)] * 4
        assert st["Groups"].strip() == ""
        for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(st[caps], 16) == 0, (caps, st[caps])
        assert st["NoNewPrivs"] == "1"
        assert st["Seccomp"] == "2"  # filtered after the jail was entered

        root = Path(f"/proc/{pid}/root")
        seen = files_under(root)
        python_dirs = [os.path.realpath(d) for d in (sys.base_prefix, sys.prefix, str(ROOT / "asyncvmm"))]
        outside_python = {p for p in seen if not any(p.startswith(d + "/") for d in python_dirs)}
        assert outside_python == {"/dev/kvm", str(kernel), str(disk)}, outside_python
        assert os.stat(root / "dev/kvm").st_uid == jailer.uid  # its own node, for its user alone
        assert not (root / str(secret).lstrip("/")).exists()
        assert not (root / "etc/passwd").exists() and not (root / "proc/self").exists()
        assert not (root / str(private_run_dir).lstrip("/")).exists()  # the socket was bound outside
        # the project's tests and tools are not there: of the project only asyncvmm/, the
        # venv's packages and the kernel (build/guests/counter.elf, checked above)
        assert sorted(os.listdir(root / str(ROOT).lstrip("/"))) == [".venv", "asyncvmm", "build"]
        assert "tick " in output()
        threads = [Path(f"/proc/{pid}/task/{t}/comm").read_text().strip() for t in os.listdir(f"/proc/{pid}/task")]
        assert "vcpu0" in threads, threads  # named without /proc

        # A reset builds a new machine inside the jail: /dev/kvm and the disk again.
        r = run_vmm("ctl", "reset", name, env={**os.environ, "ASYNCVMM_RUN_DIR": str(private_run_dir)})
        assert r.status == 0, r.err
        deadline = time.monotonic() + 30
        while "(boot 2)" not in output() or output().rpartition("(boot 2)")[2].count("tick ") < 2:
            assert proc.poll() is None and time.monotonic() < deadline, output()
            time.sleep(0.1)

        r = run_vmm("ctl", "destroy", "--force", name, env={**os.environ, "ASYNCVMM_RUN_DIR": str(private_run_dir)})
        assert r.status == 0, r.err
        assert proc.wait(30) != 0  # stopped from the host
        deadline = time.monotonic() + 10
        while socket_path.exists():  # the janitor removes it once the VMM is gone
            assert time.monotonic() < deadline, "the control socket was left behind"
            time.sleep(0.05)
        assert os.listdir(work / "jail") == []  # the jail was a tmpfs in the VMM's namespace
        assert not_mounted(work / "jail")
        assert disk.stat().st_size == 1 << 20
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(15)
        out.close()


def test_a_jailed_vmm_runs_a_guest_to_its_end(guests, jailer, work):
    r = run_vmm("run", "-m", "64", "--no-reboot", "--kernel", str(guests / "hello.elf"), "--cmdline", "jailed",
                "--jail", str(work / "jail"), "--uid", str(jailer.uid), "--gid", str(jailer.gid), timeout=60)
    assert r.status == 0, r.err
    assert "hello from the guest" in r.out and "cmdline: jailed" in r.out


def test_a_jailed_vmm_starts_a_firmware_image(guests, jailer, work):
    """-l bootrom and -l debugcon: the jail holds the firmware file and the debug file's directory."""
    debug = work / "out" / "debug.log"
    debug.parent.mkdir()
    os.chown(debug.parent, jailer.uid, jailer.gid)
    r = run_vmm("run", "-m", "64", "--no-reboot", "-s", "31,lpc", "-l", f"bootrom,{guests / 'bootrom.bin'}", "-l", f"debugcon,{debug}",
                "--jail", str(work / "jail"), "--uid", str(jailer.uid), "--gid", str(jailer.gid), timeout=60)
    assert r.status == 0, r.err
    assert "bootrom: ROM write ignored" in r.out
    assert debug.exists()


def test_a_jailed_vmm_keeps_the_firmware_variables(guests, jailer, work):
    """-l bootrom,FILE,VARSFILE: the vars file is writable in the jail; what the test ROM
    programs there (tests/guests/pflash.S) is in the file afterwards."""
    from test_pflash import vars_file  # noqa: PLC0415

    store = work / "vars.fd"
    vars_file(store)
    os.chown(store, jailer.uid, jailer.gid)
    r = run_vmm("run", "-m", "64", "--no-reboot", "-s", "31,lpc", "-l", f"bootrom,{guests / 'pflash.bin'},{store}",
                "--jail", str(work / "jail"), "--uid", str(jailer.uid), "--gid", str(jailer.gid), timeout=60)
    assert r.status == 0, r.err
    assert "pflash: detected: flash" in r.out and "pflash: programmed, reads back" in r.out, r.out
    assert store.read_bytes()[0x2000:0x2008] == b"ASYNCVMM"


@pytest.mark.parametrize("flags, needle", [
    (("--uid", "1234"), "--uid and --gid go with --jail DIR"),
    (("--gid", "1234"), "--uid and --gid go with --jail DIR"),
    (("--jail", "{jail}"), "--uid UID --gid GID"),
    (("--jail", "{jail}", "--uid", "1234"), "--uid UID --gid GID"),
    (("--jail", "{work}/missing", "--uid", "1234", "--gid", "1234"), "no such directory"),
    (("--jail", "{work}", "--uid", "1234", "--gid", "1234"), "not empty"),
    (("--jail", "{jail}", "--uid", "0", "--gid", "1234"), "must not be root's"),
    (("--jail", "{jail}", "--uid", "no-such-user-avmm", "--gid", "1234"), "no such user"),
    (("--jail", "{jail}", "--uid", "1234", "--gid", "1234", "-s", "3,virtio-net,passt"), "passt: not supported"),
    (("--jail", "{jail}", "--uid", "1234", "--gid", "1234", "-s", "3,virtio-blk,{qcow2}"), "not a raw image"),
])
def test_bad_jail_flags_are_one_line(guests, work, flags, needle):
    qcow2 = work / "disk.qcow2"
    qcow2.write_bytes(b"QFI\xfb" + bytes(4) + bytes(64 * 1024))  # a qcow2 header's magic is enough to detect
    flags = tuple(f.format(jail=work / "jail", work=work, qcow2=qcow2) for f in flags)
    r = run_vmm("run", "-m", "64", "--kernel", str(guests / "hello.elf"), *flags)
    assert r.status == 2, r.err
    lines = r.err.splitlines()
    assert len(lines) == 1 and needle in lines[0], r.err
    assert os.listdir(work / "jail") == []


def test_jail_needs_root(guests, jailer, work):
    (work / "stash").mkdir()
    argv = as_user(jailer, [sys.executable, "-m", "asyncvmm", "run", "-m", "64", "--kernel", str(guests / "hello.elf"),
                            "--jail", str(work / "jail"), "--uid", str(jailer.uid), "--gid", str(jailer.gid)],
                   work / "stash")
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={"PATH": os.environ["PATH"], "PYTHONDONTWRITEBYTECODE": "1"})
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == ["asyncvmm: --jail needs root: it mounts the jail and changes to --uid/--gid itself"]


def test_a_jailed_vmm_opens_a_tap_made_for_its_user(guests, jailer, work):
    """In a network namespace of the test's: a TAP made beforehand for the jail's user is
    opened inside the jail (its own /dev/net/tun, sysfs read-only); one that does not exist
    cannot be made without CAP_NET_ADMIN: one line, status 2."""
    from netns import Netns  # noqa: PLC0415

    base = [sys.executable, "-m", "asyncvmm", "run", "-m", "64", "--no-reboot", "--kernel", str(guests / "hello.elf"),
            "--jail", str(work / "jail"), "--uid", str(jailer.uid), "--gid", str(jailer.gid)]
    with Netns("jail") as ns:
        ns.exec("ip", "tuntap", "add", "avmmjt0", "mode", "tap", "user", str(jailer.uid), "vnet_hdr")
        r = ns.exec(*base, "-s", "3,virtio-net,avmmjt0", check=False)
        assert r.returncode == 0, r.stderr
        assert "hello from the guest" in r.stdout
        r = ns.exec(*base, "-s", "3,virtio-net,avmmjt1", check=False)
        assert r.returncode == 2, r.stderr
        assert r.stderr.splitlines()[-1:] == ["asyncvmm: TAP avmmjt1: not permitted (CAP_NET_ADMIN is needed to create it)"]
        assert "avmmjt1" not in ns.exec("ip", "link").stdout
    assert os.listdir(work / "jail") == []


def test_a_killed_jailed_vmm_leaves_no_socket(guests, jailer, work, private_run_dir):
    """SIGKILL gives the VMM no chance to clean up; the janitor outside still removes the
    control socket (its pipe closes with the VMM), and the jail goes with the namespace."""
    name = f"killed{os.getpid()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncvmm", "run", "-m", "64", "--kernel", str(guests / "counter.elf"),
         "--cmdline", "delay=2000", "--jail", str(work / "jail"), "--uid", str(jailer.uid), "--gid", str(jailer.gid),
         name], cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sock = private_run_dir / f"{name}.sock"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None
            try:
                ControlClient(name).request("state")
                break
            except VmmError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        proc.kill()
        proc.wait(15)
        deadline = time.monotonic() + 10
        while sock.exists():
            assert time.monotonic() < deadline, "the control socket was left behind"
            time.sleep(0.05)
        assert os.listdir(work / "jail") == [] and not_mounted(work / "jail")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(15)
