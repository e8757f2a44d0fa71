"""The fuzz targets in the test suite: every committed seed and every crash input ever found
(tests/fuzz/regressions/TARGET) replayed in-process, and each target fuzzed for a couple of
seconds (atheris for the Python targets, libFuzzer with ASan/UBSan for the C ones), so CI
exercises the targets and a target that rots fails here. Long runs: tools/fuzz."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run  # noqa: E402
import targets  # noqa: E402

SECONDS = 1  # each: libFuzzer's -max_total_time, after the seeds have run


def inputs(target: str) -> list[Path]:
    files = []
    for d in (HERE / "corpus" / target, HERE / "regressions" / target):
        if d.is_dir():
            files += sorted(p for p in d.iterdir() if p.is_file())
    return files


@pytest.mark.parametrize("target", list(targets.TARGETS))
def test_seeds_and_regressions(target):
    files = inputs(target)
    assert files, f"no seeds for {target}"
    for p in files:
        targets.TARGETS[target](p.read_bytes())


@pytest.fixture(scope="module")
def c_targets():
    if shutil.which("clang") is None:
        pytest.skip("clang is not installed: tools/setup --fuzz")
    why = run.build_c()
    assert why is None, why
    return run.BUILD


@pytest.mark.parametrize("target", run.C_TARGETS)
def test_c_seeds_and_regressions(c_targets, target):
    files = inputs(target)
    assert files
    r = subprocess.run([str(c_targets / target), *map(str, files)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-4000:]


@pytest.mark.parametrize("target", [*targets.TARGETS, *run.C_TARGETS])
def test_fuzz_briefly(target, tmp_path, request):
    if target in run.C_TARGETS:
        request.getfixturevalue("c_targets")
    elif not run.have_atheris():
        pytest.skip("atheris is not installed (pip install atheris)")
    res = run.run_target(target, SECONDS, "atheris", tmp_path, work=tmp_path / "corpus")
    assert res["crashes"] == 0 and res["rc"] == 0, Path(res["log"]).read_text()[-4000:]
    assert res["runs"] > 10, res
