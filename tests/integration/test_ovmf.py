"""Debian's OVMF on the real KVM, its first seconds: SEC's x87/SSE set-up (`finit; fldcw;
ldmxcsr`) is served by the fpu-control quirk on an emulating KVM and the firmware runs on
(into its LZMA decompression, ~1000 s here: docs/EMULATING-KVM.md, not waited for).
The 4 MiB build's SEC is 32-bit without paging; the 2 MiB build's is 64-bit, its operands
RIP-relative and reached through its page tables."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import ROOT, needs_kvm

from asyncvmm.control.client import ControlClient
from asyncvmm.errors import VmmError

pytestmark = needs_kvm
OVMF = Path("/usr/share/OVMF")


@pytest.mark.parametrize("build", ["_4M", ""])
def test_ovmf_sec_gets_past_its_fpu_setup(emulating_kvm, build):
    code, varsfile = OVMF / f"OVMF_CODE{build}.fd", OVMF / f"OVMF_VARS{build}.fd"
    if not code.exists() or not varsfile.exists():
        pytest.skip("Debian's ovmf package is not installed")
    if not emulating_kvm:
        pytest.skip("on hardware KVM fldcw and ldmxcsr run natively")
    run_dir = Path(tempfile.mkdtemp(prefix="avmm-ovmf-"))
    vars_copy = run_dir / "vars.fd"
    shutil.copyfile(varsfile, vars_copy)
    name = f"ovmf-{os.getpid()}"
    env = {**os.environ, "ASYNCVMM_RUN_DIR": str(run_dir)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncvmm", "run", "-m", "256M", "-l", f"bootrom,{code},{vars_copy}",
         "-s", "31,lpc", "--no-reboot", name],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT, env=env,
    )
    try:
        applied: dict = {}
        deadline = time.monotonic() + 60
        while applied.get("fpu-control ldmxcsr", 0) < 1 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            time.sleep(0.5)
            try:
                applied = ControlClient(str(run_dir / f"{name}.sock")).request("stats")["quirks"]["applied"]
            except (VmmError, OSError, KeyError):
                continue
        assert applied.get("fpu-control fldcw") == 1 and applied.get("fpu-control ldmxcsr") == 1, applied
        time.sleep(2)
        assert proc.poll() is None  # still running: decompressing, no emulation failure
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert "emulation failure" not in err.decode(), err.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        shutil.rmtree(run_dir, ignore_errors=True)
