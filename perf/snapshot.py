"""Snapshot, restore and migration figures, for guests of 64 MiB to 4 GiB.

    .venv/bin/python perf/snapshot.py [--sizes 64M,256M,1G,4G] [--touched 0.25] [--runs 3]

For each RAM size the counter guest boots, `touched` of its RAM is filled from the host
(as a guest that has used that much memory would have it: non-zero pages), and then:

- snapshot: time (pause to file written) and size on disk (the file is sparse);
- restore: VM.from_snapshot + start() until the vCPUs run ("to first instruction"), and
  until the guest's first console line after it (a tick: it ran on from its state);
- migration (unix socket, same host): downtime and total time, for the same guest.

Medians of `runs`. Firecracker's published figures are printed beside them (its
docs/snapshotting/snapshot-support.md and its CI's snapshot tests: see the table's notes).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from asyncvmm import VM, VmConfig  # noqa: E402
from asyncvmm.config import parse_memory  # noqa: E402
from asyncvmm.loop import run as run_loop  # noqa: E402

GUEST = ROOT / "build" / "guests" / "counter.elf"

# Firecracker's published snapshot figures: the pass criteria of its CI's snapshot
# performance test (tests/integration_tests/performance/test_snapshot_perf.py, before it
# became a measurement without criteria), on m5d.metal hosts, 2 vCPUs; its
# docs/snapshotting/snapshot-support.md explains the MAP_PRIVATE restore that keeps load
# time flat in RAM size, and that a full snapshot writes all of guest memory.
FIRECRACKER = """Firecracker (CI pass criteria, x86_64 m5d.metal, 2 vCPUs):
  create FULL: 256 MiB 180 ms, 512 MiB 280 ms (grows with RAM: all of it is written)
  create DIFF: 256 MiB 70 ms, 512 MiB 75 ms (the dirty pages)
  load (restore): 256 and 512 MiB alike: 9 ms on a 4.14 host, 70-90 ms on 5.10 and ~250 ms
  on 6.1 (cgroups v1: its issue #2027); flat in RAM size (MAP_PRIVATE of the memory file)"""
FILL = bytes(range(1, 256)) * 4112  # non-zero bytes, ~1 MiB


def fill(vm: VM, fraction: float) -> int:
    """Write non-zero data over `fraction` of guest RAM above 16 MiB (the guest's own
    pages are below); bytes written."""
    mem = vm.machine.mem
    want = int(mem.size * fraction)
    done = 0
    for r in mem.regions:
        start = r.gpa + (16 << 20 if r.gpa == 0 else 0)
        end = r.end
        while done < want and start < end:
            n = min(len(FILL), end - start, want - done)
            mem.write(start, FILL[:n])
            start += n
            done += n
    return done


async def one(size: int, touched: float, tmp: str, i: int) -> dict:
    snap = os.path.join(tmp, f"s{i}.snap")
    cfg = VmConfig(name=f"perf-snap-{os.getpid()}-{i}", memory=size, kernel=str(GUEST), cmdline="delay=2000")
    out: dict = {}
    async with VM(cfg, control_socket=False) as vm:
        await vm.console.expect(rb"tick 3\n", timeout=30)
        await vm.pause()
        fill(vm, touched)
        await vm.resume()
        info = await vm.snapshot(snap, stop=True)
        out["snapshot_s"] = info["seconds"]
        out["file_mib"] = info["disk_bytes"] / (1 << 20)
    t0 = time.monotonic()
    vm2 = VM.from_snapshot(snap, name=f"perf-snap-r-{os.getpid()}-{i}", control_socket=False)
    await vm2.start()
    out["restore_to_run_s"] = time.monotonic() - t0
    try:
        await vm2.console.expect(rb"tick \d+\n", timeout=30)
        out["restore_to_tick_s"] = time.monotonic() - t0
        # Migration of the restored guest to a third VM on a unix socket.
        address = f"unix:{tmp}/m{i}.sock"
        from asyncvmm.snapshot.migrate import accept  # noqa: PLC0415

        async def destination():
            cfg3, incoming = await accept(address, name=f"perf-mig-{os.getpid()}-{i}", console=None)
            vm3 = VM(cfg3, control_socket=False)
            vm3._incoming = incoming
            await vm3.start()
            return vm3

        dest = asyncio.create_task(destination())
        while not os.path.exists(f"{tmp}/m{i}.sock"):
            await asyncio.sleep(0.001)
        m = await vm2.migrate(address)
        vm3 = await dest
        out["migrate_downtime_ms"] = m["downtime_ms"]
        out["migrate_s"] = m["seconds"]
        await vm3.console.expect(rb"tick \d+\n", timeout=30)
        await vm3.kill()
        await vm3.close()
    finally:
        await vm2.close()
        os.unlink(snap)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64M,256M,1G,4G")
    ap.add_argument("--touched", type=float, default=0.25)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    if not GUEST.exists():
        print("build the test guests first (tools/setup)", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="avmm-perf-snap-", dir="/tmp") as tmp:
        for text in args.sizes.split(","):
            size = parse_memory(text)
            runs = [run_loop(one(size, args.touched, tmp, k)) for k in range(args.runs)]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            rows.append((text, med))
            print(f"{text:>5}: " + ", ".join(f"{k} {v:.3f}" for k, v in med.items()), flush=True)
    print()
    print("RAM    touched  snapshot  file     restore->run  restore->tick  migration  downtime")
    for text, m in rows:
        print(f"{text:>5}  {args.touched:>6.0%}  {m['snapshot_s'] * 1000:>6.0f} ms  {m['file_mib']:>5.0f} MiB"
              f"  {m['restore_to_run_s'] * 1000:>8.1f} ms  {m['restore_to_tick_s'] * 1000:>9.1f} ms"
              f"  {m['migrate_s'] * 1000:>6.0f} ms  {m['migrate_downtime_ms']:>6.1f} ms")
    print("\n" + FIRECRACKER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
