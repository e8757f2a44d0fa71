"""startup_ir.py - where `asyncvmm run`'s start-up goes, in instructions (valgrind), not ms.

    .venv/bin/python perf/startup_ir.py [--quick]

On a shared 2-CPU host a start-up's wall time moves ±20 ms between minutes and its CPU
time with the load (caches, frequency), so a change of a few ms cannot be seen in either
(perf/ab.py at load 2 gives p-values of 0.3-0.7 for 5 %). The instructions a process
executes do not depend on the load: valgrind's count (cachegrind, no cache simulation)
is the same to ±0.2 % run to run. This prints that count for each step up from
`python -c pass` to a whole boot of hello.elf, and what Python 3.11 spends building one
dataclass and one enum class, with how many of each a plain boot builds. ~1 instruction
per 0.25-0.3 ns on this host when quiet (python -c pass: 39 M in ~11 ms).

seccomp is off in the runs under valgrind (valgrind does not know the seccomp system
call); the filters' set-up is a few hundred thousand instructions.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = str(ROOT / ".venv" / "bin" / "python")
HELLO = str(ROOT / "build" / "guests" / "hello.elf")
RUN = ["run", "-m", "64", "--kernel", HELLO, "--cmdline", "bench=startup", "--no-reboot", "-q"]
# What the design needs from the standard library before any asyncvmm code runs (the event
# loop, the command line, the log, the records); uvloop imports ssl itself.
STDLIB = "asyncio, uvloop, argparse, logging, dataclasses, typing, threading, datetime, mmap, queue, signal"

BOOT = r"""
import sys, json, dataclasses, enum
counts = {"dataclasses": 0, "enums": 0}
process = dataclasses._process_class
def counting(cls, *a, **k):
    if cls.__module__.startswith("asyncvmm"):
        counts["dataclasses"] += 1
    return process(cls, *a, **k)
dataclasses._process_class = counting
new = enum.EnumType.__new__
def counting_enum(mcls, name, bases, ns, **kw):
    cls = new(mcls, name, bases, ns, **kw)
    if cls.__module__.startswith("asyncvmm"):
        counts["enums"] += 1
        counts["members"] = counts.get("members", 0) + len(cls.__members__)
    return cls
enum.EnumType.__new__ = counting_enum
from asyncvmm.cli import main
status = main(sys.argv[1:])
sys.stderr.write("\nRESULT " + json.dumps({"status": status, "modules": sorted(m for m in sys.modules if m.startswith("asyncvmm")), **counts}) + "\n")
"""

ENTRY = "from asyncvmm.cli import entry\nentry()"  # the console script's: os._exit at the end

IMPORTS = """
import importlib, os, sys
for m in sys.argv[1].split(","):
    importlib.import_module(m)
os._exit(0)  # as the console script ends: no interpreter teardown (freeing the modules)
"""

DATACLASS = """
import dataclasses, sys
for i in range(int(sys.argv[1])):
    ns = {"__annotations__": {f"f{j}": "int" for j in range(5)}, "__module__": "__main__", "__doc__": "d"}
    dataclasses.dataclass(frozen=True)(type(f"D{i}", (), ns))
"""

ENUM = """
import enum, sys
for i in range(int(sys.argv[1])):
    enum.IntFlag(f"E{i}", {f"M{j}": 1 << j for j in range(8)})
