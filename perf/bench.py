#!/usr/bin/env python3
"""asyncvmm's machine-core benchmarks, each run side by side with its anchor in the same run.

    .venv/bin/python perf/bench.py [--quick] [--only startup,exits,memory] [--no-history]

  startup  wall time from process start to the guest's first output byte and to process
           exit, booting build/guests/hello.elf: asyncvmm vs QEMU (-accel kvm, -accel tcg).
  exits    µs per PIO exit round trip with build/guests/exitbench.elf: through the loop to a
           Python device model (0x3ff, 0x80), served in C (0x3f8), vs build/perf/rawkvm.
  memory   RSS of the VMM process minus the guest RAM it touched, with build/guests/counter.elf
           running in -m 1024: asyncvmm vs QEMU -accel tcg.
  loader   process start -> the kernel's first instruction booting from a disk's menu vs
           --kernel with the same files (perf/loader.py).

Prints a table of medians and ratios and appends one JSON line to perf/history.jsonl.
See perf/README.md. Needs `tools/setup` (and qemu-system-x86 for the QEMU columns).
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import os
import re
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import history
from table import table  # perf/table.py

# The checkout benchmarked: this one, or another one set up with tools/setup --perf
# (`--root DIR`, which perf/ab.py uses: this harness measures both sides of an A/B).
ROOT = Path(os.environ.get("ASYNCVMM_BENCH_ROOT") or Path(__file__).resolve().parent.parent).resolve()
GUESTS = ROOT / "build" / "guests"
RAWKVM = ROOT / "build" / "perf" / "rawkvm"
WAKEUP = ROOT / "build" / "perf" / "wakeup"
VENV_PY = ROOT / ".venv" / "bin" / "python"
ASYNCVMM = ROOT / ".venv" / "bin" / "asyncvmm"
HISTORY = Path(__file__).resolve().parent / "history.jsonl"
FLOOR = Path(__file__).resolve().parent / "floor.py"  # an anchor: this checkout's, whatever --root is
MiB = 1 << 20

# Targets for asyncvmm (see perf/README.md).
TARGET_STARTUP_EXIT_S = 0.15
TARGET_LOOP_ADDED_US = 10.0
TARGET_FAST_ADDED_US = 2.0
TARGET_VMM_RSS_MIB = 40.0

STALL_S = 5.0  # exit benchmark: a run with no exit for this long has hung

HELLO_MARKER = b"hello from the guest"
COUNTER_MARKER = b"tick 3\n"

# Ports exitbench writes to, and what serves them in asyncvmm.
EXIT_PATHS = [
    (0x3FF, "loop: UART scratch (Python model)", "loop"),
    (0x80, "loop: sink device (loop's own cost)", "loop"),
    (0x3F8, "C fast path: COM1 THR", "fast"),
]


# ---------------------------------------------------------------------------------------
# Child processes: each in its own process group, every wait bounded, nothing left behind.
# ---------------------------------------------------------------------------------------

class BenchError(Exception):
    pass


_live: dict[int, subprocess.Popen] = {}
_leftovers: list[str] = []
_failures: list[str] = []  # columns that failed: the run's exit status becomes 1


def spawn(argv: list[str], **kw) -> subprocess.Popen:
    try:
        p = subprocess.Popen([str(a) for a in argv], start_new_session=True, **kw)
    except FileNotFoundError as e:
        raise BenchError(f"cannot run {argv[0]}: {e.strerror}") from None
    _live[p.pid] = p
    return p


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group `pgid`."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(entry))
    return out


def _exited(p: subprocess.Popen) -> bool:
    """Has `p` exited? Leaves it unreaped (a zombie), so its pgid cannot be reused yet."""
    try:
        return os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None
    except ChildProcessError:
        return True


def finish(p: subprocess.Popen, timeout: float, sig: int | None = None) -> int | None:
    """Stop `p` (with `sig` if given), wait up to `timeout` s, then make sure nothing of its
    process group is left: stragglers get SIGKILL and are reported. Returns the exit status
    (negative: killed by that signal) or None if it had to be killed after the timeout."""
    status = None
    try:
        if sig is not None and not _exited(p):
            try:
                os.kill(p.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while not _exited(p) and time.monotonic() < deadline:
            time.sleep(0.005)
        timed_out = not _exited(p)
        # The leader is still unreaped here, so p.pid is still this group's id.
        members = [m for m in _group_members(p.pid) if m != p.pid]
        if members:
            _leftovers.append(f"{len(members)} process(es) of group {p.pid} ({p.args[0]}) killed")
        if timed_out or members:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        status = p.wait(timeout=10)
        if timed_out:
            status = None
    finally:
        _live.pop(p.pid, None)
        for stream in (p.stdin, p.stdout, p.stderr):
            if stream is not None:
                stream.close()
    return status


def _kill_all_live() -> None:
    for pid, p in list(_live.items()):
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.wait(timeout=5)
        except Exception:
            pass
        _live.pop(pid, None)


atexit.register(_kill_all_live)


def _on_signal(signum, frame):
    _kill_all_live()
    raise KeyboardInterrupt


def run_capture(argv: list[str], timeout: float) -> tuple[int | None, str, str]:
    """Run to the end with a timeout; (status or None on timeout, stdout, stderr)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = spawn(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        status = finish(p, timeout)
        out.seek(0)
        err.seek(0)
        return status, out.read().decode(errors="replace"), err.read().decode(errors="replace")


def tail(text: str, lines: int = 3) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


# ---------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------

def kvm_kind() -> str:
    if os.path.isdir("/sys/module/kvm_pvm"):
        return "kvm_pvm"
    if os.path.isdir("/sys/module/kvm_intel") or os.path.isdir("/sys/module/kvm_amd"):
        return "hardware"
    return "hardware" if os.path.exists("/dev/kvm") else "none"


def git_commit() -> str:
    try:
        r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        commit = r.stdout.strip() if r.returncode == 0 else "unknown"
        # Untracked files count too (new code is code), except this script's own history.
        r = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", ".", ":!perf/history.jsonl"],
            capture_output=True, text=True, timeout=10,
        )
        if r.returncode == 0 and r.stdout.strip():
            commit += "+dirty"
    except (OSError, subprocess.TimeoutExpired):
        commit = "unknown"
    return commit


