"""A firmware boot, side by side in one run: SeaBIOS → GRUB (i386-pc) → the small kernel
from tools/images/build-disk-image's disk on virtio-blk, through `asyncvmm run -l bootrom`
and through QEMU (`-accel tcg`, and `-accel kvm`, which may not get far on an emulating
KVM) with the same SeaBIOS file and a copy of the same image.

Marks, in seconds from process start, read from each one's serial console:
    seabios   SeaBIOS's banner
    grub      GRUB's "Welcome to GRUB!" (the bootloader is running)
    loading   GRUB's "Loading Linux ..." (it reads the kernel from the disk)
    kernel    the kernel's "Linux version" line (on ttyS0 once the kernel's console is up)

    .venv/bin/python perf/firmware.py [--timeout S] [--only asyncvmm,tcg,kvm]
    .venv/bin/python perf/bench.py --only firmware [--quick]   # the same, into perf/history.jsonl

One run each (a boot costs minutes here); needs root for the image (loop devices) and
Debian's seabios and qemu-system-x86. On an emulating KVM the copy's grub.cfg gets the
linux-cmdline quirk's parameters (tests/integration/test_firmware_boot.py says why); QEMU
boots the same copy.
"""

from __future__ import annotations

import argparse
import os
import selectors
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from asyncvmm.console import CONTROL_SEQUENCE

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "integration"))

SEABIOS = "/usr/share/seabios/bios-256k.bin"
MARKS = {"seabios": b"SeaBIOS (version", "grub": b"Welcome to GRUB!", "loading": b"Loading Linux", "kernel": b"Linux version"}


def watch(cmd: list[str], timeout: float, env=None) -> dict[str, float]:
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    seen: dict[str, float] = {}
    buf = b""
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    try:
        while len(seen) < len(MARKS) and time.monotonic() - t0 < timeout:
            if not sel.select(timeout=1.0):
                if p.poll() is not None:
                    break
                continue
            chunk = os.read(p.stdout.fileno(), 65536)
            if not chunk:
                break
            buf = (buf + chunk)[-4096:]
            text = CONTROL_SEQUENCE.sub(b"", buf)  # GRUB moves the cursor inside words
            for name, marker in MARKS.items():
                if name not in seen and marker in text:
                    seen[name] = round(time.monotonic() - t0, 2)
    finally:
        sel.close()
        p.kill()
        p.wait()
        p.stdout.close()
    return seen


# The runs' names in the history (bench.py --only firmware): QEMU's are anchors.
FIGURE_NAMES = {"asyncvmm": "asyncvmm", "tcg": "qemu_tcg", "kvm": "qemu_kvm"}


def boot_marks(which: list[str], timeout: float, report=None) -> tuple[bool, dict[str, dict[str, float]]]:
    """Each of `which` booted once: (emulating KVM?, {run: {mark: seconds}}); `report(name,
    seen)` after each run."""
    from linux_guest import debian_disk_image  # noqa: PLC0415
    from test_firmware_boot import add_to_grub_cfg  # noqa: PLC0415

    from asyncvmm.quirks import linux_parameters  # noqa: PLC0415
    from asyncvmm.vstate.probe import probe  # noqa: PLC0415

    emulating = probe().emulating
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="avmm-fw-perf-") as tmp:
        disk = Path(tmp) / "disk.img"
        subprocess.run(["cp", "--sparse=always", str(debian_disk_image()), str(disk)], check=True)
        if emulating:
            add_to_grub_cfg(disk, linux_parameters(), Path(tmp))
        qemu = ["qemu-system-x86_64", "-m", "256", "-bios", SEABIOS, "-nographic", "-nodefaults", "-serial", "stdio",
                "-monitor", "none", "-drive", f"file={disk},if=none,id=d0,format=raw,readonly=on",
                "-device", "virtio-blk-pci,drive=d0", "-no-reboot"]
        runs = {
            "asyncvmm": [sys.executable, "-m", "asyncvmm", "run", "-m", "256", "-l", f"bootrom,{SEABIOS}",
                         "-s", f"3,virtio-blk,{disk},ro", "--no-reboot", "-q"],
            "tcg": [*qemu, "-accel", "tcg"],
            "kvm": [*qemu, "-accel", "kvm"],
        }
        env = dict(os.environ, ASYNCVMM_RUN_DIR=tmp)
        for name in which:
            results[name] = watch(runs[name], timeout, env)
            if report is not None:
                report(name, results[name])
    return emulating, results


def row(name: str, seen: dict[str, float]) -> str:
    return f"{name:10}" + "".join(f"{seen[m]:>10.2f}" if m in seen else f"{'-':>10}" for m in MARKS)


def bench_firmware(quick: bool, notes: list[str]) -> tuple[str, dict]:
    """perf/bench.py's opt-in section (`--only firmware`): one boot each, the marks as
    figures firmware.<run>.<mark>_s; a mark not reached in the time is left out (a note)."""
    if not (os.path.exists(SEABIOS) and os.geteuid() == 0):
        raise RuntimeError(f"needs root (the disk image) and Debian's seabios ({SEABIOS})")
    timeout = 60.0 if quick else 420.0
    emulating, results = boot_marks(["asyncvmm", "tcg", "kvm"], timeout)
    figs: dict = {"firmware.timeout.seconds": timeout}
    for name, seen in results.items():
        for mark in MARKS:
            if mark in seen:
                figs[f"firmware.{FIGURE_NAMES[name]}.{mark}_s"] = seen[mark]
        missing = [m for m in MARKS if m not in seen]
        if missing:
            notes.append(f"firmware: {name} did not reach {', '.join(missing)} in {timeout:.0f} s")
    lines = [f"firmware boot: SeaBIOS → GRUB → Linux, one run each, seconds from process start "
             f"(KVM {'emulating' if emulating else 'hardware'}, {timeout:.0f} s each at most)",
             f"{'':10}" + "".join(f"{m:>10}" for m in MARKS),
             *(row(name, seen) for name, seen in results.items())]
    return "\n".join(lines), figs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--timeout", type=float, default=400.0, help="seconds per boot before it is given up")
    ap.add_argument("--only", default="asyncvmm,tcg,kvm")
    args = ap.parse_args()
    which = args.only.split(",")
    print(f"{'':10}" + "".join(f"{m:>10}" for m in MARKS))
    emulating, _ = boot_marks(which, args.timeout, lambda name, seen: print(row(name, seen), flush=True))
    print(f"(one run each, seconds from process start; KVM: {'emulating' if emulating else 'hardware'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
