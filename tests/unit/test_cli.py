"""Bad input to `asyncvmm run`: one line naming the problem, status 2, no traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, needs_kvm, run_vmm


def assert_usage_error(r, *words):
    assert r.status == 2, (r.status, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1, r.err
    assert lines[0].startswith("asyncvmm: ")
    assert "Traceback" not in r.err
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture(scope="module")
def kernel(guests):
    return str(guests / "hello.elf")


@pytest.mark.parametrize(
    "args, words",
    [
        (["-c", "0"], ["-c 0", "at least one vCPU"]),
        (["-c", "cpus=4,sockets=1,cores=2,threads=1"], ["does not match"]),
        (["-c", "lots"], ["-c lots"]),
        (["-m", "abc"], ["-m abc", "not a size"]),
        (["-m", "100T"], ["more than this host"]),
        (["-m", "1"], ["at least 2 MiB"]),
        (["--bogus"], ["unrecognized arguments: --bogus"]),
        (["-s", "3,virtio-blk,disk.img"], ["disk.img", "no such file"]),
        (["-s", "3,virtio-blk,/dev/null,bogus"], ["unknown option", "bogus"]),
        (["-s", "0,virtio-blk,/dev/null"], ["host bridge"]),
        (["-s", "1:3:0,virtio-blk,/dev/null"], ["bus 0"]),
        (["-s", "3,xhci"], ["xhci", "not available"]),
        (["-s", "3,virtio-net,tap0,mac=01:00:00:00:00:01"], ["multicast"]),
        (["-s", "3,virtio-net,bad/name"], ["not an interface name"]),
        (["-s", "3,nosuch"], ["no such driver"]),
        (["-s", "40,virtio-net,tap0"], ["slot 0-31"]),
        (["-l", "com5,stdio"], ["no such port"]),
        (["-l", "com1"], ["say where com1 goes"]),
        (["-p", "3:0"], ["no vCPU 3"]),
        (["-p", "x"], ["VCPU:HOSTCPU"]),
        (["--cpu", "fast"], ["invalid choice"]),
        (["--decompress", "maybe"], ["invalid choice"]),
        (["--profile-rip", "0.01"], ["--profile-rip 0.01", "from 0.1"]),
        (["--profile-rip", "often"], ["invalid float"]),
        (["--symbols", "/no/such/System.map"], ["--symbols /no/such/System.map", "no such file"]),
        (["-c", "sockets=129,cores=2"], ["APIC IDs up to 257", "at most 254"]),
        (["-c", "2", "-p", "1:9999"], ["-p 1:9999", "no CPU 9999"]),
        (["-m", "0"], ["-m 0:", "at least 2 MiB"]),
        (["-s", "3,virtio-blck,x"], ["no such driver 'virtio-blck'", "drivers: hostbridge, ", "virtio-blk, virtio-blk-backend, virtio-console, virtio-net, virtio-rnd"]),
        (["-s", "4,virtio-net,lo"], ["lo is a network interface of the host", "name a TAP"]),
        (["-s", "4,virtio-net,tap0,queues=0"], ["queues=0: a number of queue pairs from 1 to"]),
        (["-s", "4,virtio-blk,/dev/null,queues=0"], ["queues=0: a number of queues from 1 to 64"]),
        (["-s", "3,virtio-blk,/dev/null", "-s", "4,virtio-blk,/dev/../dev/null"],
         ["-s 4,virtio-blk,/dev/../dev/null", "already the disk in slot 3:0"]),
        (["--no-reboo"], ["unrecognized arguments: --no-reboo"]),  # no abbreviations
        (["-I"], ["-I: bhyve's -I (an I/O APIC) is not an asyncvmm option", "always there"]),
    ],
)
def test_bad_flags(kernel, args, words):
    assert_usage_error(run_vmm("run", "--kernel", kernel, *args), *words)


def test_no_kernel():
    assert_usage_error(run_vmm("run"), "no kernel given")


def test_missing_kernel_file(tmp_path):
    assert_usage_error(run_vmm("run", "--kernel", str(tmp_path / "nope")), "no such file")


def test_kernel_is_a_directory(tmp_path):
    assert_usage_error(run_vmm("run", "--kernel", str(tmp_path)), "is a directory")


def test_missing_initrd(kernel, tmp_path):
    assert_usage_error(run_vmm("run", "--kernel", kernel, "--initrd", str(tmp_path / "no")), "initrd", "no such file")


@needs_kvm
def test_not_a_kernel():
    """Checked before anything starts: one line (no KVM probe, no ACPI line) naming the file."""
    r = run_vmm("run", "--kernel", str(ROOT / "pyproject.toml"))
    assert_usage_error(r, "kernel " + str(ROOT / "pyproject.toml"), "not a kernel")


def test_an_elf_that_is_not_a_kernel_is_named():
    assert_usage_error(run_vmm("run", "--kernel", "/bin/true"), "kernel /bin/true:", "not an executable")


@needs_kvm
def test_memory_too_small_for_what_must_be_loaded(kernel, tmp_path):
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"\0" * (8 << 20))
    r = run_vmm("run", "-q", "-m", "4", "--kernel", kernel, "--initrd", str(initrd))
    assert_usage_error(r, "needs at least", "4 MiB")


@needs_kvm
def test_busy_console_socket(kernel, tmp_path):
    import socket

    path = tmp_path / "busy.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.listen(1)
    try:
        r = run_vmm("run", "-q", "--kernel", kernel, "-l", f"com1,socket={path}")
    finally:
        s.close()
    assert_usage_error(r, "in use")


def test_no_dev_kvm(kernel):
    """A host with no /dev/kvm: a private mount namespace with an empty /dev."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare")
    script = f"mount -t tmpfs none /dev && exec {sys.executable} -m asyncvmm run --kernel {kernel}"
    p = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True, cwd=ROOT, timeout=30)
    r = type("R", (), {"status": p.returncode, "err": p.stderr.decode()})
    assert_usage_error(r, "/dev/kvm does not exist")