_VMM_RE = re.compile(rb"asyncvmm|qemu-system|rawkvm|pytest|perf/bench\.py")


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return int(stat[stat.rfind(")") + 2 :].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _related(pid: int, me: int) -> bool:
    """`pid` is this run's own: a descendant (fio's job processes, `ip netns exec`
    children) or an ancestor (a `timeout` wrapping the run)."""
    p = pid
    for _ in range(64):
        if p in (0, 1):
            break
        if p == me:
            return True
        p = _parent(p)
    p = _parent(me)
    for _ in range(64):
        if p in (0, 1):
            return False
        if p == pid:
            return True
        p = _parent(p)
    return False


def other_load() -> list[str]:
    """Other VMMs (and test runs) on this host that are not ours: they skew every figure."""
    while True:
        try:
            mine = set(_live)
            break
        except RuntimeError:  # changed size during iteration (spawn on the main thread)
            continue
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in (1, me):
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) < 3 or fields[0] == "Z" or int(fields[2]) in mine or _related(int(entry), me):
            continue
        if _VMM_RE.search(cmd):
            text = cmd.replace(b"\0", b" ").decode(errors="replace").strip()
            found.append(f"pid {entry}: {text[:90]}")
    return found


class LoadWatch:
    """Samples other_load() once a second in a daemon thread while the benchmarks run."""

    def __init__(self):
        import threading  # noqa: PLC0415

        self.seen: dict[str, None] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                self.seen.update(dict.fromkeys(other_load()))
            except Exception:
                pass
            self._stop.wait(1.0)

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join(timeout=5)
        return list(self.seen)


def qemu_version(qemu: str) -> str:
    try:
        r = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=10)
        m = re.search(r"version (\S+)", r.stdout)
        return m.group(1) if m else "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def check_prerequisites(which: list[str]) -> None:
    need = [(VENV_PY, ".venv (asyncvmm installed)"), (ASYNCVMM, ".venv/bin/asyncvmm")]
    if "startup" in which or "loader" in which:
        need.append((GUESTS / "hello.elf", "the hello guest"))
    if "exits" in which:
        need += [(GUESTS / "exitbench.elf", "the exitbench guest"), (RAWKVM, "perf/rawkvm")]
    if "memory" in which:
        need.append((GUESTS / "counter.elf", "the counter guest"))
    missing = [f"{what} ({path.relative_to(ROOT)})" for path, what in need if not path.exists()]
    if missing:
        raise BenchError("missing: " + ", ".join(missing) + ". Run tools/setup first.")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise BenchError("/dev/kvm is missing or not accessible to this user")


# ---------------------------------------------------------------------------------------
# Small statistics and formatting helpers
# ---------------------------------------------------------------------------------------

def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, spec=".3f", none="—"):
    return none if v is None else format(v, spec)


def ratio(a, b):
    return a / b if a is not None and b else None


def verdict(value, limit):
    if value is None:
        return ""
    return "ok" if value <= limit else "MISS"


# ---------------------------------------------------------------------------------------
# 1. Start-up
# ---------------------------------------------------------------------------------------

