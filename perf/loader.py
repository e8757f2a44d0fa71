"""The disk loader's own cost: process start → the guest kernel's first instruction when
`asyncvmm run` boots from a disk's menu, beside `--kernel` with the same files and the same
disk attached, in one run (alternating, so both see the same machine load).

    hello   a Debian-shaped GPT disk (ESP, ext4 root, grub-mkconfig's grub.cfg) whose
            /boot holds build/guests/hello.elf: process start → the guest's first console
            byte (it prints within its first few hundred instructions, the same on both sides)
    linux   tools/images/build-disk-image's disk (the small kernel's bzImage, 3 MB, in /boot;
            needs root): process start → the VMM's "control socket" line, logged when the
            machine is built with the kernel loaded, just before the boot vCPU enters it
            (the same bzImage unpacked on both sides)

Also the loader alone, in this process: disks → menu → entry → files read (Selection.seconds).
"""

from __future__ import annotations

import os
import selectors
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from bench import ASYNCVMM, GUESTS, HELLO_MARKER, BenchError, finish, spawn, timed_boot  # noqa: E402

KVER = "6.1.0-13-amd64"
CONTROL_LINE = b"control socket"


def hello_disk(tmp: Path) -> Path:
    """The Debian shape made with Debian's tools, no root needed (tests/loader_images.py)."""
    from loader_images import MiB, blank, ext4, fat, gpt  # noqa: PLC0415

    img = blank(tmp / "hello-disk.img", 64 * MiB)
    gpt(img, "-n", "1:2048:+1M", "-t", "1:ef02", "-n", "2:0:+16M", "-t", "2:ef00", "-n", "3:0:0", "-t", "3:8300")
    uuid = "5d1f0c2a-7b3e-4c9d-8e6f-1a2b3c4d5e6f"
    fat(img, 4096 * 512, 16 * MiB, {"EFI/debian/grub.cfg": (
        f"search.fs_uuid {uuid} root hd0,gpt3 \nset prefix=($root)'/boot/grub'\nconfigfile $prefix/grub.cfg\n").encode()})
    cfg = (ROOT / "tests/fixtures/loader/debian-12-grub-mkconfig.cfg").read_text()
    cfg = cfg.replace("@ROOT_UUID@", uuid).replace("@ROOT_PARTUUID@", "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d").replace("@KVER@", KVER)
    start = (4096 + 32768) * 512
    ext4(img, start, 64 * MiB - start - 34 * 512,
         {f"boot/vmlinuz-{KVER}": (GUESTS / "hello.elf").read_bytes(), "boot/grub/grub.cfg": cfg.encode()}, uuid=uuid)
    return img


def linux_disk() -> Path | None:
    if os.geteuid() != 0:
        return None
    p = subprocess.run([str(ROOT / "tools/images/build-disk-image")], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                       text=True, timeout=1800)
    return Path(p.stdout.strip().splitlines()[-1]) / "disk.img" if p.returncode == 0 else None


def until_log_line(argv: list[str], marker: bytes, timeout: float) -> float:
    """Seconds from just before the process is created to `marker` on its stderr; then it is killed."""
    t0 = time.perf_counter()
    p = spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, bufsize=0)
    sel = selectors.DefaultSelector()
    sel.register(p.stderr.fileno(), selectors.EVENT_READ)
    buf = b""
    try:
        while time.perf_counter() - t0 < timeout:
            if not sel.select(timeout):
                continue
            data = os.read(p.stderr.fileno(), 65536)
            if not data:
                break
            buf += data
            if marker in buf:
                return time.perf_counter() - t0
    finally:
        sel.close()
        finish(p, 5, 9)
    raise BenchError(f"{' '.join(argv[-4:])}: no {marker.decode()!r} on stderr: {buf[-300:].decode(errors='replace')!r}")


def _select_seconds(disk: Path, reps: int) -> float:
    from asyncvmm.loader.boot import select  # noqa: PLC0415

    return statistics.median(select([str(disk)]).seconds for _ in range(reps))