def test_no_permission_on_dev_kvm(kernel):
    if os.geteuid() != 0 or not shutil.which("setpriv") or not os.path.exists("/dev/kvm"):
        pytest.skip("needs root, setpriv and /dev/kvm")
    if os.stat("/dev/kvm").st_mode & 0o006:
        pytest.skip("/dev/kvm is open to everyone here")
    import tempfile

    with tempfile.TemporaryDirectory() as run_dir:  # a socket directory of the user's
        os.chown(run_dir, 65534, 65534)
        p = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "asyncvmm", "run",
             "--kernel", kernel],
            capture_output=True, cwd=ROOT, timeout=30,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "ASYNCVMM_RUN_DIR": run_dir},
        )
    r = type("R", (), {"status": p.returncode, "err": p.stderr.decode()})
    assert_usage_error(r, "no permission to open /dev/kvm")


def test_help_documents_the_exit_statuses():
    r = run_vmm("run", "--help")
    assert r.status == 0
    for line in ("0  the guest powered off (ACPI S5)", "3  the guest triple-faulted, with --no-reboot",
                 "2  bad command line", "4  stopped hard from the host", "SIGTERM presses the ACPI power button"):
        assert line in r.out


def test_profile_and_decompress_flags_reach_the_config(kernel):
    from asyncvmm.cli import _parser, config_from_args

    cfg = config_from_args(_parser().parse_args(["run", "--kernel", kernel, "--profile-rip", "--decompress", "vmm"]))
    assert (cfg.profile_boot, cfg.profile_rip_ms, cfg.decompress) == (True, 2.0, "vmm")
    cfg = config_from_args(_parser().parse_args(["run", "--kernel", kernel]))
    assert (cfg.profile_boot, cfg.profile_rip_ms, cfg.decompress) == (False, 0.0, "auto")