def timed_boot(argv: list[str], marker: bytes, timeout: float) -> dict:
    """Start `argv`, read its stdout unbuffered; seconds from just before the process is
    created to its first output byte, to the first byte of `marker` (the guest's own first
    output) and to its exit (seen through a pidfd, so not rounded to a poll interval)."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, bufsize=0)
        pidfd = os.pidfd_open(p.pid)
        sel = selectors.DefaultSelector()
        out_fd = p.stdout.fileno()
        sel.register(out_fd, selectors.EVENT_READ, "out")
        sel.register(pidfd, selectors.EVENT_READ, "exit")
        buf = bytearray()
        chunks: list[tuple[int, float]] = []  # (offset of the chunk's first byte, arrival)
        t_first = t_marker = t_exit = None
        deadline = t0 + timeout
        try:
            while sel.get_map():
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                for key, _ in sel.select(left):
                    now = time.perf_counter()
                    if key.data == "exit":
                        t_exit = now
                        sel.unregister(pidfd)
                        deadline = min(deadline, now + 1.0)  # stdout may be held by a straggler
                        continue
                    data = os.read(out_fd, 65536)
                    if not data:
                        sel.unregister(out_fd)
                        continue
                    if t_first is None:
                        t_first = now
                    chunks.append((len(buf), now))
                    buf += data
                    if t_marker is None:
                        i = buf.find(marker)
                        if i >= 0:
                            t_marker = max(t for off, t in chunks if off <= i)
        finally:
            sel.close()
            os.close(pidfd)
            status = finish(p, 5 if t_exit is None else 10)
            err.seek(0)
            errtext = err.read().decode(errors="replace")
    r = {
        "first_byte": None if t_first is None else t_first - t0,
        "guest_byte": None if t_marker is None else t_marker - t0,
        "exit": None if t_exit is None else t_exit - t0,
        "status": status,
        "error": None,
    }
    if t_exit is None:
        r["error"] = f"timed out after {timeout:.0f} s"
    elif status != 0:
        r["error"] = f"exit status {status}: {tail(errtext) or tail(buf.decode(errors='replace'))}"
    elif t_marker is None:
        r["error"] = f"guest output {marker.decode()!r} never appeared: {tail(buf.decode(errors='replace'))!r}"
    return r


def bench_startup(reps: int, qemu: str | None, notes: list[str]) -> tuple[str, dict]:
    hello = GUESTS / "hello.elf"
    cmdline = "bench=startup"
    qemu_common = ["-kernel", hello, "-append", cmdline, "-m", "64", "-nographic", "-no-reboot",
                   "-serial", "stdio", "-display", "none", "-nodefaults", "-monitor", "none"]
    cands = [
        ("asyncvmm", "asyncvmm", [ASYNCVMM, "run", "-m", "64", "--kernel", hello, "--cmdline", cmdline, "--no-reboot", "-q"], 30),
        ("asyncvmm_no_acpi", "asyncvmm --no-acpi",
         [ASYNCVMM, "run", "-m", "64", "--kernel", hello, "--cmdline", cmdline, "--no-reboot", "-q", "--no-acpi"], 30),
        ("qemu_kvm", "qemu -accel kvm", None if not qemu else [qemu, "-accel", "kvm", *qemu_common], 90),
        ("qemu_tcg", "qemu -accel tcg", None if not qemu else [qemu, "-accel", "tcg", *qemu_common], 60),
        ("rawkvm", "rawkvm (raw C floor)", [RAWKVM, hello, cmdline], 20),
        ("python", "python -c pass (floor)", [VENV_PY, "-c", "pass"], 20),
        # A PVH guest booted by plain Python on uvloop (perf/floor.py): the interpreter,
        # asyncio and uvloop, KVM and the guest, nothing of asyncvmm's.
        ("floor", "floor.py --uvloop (Python floor)", [VENV_PY, FLOOR, "--uvloop", hello, cmdline], 20),
    ]
    if not RAWKVM.exists():
        cands = [c for c in cands if c[0] != "rawkvm"]
        notes.append("startup: build/perf/rawkvm missing, its floor row skipped")
    from startup_ir import stale_pycs  # noqa: PLC0415 (perf/startup_ir.py)

    stale = stale_pycs(ROOT)
    if stale:  # never rewritten under PYTHONDONTWRITEBYTECODE: compiled at every start
        notes.append(f"startup: {len(stale)} of asyncvmm's .pyc stale ({', '.join(stale[:3])}...): "
                     "asyncvmm's rows include compiling them; run tools/setup")
    samples: dict[str, list[dict]] = {key: [] for key, _, argv, _ in cands if argv}
    failed: dict[str, str] = {}
    # Interleaved (A B C A B C ...) so a slow moment of the host hits every column alike.
    for _ in range(reps):
        for key, label, argv, timeout in cands:
            if argv is None or key in failed:
                continue
            marker = b"" if key == "python" else HELLO_MARKER
            r = timed_boot(argv, marker, timeout)
            if key == "python":
                r["error"] = None if r["status"] == 0 else r["error"]
            if r["error"]:
                failed[key] = r["error"]
                _failures.append(f"startup {key}")
                notes.append(f"startup: {label} failed: {r['error']} (column dropped)")
                continue
            samples[key].append(r)

    figs: dict = {"startup.reps": reps}
    rows = []
    for key, label, argv, _ in cands:
        if argv is None:
            rows.append([label, "—", "—", "—", "—", "not run (no qemu-system-x86_64)"])
            continue
        s = samples.get(key, [])
        if key in failed or not s:
            rows.append([label, "—", "—", "—", "—", "FAILED"])
            continue
        fb, gb, ex = (med([x[k] for x in s]) for k in ("first_byte", "guest_byte", "exit"))
        lo, hi = min(x["exit"] for x in s), max(x["exit"] for x in s)
        if key != "python":
            figs[f"startup.{key}.first_byte_s"] = round(fb, 4)
            figs[f"startup.{key}.guest_first_byte_s"] = round(gb, 4)
        figs[f"startup.{key}.exit_s"] = round(ex, 4)
        figs[f"startup.{key}.exit_min_s"] = round(lo, 4)
        figs[f"startup.{key}.exit_max_s"] = round(hi, 4)
        target = ""
        if key == "asyncvmm":
            target = f"≤ {TARGET_STARTUP_EXIT_S} s to exit: {verdict(ex, TARGET_STARTUP_EXIT_S)}"
        rows.append([label, fmt(fb), fmt(gb), fmt(ex), f"{lo:.3f}–{hi:.3f}", target])

    out = [f"1. start-up: build/guests/hello.elf, -m 64; median of {reps} runs, seconds from process start",
           table(["", "first byte", "guest's 1st byte", "exit", "exit min–max", "target"], rows, "lrrrrl")]
    a_gb, a_ex = figs.get("startup.asyncvmm.guest_first_byte_s"), figs.get("startup.asyncvmm.exit_s")
    ratio_lines = []
    for key, label in (("qemu_kvm", "qemu -accel kvm"), ("qemu_tcg", "qemu -accel tcg")):
        q_gb, q_ex = figs.get(f"startup.{key}.guest_first_byte_s"), figs.get(f"startup.{key}.exit_s")
        r_gb, r_ex = ratio(a_gb, q_gb), ratio(a_ex, q_ex)
        if r_ex is not None:
            figs[f"startup.ratio_asyncvmm_{key}.guest_first_byte"] = round(r_gb, 4)
            figs[f"startup.ratio_asyncvmm_{key}.exit"] = round(r_ex, 4)
            ratio_lines.append(f"  asyncvmm / {label}: guest's first byte {r_gb:.3f}×, exit {r_ex:.3f}×")
    no_acpi = figs.get("startup.asyncvmm_no_acpi.exit_s")
    if a_ex is not None and no_acpi is not None:
        figs["startup.acpi_added_ms"] = round((a_ex - no_acpi) * 1e3, 2)
        ratio_lines.append(f"  the ACPI tables and PM block: asyncvmm - asyncvmm --no-acpi = {(a_ex - no_acpi) * 1e3:+.1f} ms"
                           f" to exit ({ratio(a_ex, no_acpi):.3f}×)")
    build_ms = acpi_build_ms()
    for cpus, ms in build_ms.items():
        figs[f"startup.acpi_build_{cpus}cpus_ms"] = round(ms, 3)
    ratio_lines.append("  building the tables in the VMM (median of 200): "
                       + ", ".join(f"-c {c}: {ms:.2f} ms" for c, ms in build_ms.items()))
    out += ratio_lines
    out.append("  (QEMU's first byte is SeaBIOS's banner: it boots the PVH ELF through its firmware;"
               " 'guest's 1st byte' is the first byte of \"hello from the guest\".)")
    return "\n".join(out), figs


def acpi_build_ms(cpus=(1, 2, 16), n: int = 200) -> dict[int, float]:
    """What asyncvmm.boot.acpi.build costs per boot, timed in a child of the venv's Python."""
    code = (
        "import statistics, sys, time\n"
        "from asyncvmm.boot import acpi\n"
        f"for c in {tuple(cpus)!r}:\n"
        "    ts = []\n"
        f"    for _ in range({n}):\n"
        "        t = time.perf_counter(); acpi.build(list(range(c)), 256 << 20); ts.append(time.perf_counter() - t)\n"
        "    print(c, statistics.median(ts) * 1e3)\n"
    )
    status, out, err = run_capture([VENV_PY, "-c", code], 60)
    if status != 0:
        return {}
    return {int(c): float(ms) for c, ms in (line.split() for line in out.splitlines())}