def bench_loader(quick: bool, notes: list[str]) -> tuple[str, dict]:
    reps = 3 if quick else 7
    env_dir = tempfile.mkdtemp(prefix="bench-loader-")
    os.environ["ASYNCVMM_RUN_DIR"] = env_dir
    tmp = Path(env_dir)
    figs: dict = {"loader.reps": reps}
    rows = []
    try:
        disk = hello_disk(tmp)
        hello = str(GUESTS / "hello.elf")
        cmdline = "root=PARTUUID=9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d ro console=ttyS0 panic=-1"
        base = [str(ASYNCVMM), "run", "-q", "-m", "64", "--no-reboot", "-s", f"2,virtio-blk,{disk},ro"]
        kern, load = [], []
        for _ in range(reps):
            for argv, out in ((base + ["--kernel", hello, "--cmdline", cmdline], kern), (base, load)):
                r = timed_boot(argv, HELLO_MARKER, 30)
                if r["error"]:
                    raise BenchError(f"hello {'--kernel' if out is kern else 'loader'}: {r['error']}")
                out.append(r["guest_byte"])
        figs.update({"loader.hello.kernel_s": round(statistics.median(kern), 4),
                     "loader.hello.loader_s": round(statistics.median(load), 4)})
        figs["loader.hello.added_ms"] = round((figs["loader.hello.loader_s"] - figs["loader.hello.kernel_s"]) * 1e3, 1)
        figs["loader.hello.select_ms"] = round(_select_seconds(disk, reps) * 1e3, 1)
        rows.append(("hello (PVH ELF, 9 KB)", "first guest byte", kern, load, figs["loader.hello.select_ms"]))

        linux = linux_disk()
        if linux is None:
            notes.append("loader: tools/images/build-disk-image needs root: the linux row is skipped")
        else:
            from asyncvmm.loader.boot import select  # noqa: PLC0415

            sel = select([str(linux)])
            bz = tmp / "bzImage"
            bz.write_bytes(sel.kernel)  # the same file the loader reads from the disk
            base = [str(ASYNCVMM), "run", "-m", "256", "--no-reboot", "-s", f"3,virtio-blk,{linux},ro"]
            kern, load = [], []
            for _ in range(reps):
                for argv, out in ((base + ["--kernel", str(bz), "--cmdline", sel.cmdline], kern), (base, load)):
                    out.append(until_log_line(argv + [f"bench-loader-{os.getpid()}"], CONTROL_LINE, 120))
            figs.update({"loader.linux.kernel_s": round(statistics.median(kern), 4),
                         "loader.linux.loader_s": round(statistics.median(load), 4)})
            figs["loader.linux.added_ms"] = round((figs["loader.linux.loader_s"] - figs["loader.linux.kernel_s"]) * 1e3, 1)
            figs["loader.linux.select_ms"] = round(_select_seconds(linux, reps) * 1e3, 1)
            rows.append((f"small Linux (bzImage, {len(sel.kernel) >> 10} KiB)", "kernel entered", kern, load,
                         figs["loader.linux.select_ms"]))
    finally:
        shutil.rmtree(env_dir, ignore_errors=True)
        os.environ.pop("ASYNCVMM_RUN_DIR", None)

    lines = [f"loader: process start -> the kernel's first instruction, median of {reps} (s)",
             f"  {'guest':<30} {'measured to':<18} {'--kernel':>9} {'loader':>9} {'added':>9} {'loader alone':>13}"]
    for name, what, k, ld, sel_ms in rows:
        mk, ml = statistics.median(k), statistics.median(ld)
        lines.append(f"  {name:<30} {what:<18} {mk:9.3f} {ml:9.3f} {(ml - mk) * 1e3:7.0f}ms {sel_ms:11.0f}ms")
    return "\n".join(lines), figs


if __name__ == "__main__":
    notes: list[str] = []
    text, figures = bench_loader("--quick" in sys.argv, notes)
    print(text)
    for n in notes:
        print(f"  - {n}")
