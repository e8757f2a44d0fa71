"""Run fuzz targets: `tools/fuzz [TARGET ...] [--seconds N]` (see tests/fuzz/README.md).

Python targets (targets.py) run under atheris, libFuzzer's engine for Python: the
asyncvmm package is instrumented for coverage. C targets (c/fuzz_*.c) are libFuzzer
binaries built with ASan and UBSan (clang; `tools/setup --fuzz` installs it). Each run
starts from the committed seeds (corpus/TARGET) plus what earlier runs found
(build/fuzz/corpus/TARGET); a crash is saved as build/fuzz/crashes/TARGET-crash-*, and
the summary line says how many inputs ran, the coverage reached and the crashes.

Without atheris the Python targets fall back to `--engine replay`: the seeds, then random
mutations of them, for the time given — no coverage guidance; the summary says so.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
BUILD = ROOT / "build" / "fuzz"
C_TARGETS = ("fuzz_virtq", "fuzz_blk", "fuzz_net", "fuzz_net_stream", "fuzz_exit")
MAX_LEN = {"boot": 16384, "snapshot": 16384, "unpack": 4096, "control": 2048, "fuzz_virtq": 8192, "fuzz_blk": 8192, "fuzz_net": 8192, "fuzz_net_stream": 8192, "fuzz_exit": 4096}


def py_targets() -> list[str]:
    sys.path.insert(0, str(HERE))
    import targets  # noqa: PLC0415

    return list(targets.TARGETS)


def build_c() -> str | None:
    """Build the C targets; None, or why they cannot be built here."""
    if shutil.which("clang") is None:
        return "clang is not installed (tools/setup --fuzz installs it)"
    r = subprocess.run(["make", "-s", "-C", str(HERE / "c"), f"OUT={BUILD}"], capture_output=True, text=True)
    if r.returncode:
        return f"building the C targets failed:\n{r.stdout}{r.stderr}"
    return None


def have_atheris() -> bool:
    try:
        import atheris  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def child(target: str, argv: list[str]) -> None:
    """Inside the fuzzing process: instrument asyncvmm, then hand over to atheris."""
    import atheris  # noqa: PLC0415

    sys.path.insert(0, str(HERE))
    with atheris.instrument_imports(include=["asyncvmm", "targets"]):
        import targets  # noqa: PLC0415
    fn = targets.TARGETS[target]
    atheris.Setup([sys.argv[0], *argv], fn)
    atheris.Fuzz()


def replay(target: str, seconds: float, seeds: list[Path]) -> dict:
    """No atheris: the seeds, then random mutations (bit flips, byte sets, cuts, splices)."""
    sys.path.insert(0, str(HERE))
    import targets  # noqa: PLC0415

    fn = targets.TARGETS[target]
    pool = [p.read_bytes() for p in seeds] or [b""]
    rng = random.Random(0)
    runs = 0
    deadline = time.monotonic() + seconds
    for data in pool:
        fn(data)
        runs += 1
    while time.monotonic() < deadline:
        data = bytearray(rng.choice(pool))
        for _ in range(rng.randint(1, 8)):
            k = rng.randrange(4)
            if k == 0 and data:
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            elif k == 1 and data:
                data[rng.randrange(len(data))] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
            elif k == 2 and len(data) > 1:
                del data[rng.randrange(len(data)) :]
            else:
                data += rng.choice(pool)[: rng.randrange(64)]
        fn(bytes(data))
        runs += 1
    return {"runs": runs, "cov": None, "ft": None, "corpus": len(pool), "crashes": 0, "engine": "replay"}


STATUS = re.compile(r"#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)")


def run_target(target: str, seconds: float, engine: str, log_dir: Path, work: Path | None = None) -> dict:
    """Fuzz one target for `seconds`; new inputs go to `work` (default build/fuzz/corpus/TARGET)."""
    seeds_dir = HERE / "corpus" / target
    seeds = sorted(seeds_dir.glob("*")) if seeds_dir.is_dir() else []
    if engine == "replay" and target not in C_TARGETS:
        return replay(target, seconds, seeds)
    work = work or BUILD / "corpus" / target
    crashes = BUILD / "crashes"
    work.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    args = [
        f"-max_total_time={max(1, int(seconds))}",
        f"-max_len={MAX_LEN.get(target, 1024)}",
        "-print_final_stats=1",
        "-timeout=10",
        "-rss_limit_mb=2048",
        f"-artifact_prefix={crashes}/{target}-",
        str(work),
    ]
    if seeds:
        args.append(str(seeds_dir))
    if target in C_TARGETS:
        cmd = [str(BUILD / target), *args]
    else:
        cmd = [sys.executable, __file__, "--child", target, "--", *args]
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{target}.log"
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1")
    with open(log, "w") as out:
        r = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    text = log.read_text(errors="replace")
    status = STATUS.findall(text)
    runs = re.search(r"stat::number_of_executed_units:\s*(\d+)", text)
    last = status[-1] if status else ("0", "0", "0", "0")
    found = [m for m in re.findall(r"Test unit written to (\S+)", text)]
    return {
        "runs": int(runs.group(1)) if runs else int(last[0]),
        "cov": int(last[1]),
        "ft": int(last[2]),
        "corpus": int(last[3]),
        "crashes": len(found) if found else (1 if r.returncode else 0),
        "artifacts": found,
        "rc": r.returncode,
        "log": str(log),
        "engine": "libFuzzer" if target in C_TARGETS else "atheris",
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(argv[1], argv[3:])
        return 0
    names = py_targets() + list(C_TARGETS)
    p = argparse.ArgumentParser(prog="tools/fuzz", description="Run asyncvmm's fuzz targets.")
    p.add_argument("targets", nargs="*", metavar="TARGET", help=f"default: all ({', '.join(names)})")
    p.add_argument("--seconds", type=float, default=60, help="per target (default 60)")
    p.add_argument("--engine", choices=("auto", "atheris", "replay"), default="auto",
                   help="Python targets: atheris (coverage-guided), replay (seeds + random mutations)")
    p.add_argument("--list", action="store_true", help="list the targets")
    a = p.parse_args(argv)
    if a.list:
        print("\n".join(names))
        return 0
    for t in a.targets:
        if t not in names:
            print(f"tools/fuzz: no target {t!r} (known: {', '.join(names)})", file=sys.stderr)
            return 2
    todo = a.targets or names
    engine = a.engine
    if engine == "auto":
        engine = "atheris" if have_atheris() else "replay"
    elif engine == "atheris" and not have_atheris():
        print("tools/fuzz: atheris is not installed (pip install atheris)", file=sys.stderr)
        return 2
    if any(t in C_TARGETS for t in todo):
        why = build_c()
        if why:
            print(f"tools/fuzz: {why}", file=sys.stderr)
            return 2
    failed = 0
    for t in todo:
        res = run_target(t, a.seconds, engine, BUILD / "logs")
        cov = "n/a (replay: no coverage)" if res["cov"] is None else f"cov {res['cov']} ft {res['ft']}"
        print(f"fuzz: {t} [{res['engine']}]: {res['runs']} inputs in {a.seconds:g} s, {cov}, "
              f"corpus {res['corpus']}, crashes {res['crashes']}", flush=True)
        if res["crashes"]:
            failed += 1
            for art in res.get("artifacts", []):
                print(f"fuzz: {t}: crash input {art} (log {res['log']})", flush=True)
            if not res.get("artifacts"):
                print(f"fuzz: {t}: exit status {res.get('rc')} (log {res.get('log')})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