# ---------------------------------------------------------------------------------------
# 2. Exit round trip
# ---------------------------------------------------------------------------------------

def exits_child(spec: str) -> int:
    """In a child process: boot exitbench with n=0 and n=N at one port, in this process,
    timing `await machine.run()` only (the build is excluded). Prints one JSON line."""
    import asyncio  # noqa: PLC0415

    sys.path.insert(0, str(ROOT))
    from asyncvmm import log  # noqa: PLC0415
    from asyncvmm.config import VmConfig  # noqa: PLC0415
    from asyncvmm.console import FileConsole  # noqa: PLC0415
    from asyncvmm.loop import loop_name, run  # noqa: PLC0415
    from asyncvmm.machine import BootImages, Machine, StopReason  # noqa: PLC0415

    args = json.loads(spec)
    log.set_quiet(True)

    async def one(n: int, port: int) -> dict:
        cfg = VmConfig(memory=64 * MiB, kernel=str(GUESTS / "exitbench.elf"),
                       cmdline=f"n={n} port={port:#x}", no_reboot=True).validate()
        console = FileConsole("/dev/null")
        m = Machine(cfg, console, BootImages.load(cfg))
        try:
            m.build()
            t0 = time.perf_counter()
            task = asyncio.ensure_future(m.run())
            # Watchdog: the whole run is bounded, and so is a stall (no exit for STALL_S).
            deadline = t0 + args["timeout"]
            last, last_change = -1, time.perf_counter()
            while not task.done():
                await asyncio.wait([task], timeout=0.5)
                if task.done():
                    break
                now = time.perf_counter()
                count = sum(m.vcpu_stats(0)["exits"].values())
                if count != last:
                    last, last_change = count, now
                why = None
                if now - last_change > STALL_S:
                    why = f"stalled: no exit for {STALL_S:.0f} s"
                elif now > deadline:
                    why = f"did not end within {args['timeout']:.0f} s"
                if why:
                    stats = m.vcpu_stats(0)
                    task.cancel()
                    await asyncio.wait([task], timeout=2)
                    raise SystemExit(f"exitbench n={n} port={port:#x} {why} (stats: {stats})")
            stop = task.result()
            seconds = time.perf_counter() - t0
            stats = m.vcpu_stats(0)
            stats["exit_hist"] = exit_histogram(m, 0)
            stats["cycle_hist"] = exit_histogram(m, 0, "avmm_vcpu_cycle_hist")
        finally:
            m.close()
            console.close()
        if stop.reason is not StopReason.RESET:
            raise SystemExit(f"exitbench n={n} port={port:#x}: stopped with {stop.reason.value}: {stop.message}")
        return {"n": n, "seconds": seconds, "stats": stats}

    async def main() -> list[dict]:
        return [await one(0, args["port"]), await one(args["n"], args["port"])]

    result = run(main())
    print(json.dumps({"loop": loop_name(), "runs": result}))
    return 0


def exit_histogram(m, i: int, which: str = "avmm_vcpu_exit_hist") -> list[list[int]]:
    """vCPU i's per-exit latency histogram (cext: avmm_vcpu_exit_hist, the time out of
    KVM_RUN; avmm_vcpu_cycle_hist, the round trip), as [from ns, to ns, count] for the
    buckets that have counts; [] from a C core without one."""
    from asyncvmm._native import ffi, lib  # noqa: PLC0415

    if not hasattr(lib, which):
        return []
    vcpus = getattr(m, "vcpus", None)
    cvm = vcpus.cvm if hasattr(vcpus, "cvm") else m._cvm  # the C VM: where this commit keeps it
    buf = ffi.new("uint64_t[]", lib.AVMM_HIST_BUCKETS)
    n = getattr(lib, which)(cvm, i, buf, lib.AVMM_HIST_BUCKETS)
    return [[lib.avmm_hist_bucket_ns(b), lib.avmm_hist_bucket_ns(b + 1), buf[b]] for b in range(max(n, 0)) if buf[b]]


def hist_percentile(hist: list[list[int]], q: float) -> float | None:
    """The q-quantile (0..1) of a histogram of [from ns, to ns, count], in µs: the middle of
    the bucket it falls in (a bucket is at most 12.5% wide)."""
    total = sum(c for _, _, c in hist)
    if not total:
        return None
    seen = 0
    for lo, hi, c in hist:
        seen += c
        if seen >= q * total:
            return (lo + hi) / 2 / 1e3
    return hist[-1][1] / 1e3