"""


def instructions(argv: list[str], env: dict | None = None) -> int:
    """Instructions executed by `argv` and every thread it starts (cachegrind's I refs)."""
    r = subprocess.run(["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null", *argv],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    m = re.search(r"I\s+refs:\s+([\d,]+)", r.stderr)
    if r.returncode != 0 or not m:
        raise SystemExit(f"startup_ir: {' '.join(argv[:4])}... failed: {r.stderr[-400:]}")
    return int(m.group(1).replace(",", ""))


def stale_pycs(root: Path = ROOT) -> list[str]:
    """asyncvmm's modules whose .pyc is missing or older than the source. With
    PYTHONDONTWRITEBYTECODE set (as on these machines) Python never rewrites one, so each is
    compiled again at every start (console.py: ~25 M instructions) until tools/setup runs."""
    import importlib.util  # noqa: PLC0415

    out = []
    for src in sorted((root / "asyncvmm").rglob("*.py")):
        pyc = Path(importlib.util.cache_from_source(str(src)))
        try:
            head = pyc.read_bytes()[:16]
        except OSError:
            out.append(str(src.relative_to(root)))
            continue
        st = src.stat()
        if int.from_bytes(head[4:8], "little") == 0 and (  # timestamp-based: mtime and size
                int.from_bytes(head[8:12], "little") != int(st.st_mtime) & 0xFFFFFFFF
                or int.from_bytes(head[12:16], "little") != st.st_size & 0xFFFFFFFF):
            out.append(str(src.relative_to(root)))
    return out


def per_class(script: str, n: int = 20) -> float:
    return (instructions([PY, "-c", script, str(n)]) - instructions([PY, "-c", script, "0"])) / n


def main(argv: list[str]) -> int:
    if shutil.which("valgrind") is None:
        print("startup_ir: needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 2
    stale = stale_pycs()
    if stale:
        print(f"startup_ir: {len(stale)} stale .pyc ({', '.join(stale[:3])}...): run tools/setup first, "
              "or each is compiled at every start and counted", file=sys.stderr)
        return 2
    run_dir = tempfile.mkdtemp(prefix="startup-ir-")
    env = dict(os.environ, ASYNCVMM_SECCOMP="off", ASYNCVMM_RUN_DIR=run_dir)
    try:
        r = subprocess.run([PY, "-c", BOOT, *RUN], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
        line = [x for x in r.stderr.splitlines() if x.startswith("RESULT ")]
        if not line or "hello from the guest" not in r.stdout:
            raise SystemExit(f"startup_ir: the boot failed: {r.stderr[-400:]}")
        boot = json.loads(line[-1][len("RESULT "):])
        ours = ",".join(boot["modules"])
        steps = [
            ("python -c pass", [PY, "-c", "pass"]),
            ("+ the standard library the design needs", [PY, "-c", f"import {STDLIB}\nimport os\nos._exit(0)"]),
            ("  + asyncvmm's modules of a plain boot", [PY, "-c", f"import {STDLIB}\n" + IMPORTS, ours]),
            ("floor.py --sync (KVM, the guest; no asyncio)", [PY, "perf/floor.py", "--sync", HELLO, "bench=startup"]),
            ("floor.py (asyncio)", [PY, "perf/floor.py", HELLO, "bench=startup"]),
            ("floor.py --uvloop", [PY, "perf/floor.py", "--uvloop", HELLO, "bench=startup"]),
            ("asyncvmm run --no-acpi", [PY, "-c", ENTRY, *RUN, "--no-acpi"]),
            ("asyncvmm run", [PY, "-c", ENTRY, *RUN]),
        ]
        if "--quick" in argv:
            steps = [s for s in steps if not s[0].startswith("floor")]
        print("instructions executed (valgrind cachegrind I refs, whole process, all threads), hello.elf -m 64:")
        counted = {}
        for label, cmd in steps:
            counted[label] = n = instructions(cmd, env)
            print(f"  {label:48s} {n / 1e6:8.1f} M")
        dc, en = per_class(DATACLASS), per_class(ENUM)
        print(f"a plain boot builds {boot['dataclasses']} dataclasses and {boot['enums']} enum classes "
              f"({boot.get('members', 0)} members) of asyncvmm's; Python {sys.version.split()[0]} spends "
              f"{dc / 1e6:.2f} M instructions on a frozen dataclass of 5 fields, {en / 1e6:.2f} M on an IntFlag of 8 members")
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