def test_help_explains_the_decompress_default():
    r = run_vmm("run", "--help")
    assert "--decompress" in r.out and "emulates guest code" in r.out and "KASLR" in r.out
    assert "--profile-boot" in r.out and "--profile-rip" in r.out
def test_help_says_which_bhyve_flags_kvm_already_honours():
    out = " ".join(run_vmm("run", "--help").out.split())
    assert "-H yield the vCPU's thread on HLT: KVM always does" in out
    assert "-P exit on PAUSE: KVM already does" in out
    for flag in ("-A, --acpi", "--no-acpi", "-e, --strict-io", "-W, --force-msi"):
        assert flag in out


def test_bhyve_flags_reach_the_config():
    from asyncvmm.boot.cpuid import Topology
    from asyncvmm.cli import _parser, config_from_args

    kernel = str(ROOT / "pyproject.toml")  # any readable file: nothing is booted
    cfg = config_from_args(_parser().parse_args(["run", "--kernel", kernel, "-c", "sockets=1,cores=2,threads=2",
                                                 "-e", "-W", "-H", "-P", "-A"]))
    assert (cfg.cpus, cfg.topology, cfg.strict_io, cfg.force_msi, cfg.acpi) == (4, Topology(1, 2, 2), True, True, True)
    cfg = config_from_args(_parser().parse_args(["run", "--kernel", kernel, "--no-acpi"]))
    assert (cfg.acpi, cfg.strict_io, cfg.force_msi, cfg.cpu_topology) == (False, False, False, Topology(1, 1, 1))


@needs_kvm
def test_read_only_disks_may_share_an_image(kernel, tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    r = run_vmm("run", "--kernel", kernel, "-s", f"3,virtio-blk,{image},ro", "-s", f"4,virtio-blk,{image}")
    assert_usage_error(r, "already the disk in slot 3:0")
    r = run_vmm("run", "-q", "--no-reboot", "-m", "64", "--kernel", kernel,
                "-s", f"3,virtio-blk,{image},ro", "-s", f"4,virtio-blk,{image},ro")
    assert r.status == 0, r.err


def test_version():
    r = run_vmm("--version")
    assert r.status == 0 and r.out.strip().startswith("asyncvmm ")


def test_bhyve_help_lists_the_drivers_and_console_devices():
    r = run_vmm("run", "-s", "help")  # as bhyve's: no kernel needed
    assert r.status == 0, r.err
    from asyncvmm.devices.slots import driver_names

    names = driver_names()
    assert {"hostbridge", "virtio-blk", "virtio-net"} <= set(names)
    assert [line.strip() for line in r.out.splitlines()[1 : 1 + len(names)]] == names
    r = run_vmm("run", "-l", "help")
    assert r.status == 0 and "socket=PATH" in r.out, r.err
    assert all(f"com{i}" in r.out for i in range(1, 5)), r.out
    assert "virtio-blk" in run_vmm("run", "--help").out.replace("\n", " ")


@needs_kvm
def test_the_log_names_the_disks_attached(kernel, tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    r = run_vmm("run", "--no-reboot", "-m", "64", "--kernel", kernel, "-s", f"3,virtio-blk,{image},ro")
    assert r.status == 0, r.err
    assert f"asyncvmm: devices: 3:0 virtio-blk {image} (read-only)" in r.err.splitlines()


@needs_kvm
def test_an_input_refused_while_the_machine_is_built_is_still_one_line(kernel, tmp_path):
    """A disk another VM holds is found only when it is opened: the KVM probe and ACPI
    lines said on the way are left out, so status 2 is one line."""
    import fcntl

    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    with open(image, "rb+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as another VM's does
        r = run_vmm("run", "--no-reboot", "-m", "64", "--kernel", kernel, "-s", f"3,virtio-blk,{image}")
    assert_usage_error(r, f"disk {image} is in use by another VM")