def asyncvmm_exits(port: int, n: int, timeout: float) -> dict:
    spec = json.dumps({"port": port, "n": n, "timeout": timeout})
    status, out, err = run_capture([VENV_PY, Path(__file__).resolve(), "--child-exits", spec], timeout + 15)
    if status != 0:
        why = "timed out" if status is None else f"status {status}"
        raise BenchError(f"asyncvmm exitbench port {port:#x} {why}: {tail(err) or tail(out)}")
    data = json.loads(out.strip().splitlines()[-1])
    r0, rn = data["runs"]
    st = rn["stats"]
    exits = sum(st["exits"].values())
    served = st["fast_io"] if port == 0x3F8 else st["posted"]
    if served < n:
        raise BenchError(f"asyncvmm port {port:#x}: only {served} of {n} exits took the expected path ({st})")
    return {
        "us": (rn["seconds"] - r0["seconds"]) * 1e6 / n,
        "in_run_us": st["ns_in_run"] / exits / 1e3 if exits else None,
        "wait_us": st["ns_waiting"] / st["posted"] / 1e3 if st["posted"] else None,
        "p50_us": hist_percentile(st.get("exit_hist", []), 0.50),
        "p99_us": hist_percentile(st.get("exit_hist", []), 0.99),
        "cycle_p50_us": hist_percentile(st.get("cycle_hist", []), 0.50),
        "cycle_p99_us": hist_percentile(st.get("cycle_hist", []), 0.99),
        "loop": data["loop"],
    }


_RAW_RE = re.compile(r"rawkvm: exits=(\d+) io_exits=(\d+) seconds=([\d.]+)")
_RAW_CYCLE_RE = re.compile(r"rawkvm: cycle_p50_us=([\d.]+) cycle_p99_us=([\d.]+)")


def rawkvm_seconds(cmdline: str, timeout: float) -> tuple[float, int, dict]:
    status, out, err = run_capture([RAWKVM, GUESTS / "exitbench.elf", cmdline], timeout)
    m = _RAW_RE.search(err)
    if status != 0 or not m:
        why = "timed out" if status is None else f"status {status}"
        raise BenchError(f"rawkvm {cmdline!r} {why}: {tail(err)}")
    if "exitbench done" not in out:
        raise BenchError(f"rawkvm {cmdline!r}: the guest did not finish: {tail(out)}")
    c = _RAW_CYCLE_RE.search(err)  # a rawkvm built before it printed its cycle percentiles: none
    cycle = {"cycle_p50_us": float(c.group(1)), "cycle_p99_us": float(c.group(2))} if c else {}
    return float(m.group(3)), int(m.group(2)), cycle


def rawkvm_exits(port: int, n: int, timeout: float) -> dict:
    s0, _, _ = rawkvm_seconds(f"n=0 port={port:#x}", 20)
    sn, io, cycle = rawkvm_seconds(f"n={n} port={port:#x}", timeout)
    if io < n:
        raise BenchError(f"rawkvm port {port:#x}: {io} I/O exits, expected at least {n}")
    return {"us": (sn - s0) * 1e6 / n, **cycle}


