#!/usr/bin/env python3
"""Plots of every figure of perf/history.jsonl over commits: PNGs and an HTML page.

    .venv/bin/python perf/plot.py [--history PATH] [--out DIR] [--machine ID] [--only exits,startup]

One PNG per figure (matplotlib, no display needed), x = the commits in the order they were
first measured, y = the figure; one series per machine and mode (full runs, quick runs and
A/B medians are not mixed: compare like with like), each run a point, the median of a
commit's runs joined by a line. Anchors (rawkvm, QEMU, fio, the plain TAP program) get
their own plots, so a step in asyncvmm's figure can be told from a machine that got slower.
`index.html` in DIR shows them all, by benchmark, with the list of machines and commits.
Needs matplotlib (tools/setup --perf installs it into .venv).
"""

from __future__ import annotations

import argparse
import html
import re
import statistics
import sys
from pathlib import Path

import history

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "build" / "perf" / "plots"


def series_key(rec: dict) -> tuple[str, str]:
    mode = rec.get("mode", "full") + (" (A/B)" if rec.get("source") == "ab" else "")
    mode += "".join(f" {k}={v}" for k, v in sorted(rec.get("env", {}).items()))
    return rec["machine"], mode


def commit_order(records: list[dict]) -> list[str]:
    """Commits in the order of their first run (the history is appended in time order)."""
    seen: dict[str, None] = {}
    for r in sorted(records, key=lambda r: r.get("date", "")):
        seen.setdefault(r.get("commit", "unknown"), None)
    return list(seen)


def short(commit: str) -> str:
    return commit[:7] + ("+" if commit.endswith("+dirty") else "")


def filename(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", key) + ".png"


def plot_all(records: list[dict], out: Path) -> list[str]:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    commits = commit_order(records)
    xs = {c: i for i, c in enumerate(commits)}
    keys = sorted({k for r in records for k, v in r["figures"].items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and not history.is_meta(k)})
    groups = sorted({series_key(r) for r in records})
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for key in keys:
        fig, ax = plt.subplots(figsize=(5.2, 2.6), dpi=80)
        any_point = False
        for gi, g in enumerate(groups):
            pts = [(xs[r.get("commit", "unknown")], float(r["figures"][key])) for r in records
                   if series_key(r) == g and isinstance(r["figures"].get(key), (int, float))]
            if not pts:
                continue
            any_point = True
            color = f"C{gi % 10}"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", color=color, markersize=3, alpha=0.6)
            by_x: dict[int, list[float]] = {}
            for x, y in pts:
                by_x.setdefault(x, []).append(y)
            mx = sorted(by_x)
            ax.plot(mx, [statistics.median(by_x[x]) for x in mx], "-", color=color, linewidth=1.5,
                    label=f"{g[0][:14]} {g[1]}")
        if not any_point:
            plt.close(fig)
            continue
        d = history.direction(key)
        title = key + ("  (anchor)" if history.is_anchor(key) else "")
        title += "  ↓ better" if d < 0 else "  ↑ better" if d > 0 else ""
        ax.set_title(title, fontsize=8)
        ax.set_xticks(range(len(commits)))
        ax.set_xticklabels([short(c) for c in commits], rotation=45, ha="right", fontsize=6)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=5, loc="best")
        fig.tight_layout()
        fig.savefig(out / filename(key))
        plt.close(fig)
        written.append(key)
    return written


def write_html(records: list[dict], keys: list[str], out: Path) -> Path:
    commits = commit_order(records)
    machines: dict[str, dict] = {}
    for r in records:
        machines.setdefault(r["machine"], r.get("machine_info") or {
            "kernel": r.get("host_kernel"), "cpus": r.get("cpus"), "kvm": r.get("kvm")})
    first = {}
    for r in records:
        first.setdefault(r.get("commit", "unknown"), r.get("date", ""))
    esc = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>asyncvmm perf over commits</title>",
             "<style>body{font-family:sans-serif;margin:1em;background:#fff;color:#222}"
             "img{width:416px;height:208px;margin:2px;border:1px solid #ddd}"
             "table{border-collapse:collapse;font-size:12px}td,th{padding:2px 8px;border-bottom:1px solid #eee;"
             "text-align:left}h2{margin-top:1.2em}</style></head><body>",
             f"<h1>asyncvmm perf: {len(keys)} figures, {len(records)} runs, {len(commits)} commits,"
             f" {len(machines)} machine(s)</h1>",
             "<p>From perf/history.jsonl (perf/plot.py). Compare within one machine and one mode;"
             " anchors are marked: when they move, the machine changed, not asyncvmm.</p>",
             "<h2>Machines</h2><table><tr><th>id</th><th>CPU</th><th>kernel</th><th>CPUs</th><th>KVM</th></tr>"]
    for mid, info in machines.items():
        parts.append(f"<tr><td>{esc(mid)}</td><td>{esc(str(info.get('cpu_model', '?')))}</td>"
                     f"<td>{esc(str(info.get('kernel')))}</td><td>{esc(str(info.get('cpus')))}</td>"
                     f"<td>{esc(str(info.get('kvm')))}</td></tr>")
    parts.append("</table><h2>Commits</h2><table><tr><th>#</th><th>commit</th><th>first run</th></tr>")
    for i, c in enumerate(commits):
        parts.append(f"<tr><td>{i}</td><td>{esc(c)}</td><td>{esc(first[c])}</td></tr>")
    parts.append("</table>")
    section = None
    for key in keys:
        sec = key.split(".", 1)[0]
        if sec != section:
            section = sec
            parts.append(f"<h2 id='{esc(sec)}'>{esc(sec)}</h2>")
        parts.append(f"<img src='{esc(filename(key))}' alt='{esc(key)}' title='{esc(key)}'>")
    parts.append("</body></html>")
    page = out / "index.html"
    page.write_text("\n".join(parts))
    return page


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="plot every figure of perf/history.jsonl over commits")
    ap.add_argument("--history", type=Path, default=history.HISTORY, help="the history file (default perf/history.jsonl)")
    ap.add_argument("--out", type=Path, default=OUT, help="output directory (default build/perf/plots)")
    ap.add_argument("--machine", help="only this machine's runs (an id from the page's list)")
    ap.add_argument("--only", metavar="PREFIXES", help="only figures starting with these, comma-separated (e.g. exits,startup)")
    args = ap.parse_args(argv)
    try:
        import matplotlib  # noqa: F401, PLC0415
    except ImportError:
        print("plot: matplotlib is not installed (tools/setup --perf installs it)", file=sys.stderr)
        return 2
    records = history.load(args.history)
    if args.machine:
        records = [r for r in records if r["machine"] == args.machine]
    if not records:
        print(f"plot: no runs in {args.history}" + (f" for machine {args.machine}" if args.machine else ""),
              file=sys.stderr)
        return 2
    if args.only:
        prefixes = tuple(p.strip() for p in args.only.split(",") if p.strip())
        records = [dict(r, figures={k: v for k, v in r["figures"].items() if k.startswith(prefixes)}) for r in records]
    keys = plot_all(records, args.out)
    if not keys:
        print(f"plot: no figure matches --only {args.only}", file=sys.stderr)
        return 2
    page = write_html(records, keys, args.out)
    print(f"plot: {len(keys)} figures from {len(records)} runs -> {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
