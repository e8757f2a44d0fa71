"""perf/: the regression tracking — history per machine, the A/B statistics and command,
and the plots page looked at in a real browser (headless Chromium)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, needs_kvm

PERF = ROOT / "perf"
sys.path.insert(0, str(PERF))

import ab  # noqa: E402  (perf/ab.py)
import history  # noqa: E402
import stats  # noqa: E402

PY = sys.executable


# -- the permutation test ------------------------------------------------------------

def test_permutation_test_separated_samples_reach_the_exact_minimum():
    a = [10.0, 10.2, 9.9, 10.1, 10.05]
    b = [12.0, 12.1, 11.9, 12.3, 12.2]
    assert stats.permutation_p(a, b) == pytest.approx(2 / 252)
    assert stats.min_p(5) == pytest.approx(2 / 252)


def test_permutation_test_same_samples_do_not_move():
    a = [5.0, 7.0, 6.0, 5.5, 6.5]
    assert stats.permutation_p(a, list(reversed(a))) == 1.0
    # Interleaved values: no evidence of a difference.
    assert stats.permutation_p([1, 3, 5, 7, 9], [2, 4, 6, 8, 10]) > 0.5


def test_permutation_test_sampled_when_too_many_labellings():
    a = [float(i) for i in range(12)]
    b = [float(i) + 100 for i in range(12)]  # C(24, 12) = 2.7M labellings: sampled
    p = stats.permutation_p(a, b)
    assert 0 < p < 0.001


# -- figures and history ---------------------------------------------------------------

@pytest.mark.parametrize("key, direction, anchor, gated", [
    ("exits.0x3ff.added_us", -1, False, True),
    ("exits.0x3ff.rawkvm_us", -1, True, False),
    ("exits.0x3ff.added_p50_us", -1, False, True),
    ("exits.0x3ff.rawkvm_cycle_p50_us", -1, True, False),
    ("exits.wakeup.futex_2cpu.p50_us", -1, True, False),
    ("startup.asyncvmm.exit_s", -1, False, True),
    ("startup.asyncvmm.exit_max_s", -1, False, False),
    ("startup.qemu_tcg.exit_s", -1, True, False),
    ("startup.floor.exit_s", -1, True, False),  # perf/floor.py: Python booting the guest without asyncvmm
    ("startup.ratio_asyncvmm_qemu_tcg.exit", -1, False, True),
    ("blk.direct.randread-4k-qd32.asyncvmm.iops", +1, False, True),
    ("blk.direct.randread-4k-qd32.fio.iops", +1, True, False),
    ("blk.direct.randread-4k-qd32.iops_ratio", +1, False, True),
    ("net.tx.64B.ratio", +1, False, True),
    ("net.rtt.limit.p50_us", -1, True, False),
    ("memory.asyncvmm.vmm_rss_mib", -1, False, True),
    ("exits.seconds", 0, False, False),
    ("firmware.asyncvmm.grub_s", -1, False, True),
    ("firmware.qemu_tcg.kernel_s", -1, True, False),
    ("firmware.timeout.seconds", 0, False, False),
])
def test_figure_direction_and_anchors(key, direction, anchor, gated):
    assert history.direction(key) == direction
    assert history.is_anchor(key) == anchor
    assert history.gated(key) == gated


def test_history_reads_every_line_and_gives_each_a_machine(tmp_path):
    records = history.load()  # the repository's own perf/history.jsonl
    lines = [line for line in (PERF / "history.jsonl").read_text().splitlines() if line.strip()]
    assert len(records) == len(lines)
    legacy = [r for r in records if "machine_info" not in r]
    assert legacy and all(r["machine"].startswith("legacy-") for r in legacy)
    # Lines from different kernels are different machines; the same kernel, the same one.
    by_kernel = {}
    for r in legacy:
        by_kernel.setdefault(r["host_kernel"], set()).add(r["machine"])
    assert all(len(ids) == 1 for ids in by_kernel.values())
    assert len({next(iter(ids)) for ids in by_kernel.values()}) == len(by_kernel)
    # A new line carries the machine's id; a torn last line is skipped, not fatal.
    path = tmp_path / "h.jsonl"
    path.write_text(lines[0] + "\n")
    history.append({"commit": "x", "machine": history.machine_id(), "figures": {"exits.0x80.added_us": 3.0}}, path)
    with open(path, "a") as f:
        f.write('{"commit": "torn", "figu')
    got = history.load(path)
    assert [r["commit"] for r in got][1] == "x" and len(got) == 2
    assert got[1]["machine"] == history.machine_id() and len(history.machine_id()) == 12


# -- the A/B comparison ------------------------------------------------------------------

def _side(label: str, rows: list[dict]) -> ab.Side:
    s = ab.Side(label, "0" * 40)
    s.records = [{"figures": r} for r in rows]
    return s


def test_ab_calls_a_slower_asyncvmm_a_regression_and_a_moving_anchor_no_regression():
    a = _side("A", [{"exits.0x80.added_us": 5.0 + d, "exits.0x80.rawkvm_us": 9.0 + d, "startup.asyncvmm.exit_s": 0.2}
                    for d in (0.0, 0.1, -0.1, 0.05, 0.15)])
    b = _side("B", [{"exits.0x80.added_us": 8.0 + d, "exits.0x80.rawkvm_us": 11.0 + d, "startup.asyncvmm.exit_s": 0.2}
                    for d in (0.0, 0.1, -0.1, 0.05, 0.15)])
    rows = {r["figure"]: r for r in ab.compare(a, b, threshold=5, alpha=0.01)}
    assert rows["exits.0x80.added_us"]["verdict"] == "REGRESSION"
    assert rows["exits.0x80.added_us"]["rel_change"] == pytest.approx(0.6, rel=0.01)
    assert rows["exits.0x80.rawkvm_us"]["verdict"] == "anchor moved"
    assert rows["startup.asyncvmm.exit_s"]["verdict"] == ""
    # The other way round it is an improvement; below the threshold it is nothing.
    assert {r["figure"]: r for r in ab.compare(b, a, 5, 0.01)}["exits.0x80.added_us"]["verdict"] == "improved"
    assert {r["figure"]: r for r in ab.compare(a, b, 80, 0.01)}["exits.0x80.added_us"]["verdict"] == ""


def test_ab_says_why_a_side_failed_on_one_line():
    # a benchmark's note carrying a child's traceback: its first line and the exception
    note = ("net: no result from ['ip', 'netns', 'exec', ...]: Traceback (most recent call last):\n"
            '  File "/perf/net.py", line 109, in go\n'
            "TypeError: VirtioNet.__init__() got an unexpected keyword argument 'thread_poll'\n")
    text = ab.brief(note)
    assert "\n" not in text
    assert text.startswith("net: no result from") and text.endswith("keyword argument 'thread_poll'")
    assert ab.brief("startup: rawkvm failed: status 3") == "startup: rawkvm failed: status 3"


@pytest.mark.parametrize("argv, says", [
    (["no-such-commit-xyz"], "is not a commit"),
    (["HEAD", "--only", "bogus"], "unknown benchmark"),
    (["HEAD", "--rounds", "1"], "at least 2"),
])
def test_ab_bad_arguments_one_line_status_2(argv, says):
    r = subprocess.run([PY, str(PERF / "ab.py"), *argv], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert says in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@needs_kvm
def test_ab_work_tree_against_itself_runs_interleaved_and_finds_no_regression(tmp_path):
    """An A/A run of the whole command on the work tree: rounds alternate, the report and
    the rounds' file are written, and nothing (with 2 rounds nothing can be) is called a
    regression."""
    r = subprocess.run([PY, str(PERF / "ab.py"), ".", ".", "--rounds", "2", "--only", "memory", "--no-history"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    order = [line.split()[3] for line in r.stdout.splitlines() if line.startswith("ab: round")]
    assert order == ["A", "B", "B", "A"]
    assert "memory.asyncvmm.vmm_rss_mib" in r.stdout and "no regression" in r.stdout
    path = ROOT / r.stdout.split("(rounds and statistics: ", 1)[1].split(")", 1)[0]
    try:
        data = json.loads(path.read_text())
        assert len(data["records"]["A"]) == len(data["records"]["B"]) == 2
        assert data["machine"] == history.machine_id()
    finally:
        path.unlink()


# -- the plots page, in a browser --------------------------------------------------------

def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_plots_page_shows_the_plots_in_headless_chromium(tmp_path):
    pytest.importorskip("matplotlib", reason="tools/setup installs matplotlib (the perf extra)")
    browser = _chromium()
    if not browser:
        pytest.skip("no chromium (tools/setup installs it)")
    out = tmp_path / "plots"
    r = subprocess.run([PY, str(PERF / "plot.py"), "--out", str(out), "--only", "exits"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) >= 10 and (out / "exits.0x3ff.added_us.png").exists()
    assert "exits.0x3ff.added_us.png" in (out / "index.html").read_text()

    shot = tmp_path / "shot.png"
    r = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,1400",
                        f"--screenshot={shot}", (out / "index.html").as_uri()],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert shot.exists(), r.stderr[-2000:]

    import matplotlib.image  # noqa: PLC0415

    px = matplotlib.image.imread(str(shot))[:, :, :3]
    h, w, _ = px.shape
    assert (h, w) == (1400, 1000)
    non_white = (px < 0.95).any(axis=2).mean()
    assert non_white > 0.03, f"the page looks blank: {non_white:.3%} non-white"
    # The plots themselves are drawn, not broken-image icons: their series are coloured
    # (matplotlib's C0-C9), where the page's text, grids and frames are grey.
    colour = px.max(axis=2) - px.min(axis=2) > 0.25
    assert colour.sum() > 500, f"no plot lines on the page ({colour.sum()} coloured pixels)"


# -- the start-up floor anchor (perf/floor.py) ---------------------------------------------

@needs_kvm
@pytest.mark.parametrize("mode", ["--sync", "--asyncio", "--uvloop"])
def test_the_floor_anchor_boots_hello_in_each_mode(guests, mode):
    """bench.py's start-up row `floor.py --uvloop` (and perf/startup_ir.py's three) stand for
    what Python itself costs: they must boot the real guest, not fail into a dropped column."""
    if mode == "--uvloop":
        pytest.importorskip("uvloop")  # an optional extra (asyncvmm[fast])
    argv = [PY, str(PERF / "floor.py"), *([] if mode == "--asyncio" else [mode]), str(guests / "hello.elf"), "bench=floor"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("hello from the guest") and "bench=floor" in r.stdout, r.stdout


def test_the_floor_anchor_refuses_a_bad_command_line():
    r = subprocess.run([PY, str(PERF / "floor.py"), "--sync"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "floor.py" in r.stderr