def bench_exits(n: int, reps: int, kind: str, notes: list[str]) -> tuple[str, dict]:
    # Generous bound per run: 150 µs per exit plus start-up.
    timeout = 20 + n * 150e-6
    a: dict[int, list[dict]] = {p: [] for p, _, _ in EXIT_PATHS}
    r: dict[int, list[dict]] = {p: [] for p, _, _ in EXIT_PATHS}
    loop = "?"
    failed: dict[tuple[str, int], str] = {}  # (vmm, port) -> why; that cell is dropped
    for _ in range(reps):
        for port, label, _ in EXIT_PATHS:
            for vmm, fn, store in (("asyncvmm", asyncvmm_exits, a), ("rawkvm", rawkvm_exits, r)):
                if (vmm, port) in failed:
                    continue
                try:
                    x = fn(port, n, timeout)
                except (BenchError, ValueError, KeyError, IndexError) as e:
                    failed[(vmm, port)] = str(e)
                    _failures.append(f"exits {vmm} {port:#x}")
                    notes.append(f"exits: {vmm} at {port:#x} ({label}) failed, dropped: {e}")
                    continue
                loop = x.get("loop", loop)
                store[port].append(x)
    if len(failed) == 2 * len(EXIT_PATHS):
        raise BenchError("every exit benchmark failed (see notes)")

    figs: dict = {"exits.n": n, "exits.reps": reps, "exits.loop": loop}
    rows = []
    for port, label, path in EXIT_PATHS:
        au = med([x["us"] for x in a[port]])
        ru = med([x["us"] for x in r[port]])
        added = au - ru if au is not None and ru is not None else None
        in_run = med([x["in_run_us"] for x in a[port]])
        loop_path = path == "loop"
        wait = med([x["wait_us"] for x in a[port]]) if loop_path else None
        p50 = med([x.get("p50_us") for x in a[port]]) if loop_path else None
        p99 = med([x.get("p99_us") for x in a[port]]) if loop_path else None
        # The round trip's percentiles: asyncvmm's posted exits (KVM_RUN return to the next)
        # beside rawkvm's period between exits; the difference at p50 is what the target judges.
        ac50, ac99 = (med([x.get(k) for x in a[port]]) if loop_path else None for k in ("cycle_p50_us", "cycle_p99_us"))
        rc50, rc99 = (med([x.get(k) for x in r[port]]) if loop_path else None for k in ("cycle_p50_us", "cycle_p99_us"))
        added50 = ac50 - rc50 if ac50 is not None and rc50 is not None else None
        added99 = ac99 - rc99 if ac99 is not None and rc99 is not None else None
        judged = added50 if loop_path else added
        limit = TARGET_LOOP_ADDED_US if loop_path else TARGET_FAST_ADDED_US
        key = f"exits.{port:#x}"
        for name, v in (("asyncvmm_us", au), ("rawkvm_us", ru), ("added_us", added),
                        ("asyncvmm_in_kvm_run_us", in_run), ("asyncvmm_loop_wait_us", wait),
                        ("asyncvmm_out_p50_us", p50), ("asyncvmm_out_p99_us", p99),
                        ("asyncvmm_cycle_p50_us", ac50), ("asyncvmm_cycle_p99_us", ac99),
                        ("rawkvm_cycle_p50_us", rc50), ("rawkvm_cycle_p99_us", rc99),
                        ("added_p50_us", added50), ("added_p99_us", added99)):
            if v is not None:
                figs[f"{key}.{name}"] = round(v, 3)
        spread = (max(x["us"] for x in a[port]) - min(x["us"] for x in a[port])) / 2 if a[port] else None
        what = "p50" if loop_path else "mean"
        rows.append([label, f"{port:#x}", fmt(au, ".2f", "FAILED"), fmt(ru, ".2f", "FAILED"), fmt(added, "+.2f"),
                     fmt(added50, "+.2f"), fmt(added99, "+.1f"),
                     f"{what} ≤ {limit:g}: {verdict(judged, limit)}" if judged is not None else f"{what} ≤ {limit:g}",
                     fmt(in_run, ".2f"), fmt(wait, ".2f"), fmt(p50, ".2f"), fmt(p99, ".1f"),
                     "—" if spread is None else f"±{spread:.2f}"])
    out = [f"2. exit round trip: build/guests/exitbench.elf n={n}; median of {reps} runs, µs per exit = "
           f"(t[n={n}] − t[n=0]) / {n}",
           table(["path", "port", "asyncvmm", "rawkvm", "added mean", "added p50", "added p99", "target (added)",
                  "in KVM_RUN", "loop wait", "out p50", "out p99", "asyncvmm ±"], rows, "llrrrrrlrrrrr")]
    out.append(f"  asyncvmm: timed in-process around `await Machine.run()` ({loop}); rawkvm: its own "
               "CLOCK_MONOTONIC figure, same guest, same port.")
    out.append("  'added mean' = asyncvmm − rawkvm per exit (the means); 'added p50/p99' = the percentile of asyncvmm's round"
               " trips through the loop (a posted exit's KVM_RUN return to the next) − the same percentile of rawkvm's")
    out.append("  period between exits (both from log-linear histograms, buckets ≤ 12.5 % wide). The loop paths' target"
               " is judged on 'added p50' (the issue's wording), the C fast path's on the mean.")
    out.append("  'in KVM_RUN': the vCPU thread's time inside KVM_RUN per exit; 'loop wait': its wait"
               " for the loop per exit posted to it.")
    out.append("  'out p50/p99': each posted exit's time out of KVM_RUN (its return to the next entry: the hand-off"
               " to the loop and back), from a histogram the vCPU thread keeps; rawkvm's is ~0.")
    floor = wakeup_floor()
    for (mode, place), (p50_, p99_) in floor.items():
        figs[f"exits.wakeup.{mode}_{place}.p50_us"] = p50_
        figs[f"exits.wakeup.{mode}_{place}.p99_us"] = p99_
    if floor:
        out.append("  the hand-off's floor on this host (build/perf/wakeup, a C two-thread ping-pong, one round = two"
                   " hand-offs as one posted exit; p50/p99 µs):")
        out.append("    " + "; ".join(f"{m} {pl}: {a:.2f}/{b:.1f}" for (m, pl), (a, b) in floor.items()))
        out.append("    (2cpu: the threads pinned to two CPUs, 1cpu: to one; futex: both sleep; spin: neither does)")
    if kind == "kvm_pvm":
        raw = med([x["us"] for p, _, _ in EXIT_PATHS for x in r[p]])
        if raw is not None:
            out.append(f"  NOTE: on this kvm_pvm host most of every exit is KVM's instruction emulator itself "
                       f"(rawkvm, a bare C KVM_RUN loop: {raw:.1f} µs/exit);")
            out.append("  on hardware KVM an exit typically costs ~1–2 µs (not measured here); the 'added' column is what asyncvmm controls.")
    return "\n".join(out), figs


_WAKEUP_RE = re.compile(r"wakeup (\w+) (\w+) rounds=\d+ p50_us=([\d.]+) p90_us=[\d.]+ p99_us=([\d.]+)")


def wakeup_floor(rounds: int = 5000) -> dict[tuple[str, str], tuple[float, float]]:
    """A sleeping (futex) and a spinning hand-off between two threads, pinned to two CPUs
    and to one: {(mode, placement): (p50 µs, p99 µs)}; {} without build/perf/wakeup."""
    if not WAKEUP.exists():
        return {}
    status, out, _ = run_capture([WAKEUP, str(rounds), "futex", "spin"], 60)
    if status != 0:
        return {}
    return {(m.group(1), m.group(2)): (float(m.group(3)), float(m.group(4)))
            for m in _WAKEUP_RE.finditer(out) if m.group(2) != "free"}


# ---------------------------------------------------------------------------------------
# 3. VMM memory
# ---------------------------------------------------------------------------------------

def smaps(pid: int) -> list[dict]:
    maps = []
    cur = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            first = line.split(None, 1)[0]
            if "-" in first and not first.endswith(":"):
                parts = line.split(None, 5)
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                cur = {"size": hi - lo, "inode": parts[4], "name": parts[5].strip() if len(parts) > 5 else "", "rss": 0}
                maps.append(cur)
            elif first == "Rss:" and cur is not None:
                cur["rss"] = int(line.split()[1]) * 1024
    return maps


