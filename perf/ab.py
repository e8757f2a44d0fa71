#!/usr/bin/env python3
"""A/B: has a change made asyncvmm faster or slower? Two checkouts, interleaved, one run.

    .venv/bin/python perf/ab.py A [B] [--rounds 5] [--only startup,exits,memory]
                                [--threshold 5] [--alpha 0.01] [--full] [--keep] [--no-history]
                                [--a-env VAR=VALUE] [--b-env VAR=VALUE]

A and B are commits (anything `git rev-parse` takes); B left out, or `.`, is this work
tree as it is, uncommitted changes included. `--a-env`/`--b-env` give one side's runs
an environment variable: `. . --b-env ASYNCVMM_BLK_URING_WAIT_NS=50000` compares a setting. Each commit is checked out with `git worktree
add` into a temporary directory and set up there (tools/setup --perf); the work tree is
used in place. Then `rounds` rounds run perf/bench.py (this checkout's, so both sides are
measured by the same harness) once on each side, alternating the order (AB, BA, AB, ...),
so a slow minute of a shared machine lands on both. For every figure the per-round values
of A and B go through a permutation test (perf/stats.py); a figure moved when p < alpha.

A **regression** is an asyncvmm figure (not an anchor's: rawkvm, QEMU, fio, the plain TAP
program, the interpreter) that got worse by more than `threshold` percent with p < alpha.
The anchors are compared too, and printed: an anchor that moved says the machine's
speed changed during the run, and how much any figure can be trusted.

Exit status: 0 no regression, 1 at least one regression, 2 bad arguments or a checkout
that cannot be set up, 3 a benchmark failed on a side (its figures are left out), 130
interrupted. The temporary checkouts are removed in every case (`--keep` leaves them).

Results: the per-round records go to build/perf/ab/<machine>/<date>-<A>-<B>.json, and one
line per side (the medians over the rounds, `"source": "ab"`) is appended to
perf/history.jsonl, so the plots (perf/plot.py) show A/B runs beside full runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import history
import stats

HARNESS = Path(__file__).resolve().parent / "bench.py"
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "build" / "perf" / "ab"
BENCHMARKS = ("startup", "exits", "memory", "blk", "net")
WORKTREE = "."


class AbError(Exception):
    pass


def git(*args: str, cwd: Path = ROOT) -> str:
    r = subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise AbError(f"git {' '.join(args)}: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout.strip()


def resolve(rev: str) -> str:
    if rev == WORKTREE:
        return WORKTREE
    try:
        return git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except AbError:
        raise AbError(f"{rev!r} is not a commit of this repository") from None


class Side:
    """One side of the comparison: a checkout set up for perf/bench.py."""

    def __init__(self, label: str, rev: str, env: dict[str, str] | None = None):
        self.label = label
        self.rev = rev
        self.env = env or {}
        self.root: Path | None = ROOT if rev == WORKTREE else None
        self.temp: Path | None = None
        self.records: list[dict] = []
        self.failures: list[str] = []

    @property
    def name(self) -> str:
        name = "work tree" if self.rev == WORKTREE else self.rev[:10]
        return name + "".join(f" {k}={v}" for k, v in self.env.items())

    def prepare(self, log) -> None:
        if self.root is not None:
            if not (self.root / ".venv" / "bin" / "python").exists():
                raise AbError("this work tree is not set up: run tools/setup --perf")
            return
        self.temp = Path(tempfile.mkdtemp(prefix=f"asyncvmm-ab-{self.label}-"))
        git("worktree", "add", "--detach", str(self.temp), self.rev)
        self.root = self.temp
        print(f"ab: {self.label} = {self.name}: setting up {self.temp} (tools/setup --perf)", flush=True)
        t = time.monotonic()
        r = subprocess.run([str(self.temp / "tools" / "setup"), "--perf"], cwd=self.temp,
                           stdout=log, stderr=subprocess.STDOUT)
        if r.returncode != 0:
            raise AbError(f"tools/setup --perf failed in the checkout of {self.name} (log: {log.name})")
        print(f"ab: {self.label} ready in {time.monotonic() - t:.0f} s", flush=True)

    def remove(self) -> None:
        if self.temp is None:
            return
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(self.temp)],
                       capture_output=True)
        shutil.rmtree(self.temp, ignore_errors=True)
        self.temp = None

    def bench(self, only: list[str], full: bool, out: Path) -> None:
        argv = [sys.executable, str(HARNESS), "--root", str(self.root), "--only", ",".join(only),
                "--no-history", "--no-qemu", "--json", str(out)]
        if not full:
            argv.append("--quick")
        r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env={**os.environ, **self.env})
        if not out.exists():
            raise AbError(f"perf/bench.py on {self.name} wrote nothing (status {r.returncode}): "
                          + " | ".join(r.stdout.strip().splitlines()[-3:]))
        rec = json.loads(out.read_text())
        out.unlink()
        if r.returncode != 0:
            why = [brief(n) for n in rec.get("notes", []) if any(w in n.lower() for w in FAILURE_WORDS)]
            last = r.stdout.strip().splitlines()[-1:] or [""]
            self.failures += why or [f"status {r.returncode}: {brief(last[0])}"]
        self.records.append(rec)


FAILURE_WORDS = ("fail", "no result", "error")


def brief(note: str) -> str:
    """A failure note on one line: its first line, and a traceback's last (the exception)."""
    lines = [ln.strip() for ln in note.strip().splitlines() if ln.strip()] or [""]
    text = lines[0][:160] + (" … " + lines[-1][:200] if len(lines) > 1 else "")
    return text