def rss_split(pid: int, slot_sizes: list[int]) -> tuple[int, int, list[int]]:
    """(total RSS, RSS of the guest RAM mappings, sizes of the mappings taken as guest RAM).
    Guest RAM = anonymous mappings (no file, no [name]) whose size is exactly a RAM slot's."""
    maps = smaps(pid)
    total = sum(m["rss"] for m in maps)
    guest, found = 0, []
    anon = [m for m in maps if m["inode"] == "0" and not m["name"]]
    for size in slot_sizes:
        cands = [m for m in anon if m["size"] == size]
        if not cands:
            continue
        m = max(cands, key=lambda m: m["rss"])
        anon.remove(m)
        guest += m["rss"]
        found.append(size)
    return total, guest, found


def slot_sizes_asyncvmm(size: int) -> list[int]:
    # asyncvmm.vstate.memory.ram_layout: RAM below the 32-bit MMIO hole at 3 GiB, the rest above 4 GiB.
    low = min(size, 0xC000_0000)
    return [low] + ([size - low] if size > low else [])


def slot_sizes_qemu(size: int) -> list[int]:
    return [size]  # QEMU maps pc.ram as one block and aliases it around the hole


def measure_rss(label: str, argv: list[str], slot_sizes: list[int], samples: int, expect_status: set,
                notes: list[str]) -> dict | None:
    with tempfile.NamedTemporaryFile(prefix="bench-console-") as out, tempfile.TemporaryFile() as err:
        p = spawn(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        res = None
        try:
            deadline = time.monotonic() + 15
            seen = False
            while time.monotonic() < deadline and not _exited(p):
                with open(out.name, "rb") as f:
                    if COUNTER_MARKER in f.read():
                        seen = True
                        break
                time.sleep(0.05)
            if not seen:
                err.seek(0)
                why = "exited" if _exited(p) else "timed out"
                notes.append(f"memory: {label}: the guest never printed {COUNTER_MARKER!r} ({why}): "
                             f"{tail(err.read().decode(errors='replace'))}")
                return None
            best = None
            for _ in range(samples):
                time.sleep(0.3)
                if _exited(p):
                    break
                total, guest, found = rss_split(p.pid, slot_sizes)
                if found != slot_sizes:
                    notes.append(f"memory: {label}: guest RAM mapping(s) of {[s // MiB for s in slot_sizes]} MiB "
                                 f"not all found in smaps (found {[s // MiB for s in found]})")
                sample = {"total": total, "guest": guest, "vmm": total - guest}
                if best is None or sample["vmm"] > best["vmm"]:
                    best = sample
            res = best
        finally:
            status = finish(p, 10, signal.SIGTERM)
        if status not in expect_status:
            err.seek(0)
            notes.append(f"memory: {label}: exit status after SIGTERM was {status}, expected "
                         f"{sorted(expect_status)}: {tail(err.read().decode(errors='replace'))}")
        return res


def bench_memory(samples: int, qemu: str | None, notes: list[str]) -> tuple[str, dict]:
    mem = 1024 * MiB
    counter = GUESTS / "counter.elf"
    runs = [("asyncvmm", "asyncvmm",
             [ASYNCVMM, "run", "-m", "1024", "--kernel", counter, "--no-reboot", "-q"],
             slot_sizes_asyncvmm(mem), {4})]
    if qemu:
        runs.append(("qemu_tcg", "qemu -accel tcg",
                     [qemu, "-accel", "tcg", "-kernel", counter, "-m", "1024", "-nographic", "-no-reboot",
                      "-serial", "stdio", "-display", "none", "-nodefaults", "-monitor", "none"],
                     slot_sizes_qemu(mem), {0, -signal.SIGTERM}))
    figs: dict = {}
    rows = []
    for key, label, argv, slots, expect in runs:
        r = measure_rss(label, argv, slots, samples, expect, notes)
        if r is None:
            _failures.append(f"memory {key}")
            rows.append([label, "—", "—", "—", "FAILED"])
            continue
        figs[f"memory.{key}.total_rss_mib"] = round(r["total"] / MiB, 2)
        figs[f"memory.{key}.guest_ram_rss_mib"] = round(r["guest"] / MiB, 2)
        figs[f"memory.{key}.vmm_rss_mib"] = round(r["vmm"] / MiB, 2)
        target = f"≤ {TARGET_VMM_RSS_MIB:g} MiB: {verdict(r['vmm'] / MiB, TARGET_VMM_RSS_MIB)}" if key == "asyncvmm" else "reference"
        rows.append([label, f"{r['total'] / MiB:.1f}", f"{r['guest'] / MiB:.1f}", f"{r['vmm'] / MiB:.1f}", target])
    if not qemu:
        rows.append(["qemu -accel tcg", "—", "—", "—", "not run (no qemu-system-x86_64)"])
    out = [f"3. VMM memory: build/guests/counter.elf running, -m 1024; MiB from /proc/PID/smaps "
           f"(largest of {samples} samples)",
           table(["", "total RSS", "guest RAM RSS", "VMM RSS", "target"], rows, "lrrrl")]
    a, q = figs.get("memory.asyncvmm.vmm_rss_mib"), figs.get("memory.qemu_tcg.vmm_rss_mib")
    if a is not None and q:
        figs["memory.ratio_asyncvmm_qemu_tcg"] = round(a / q, 4)
        out.append(f"  asyncvmm / qemu -accel tcg (VMM RSS): {a / q:.3f}×")
    out.append("  VMM RSS = all Rss − Rss of the anonymous mapping(s) the size of the guest RAM slots"
               " (QEMU's TCG code buffer counts as VMM).")
    return "\n".join(out), figs


# ---------------------------------------------------------------------------------------

BENCHMARKS = ("startup", "exits", "memory", "blk", "net", "loader")
OPT_IN = ("firmware",)  # minutes per run: only when named in --only (perf/firmware.py)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="asyncvmm machine-core benchmarks vs their anchors (see perf/README.md)")
    ap.add_argument("--quick", action="store_true", help="fewer runs and n=20000 exits (< 30 s)")
    ap.add_argument("--only", default=",".join(BENCHMARKS), metavar="LIST",
                    help="comma-separated subset of " + ",".join(BENCHMARKS) + " (and " + ",".join(OPT_IN) + ", opt-in)")
    ap.add_argument("--no-history", action="store_true", help="do not append to perf/history.jsonl")
    ap.add_argument("--no-qemu", action="store_true", help="leave out the QEMU columns (they take seconds each)")
    ap.add_argument("--json", metavar="PATH", help="also write this run's record (the history line) to PATH")
    ap.add_argument("--root", metavar="DIR", help="benchmark the checkout in DIR (set up with tools/setup --perf)")
    ap.add_argument("--child-exits", metavar="JSON", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_exits:
        return exits_child(args.child_exits)
    if args.root:
        root = Path(args.root).resolve()
        py = root / ".venv" / "bin" / "python"
        if not py.exists():
            print(f"bench: --root {args.root}: no .venv there (run tools/setup --perf in it)", file=sys.stderr)
            return 2
        # The in-process benchmarks (blk) import asyncvmm: run under that checkout's venv.
        os.environ["ASYNCVMM_BENCH_ROOT"] = str(root)
        rest = list(sys.argv[1:] if argv is None else argv)
        i = rest.index("--root") if "--root" in rest else -1
        rest = rest[:i] + rest[i + 2:] if i >= 0 else [a for a in rest if not a.startswith("--root=")]
        os.execv(str(py), [str(py), str(Path(__file__).resolve()), *rest])

    which = [w.strip() for w in args.only.split(",") if w.strip()]
    bad = [w for w in which if w not in BENCHMARKS + OPT_IN]
    if bad or not which:
        ap.error(f"--only: unknown benchmark(s) {', '.join(bad) or '(none)'}; choose from {','.join(BENCHMARKS + OPT_IN)}")

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    notes: list[str] = []
    try:
        check_prerequisites(which)
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    qemu = None if args.no_qemu else shutil.which("qemu-system-x86_64")
    if args.no_qemu:
        notes.append("QEMU columns left out (--no-qemu)")
    elif not qemu and ("startup" in which or "memory" in which):
        notes.append("qemu-system-x86_64 not found: QEMU columns skipped (install it: tools/setup --perf)")

    kind = kvm_kind()
    started = time.monotonic()
    record = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": history.machine_id(),
        "machine_info": history.machine_info(),
        "host_kernel": os.uname().release,
        "kvm": kind,
        "cpus": os.cpu_count(),
        "qemu": qemu_version(qemu) if qemu else None,
        "python": sys.version.split()[0],
        "mode": "quick" if args.quick else "full",
        "only": which,
    }
    print(f"asyncvmm perf — {record['date']}  commit {record['commit']}  kernel {record['host_kernel']}  "
          f"KVM {kind}  {record['cpus']} CPUs  QEMU {record['qemu'] or 'missing'}"
          + ("  [quick]" if args.quick else ""))
    print()
    figures: dict = {}
    watch = LoadWatch()
    load_start = os.getloadavg()[0]
    status = 0
    try:
        for name in which:
            t_section = time.monotonic()
            try:
                if name == "startup":
                    text, figs = bench_startup(3 if args.quick else 7, qemu, notes)
                elif name == "exits":
                    text, figs = bench_exits(20000 if args.quick else 200000, 3, kind, notes)
                elif name == "memory":
                    text, figs = bench_memory(2 if args.quick else 3, qemu, notes)
                elif name == "loader":
                    from loader import bench_loader  # noqa: PLC0415 (perf/loader.py)

                    text, figs = bench_loader(args.quick, notes)
                elif name == "firmware":
                    from firmware import bench_firmware  # noqa: PLC0415 (perf/firmware.py)

                    text, figs = bench_firmware(args.quick, notes)
                elif name == "blk":
                    from blk import bench_blk  # noqa: PLC0415 (perf/blk.py)

                    text, figs = bench_blk(args.quick, notes)
                else:
                    from net import bench_net  # noqa: PLC0415 (perf/net.py)

                    text, figs = bench_net(args.quick, notes)
            except (BenchError, RuntimeError) as e:
                text, figs = f"{name}: FAILED: {e}", {}
                notes.append(f"{name}: {e}")
                status = 1
            figures.update(figs)
            figures[f"{name}.seconds"] = round(time.monotonic() - t_section, 1)
            print(text, flush=True)
            print(flush=True)
    except KeyboardInterrupt:
        _kill_all_live()
        print("bench: interrupted; no history written", file=sys.stderr)
        return 130
    finally:
        _kill_all_live()
        busy = watch.stop()

    notes += [f"leftover: {x}" for x in _leftovers]
    if _failures:
        status = 1
    if busy:
        notes.append(f"the host was not idle: {len(busy)} other VMM/test process(es) seen during the run "
                     "(figures may be skewed):")
        notes += [f"  {b}" for b in busy[:6]]
    record["load_1m_at_start"] = round(load_start, 2)
    record["other_processes_seen"] = len(busy)
    elapsed = time.monotonic() - started
    if notes:
        print("notes:")
        for n in notes:
            print(f"    {n}" if n.startswith("  ") else f"  - {n}")
    record["seconds"] = round(elapsed, 1)
    record["figures"] = figures
    if notes:
        record["notes"] = notes
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, ensure_ascii=False)
    if not args.no_history:
        history.append(record, HISTORY)
        print(f"({elapsed:.0f} s; appended to {HISTORY})")
    else:
        print(f"({elapsed:.0f} s; history not written)")
    return status


if __name__ == "__main__":
    sys.exit(main())