def numeric_series(records: list[dict]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for rec in records:
        for k, v in rec["figures"].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not history.is_meta(k):
                out.setdefault(k, []).append(float(v))
    return out


def compare(a: Side, b: Side, threshold: float, alpha: float) -> list[dict]:
    sa, sb = numeric_series(a.records), numeric_series(b.records)
    rows = []
    for key in sorted(set(sa) & set(sb)):
        xa, xb = sa[key], sb[key]
        if len(xa) < 2 or len(xb) < 2:
            continue
        c = stats.compare(xa, xb)
        d = history.direction(key)
        moved = c["p"] < alpha and abs(c["rel_change"]) * 100 > threshold
        verdict = ""
        if moved and d:
            better = (c["rel_change"] > 0) == (d > 0)
            if history.gated(key):
                verdict = "improved" if better else "REGRESSION"
            else:
                verdict = "anchor moved" if history.is_anchor(key) else ("better" if better else "worse")
        elif moved:
            verdict = "moved"
        rows.append({"figure": key, **c, "direction": d, "gated": history.gated(key),
                     "anchor": history.is_anchor(key), "verdict": verdict, "a": xa, "b": xb})
    return rows


def fmt_value(v: float) -> str:
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.2f}"
    return f"{v:.4f}"


def report(rows: list[dict], a: Side, b: Side, rounds: int, threshold: float, alpha: float, show_all: bool) -> str:
    headers = ["figure", "A mean", "B mean", "change", "p", "A ±sd", "B ±sd", "verdict"]
    lines = []
    for r in rows:
        if history.is_spread(r["figure"]):
            continue
        if not show_all and not r["verdict"] and not r["gated"]:
            continue
        change = f"{r['rel_change'] * 100:+.1f}%" if abs(r["rel_change"]) != float("inf") else "new"
        name = r["figure"] + (" (anchor)" if r["anchor"] else "")
        lines.append([name, fmt_value(r["a_mean"]), fmt_value(r["b_mean"]), change, f"{r['p']:.4f}",
                      fmt_value(r["a_stdev"]), fmt_value(r["b_stdev"]), r["verdict"]])
    widths = [max(len(h), *(len(x[i]) for x in lines)) if lines else len(h) for i, h in enumerate(headers)]
    out = [f"A = {a.name}, B = {b.name}: {rounds} interleaved rounds; permutation test on the per-round figures;"
           f" moved = p < {alpha:g} and |change| > {threshold:g}%"]

    def line(cells):
        return "  " + "  ".join(c.ljust(w) if i in (0, 7) else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out.append(line(headers))
    out.append("  " + "  ".join("-" * w for w in widths))
    out += [line(x) for x in lines]
    return "\n".join(x.rstrip() for x in out)


def median_record(side: Side, rounds: int, ab_id: str) -> dict:
    rec = dict(side.records[0])
    series = numeric_series(side.records)
    figs = {k: round(sorted(v)[len(v) // 2] if len(v) % 2 else sum(sorted(v)[len(v) // 2 - 1: len(v) // 2 + 1]) / 2, 4)
            for k, v in series.items()}
    if side.env:
        rec["env"] = side.env  # a setting, not the commit as it runs by default
    rec.update({"figures": figs, "source": "ab", "rounds": rounds, "ab": ab_id,
                "date": side.records[0]["date"], "seconds": round(sum(r.get("seconds", 0) for r in side.records), 1)})
    rec.pop("notes", None)
    return rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="interleaved A/B comparison of two asyncvmm commits (see perf/README.md)")
    ap.add_argument("a", metavar="A", help="the base commit")
    ap.add_argument("b", metavar="B", nargs="?", default=WORKTREE, help="the commit to compare (default: the work tree)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds per side (default 5; at least 2)")
    ap.add_argument("--only", default="startup,exits,memory", metavar="LIST",
                    help="benchmarks, comma-separated, of " + ",".join(BENCHMARKS) + " (default startup,exits,memory)")
    ap.add_argument("--threshold", type=float, default=5.0, metavar="PCT",
                    help="a change smaller than this many percent is no regression (default 5)")
    ap.add_argument("--alpha", type=float, default=0.01, help="significance level (default 0.01)")
    ap.add_argument("--full", action="store_true", help="each round a full bench.py run (default: --quick)")
    ap.add_argument("--all", action="store_true", help="print every figure, not only asyncvmm's and those that moved")
    ap.add_argument("--a-env", action="append", default=[], metavar="VAR=VALUE",
                    help="environment for A's runs (repeatable): A/B of a setting, e.g. `. . --b-env X=1`")
    ap.add_argument("--b-env", action="append", default=[], metavar="VAR=VALUE", help="environment for B's runs")
    ap.add_argument("--keep", action="store_true", help="keep the temporary checkouts (their paths are printed)")
    ap.add_argument("--no-history", action="store_true", help="do not append to perf/history.jsonl")
    args = ap.parse_args(argv)

    def bad(msg: str) -> int:
        print(f"ab: {msg}", file=sys.stderr)
        return 2

    only = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = [w for w in only if w not in BENCHMARKS]
    if unknown or not only:
        return bad(f"--only: unknown benchmark(s) {', '.join(unknown) or '(none)'}; choose from {','.join(BENCHMARKS)}")
    if args.rounds < 2:
        return bad("--rounds must be at least 2")
    if not 0 < args.alpha < 1 or args.threshold < 0:
        return bad("--alpha must be in (0, 1) and --threshold at least 0")
    try:
        ra, rb = resolve(args.a), resolve(args.b)
    except AbError as e:
        return bad(str(e))
    if stats.min_p(args.rounds) >= args.alpha:
        print(f"ab: note: with {args.rounds} rounds the smallest possible p is {stats.min_p(args.rounds):.3f}, "
              f"not below alpha {args.alpha:g}: nothing can be called a regression (use --rounds 5 or more)",
              file=sys.stderr)

    envs = []
    for given in (args.a_env, args.b_env):
        env = {}
        for item in given:
            var, eq, val = item.partition("=")
            if not eq or not var:
                return bad(f"--a-env/--b-env take VAR=VALUE, not {item!r}")
            env[var] = val
        envs.append(env)
    a, b = Side("A", ra, envs[0]), Side("B", rb, envs[1])
    machine = history.machine_id()
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    ab_id = "-".join([stamp] + ["worktree" if s.rev == WORKTREE else s.rev[:10] for s in (a, b)])
    outdir = RESULTS / machine
    outdir.mkdir(parents=True, exist_ok=True)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    started = time.monotonic()
    try:
        with open(outdir / f"{ab_id}-setup.log", "w") as log:
            for side in (a, b):
                side.prepare(log)
        for rnd in range(args.rounds):
            order = (a, b) if rnd % 2 == 0 else (b, a)
            for side in order:
                t = time.monotonic()
                side.bench(only, args.full, outdir / f"{ab_id}-round.json")
                print(f"ab: round {rnd + 1}/{args.rounds} {side.label} ({side.name}) {time.monotonic() - t:.0f} s",
                      flush=True)
    except AbError as e:
        return bad(str(e))
    except KeyboardInterrupt:
        print("ab: interrupted", file=sys.stderr)
        return 130
    finally:
        for side in (a, b):
            if args.keep and side.temp:
                print(f"ab: kept {side.temp} (remove it with: git worktree remove --force {side.temp})")
            else:
                side.remove()

    rows = compare(a, b, args.threshold, args.alpha)
    print()
    print(report(rows, a, b, args.rounds, args.threshold, args.alpha, args.all))
    load = [r.get("other_processes_seen", 0) for s in (a, b) for r in s.records]
    print(f"\n({time.monotonic() - started:.0f} s; machine {machine}; other VMM/test processes seen in "
          f"{sum(1 for x in load if x)} of {len(load)} runs; load at start {os.getloadavg()[0]:.2f})")
    result = {"id": ab_id, "machine": machine, "machine_info": history.machine_info(), "a": a.rev, "b": b.rev,
              "b_commit": b.records[0]["commit"] if b.records else None, "rounds": args.rounds, "only": only,
              "threshold_pct": args.threshold, "alpha": args.alpha, "rows": rows,
              "records": {"A": a.records, "B": b.records}}
    path = outdir / f"{ab_id}.json"
    path.write_text(json.dumps(result, ensure_ascii=False, indent=1))
    print(f"(rounds and statistics: {path.relative_to(ROOT)})")
    if not args.no_history:
        for side in (a, b):
            if side.records:
                history.append(median_record(side, args.rounds, ab_id))
    regressions = [r["figure"] for r in rows if r["verdict"] == "REGRESSION"]
    failures = [f"{s.label}: {f}" for s in (a, b) for f in s.failures]
    if failures:
        print("benchmark failures (those figures are not compared):\n  " + "\n  ".join(failures))
    if regressions:
        print(f"REGRESSION in {len(regressions)} figure(s): {', '.join(regressions)}")
        return 1
    if failures:
        return 3
    print("no regression")
    return 0


if __name__ == "__main__":
    sys.exit(main())
