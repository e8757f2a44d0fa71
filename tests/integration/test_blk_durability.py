"""Data the guest flushed is on the image, even if the VMM is SIGKILLed right after.

The driver side (the harness) writes known blocks, then a FLUSH; the moment the FLUSH
completes the child says so and the parent kills it with SIGKILL, then reads the image.
Many rounds, both engines, with and without O_DIRECT. (A SIGKILL does not drop the
host's page cache: what this shows is that a completed FLUSH means every earlier write was
handed to the host kernel — nothing was left in the VMM. Power loss is not simulated.)
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from blk_flush_child import blocks

HERE = Path(__file__).resolve().parent
ROUNDS = 12


@pytest.mark.parametrize("engine,direct", [("uring", False), ("sync", False), ("uring", True)])
def test_flushed_data_survives_sigkill(tmp_path, engine, direct):
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    sectors = (8 << 20) // 512
    for seed in range(ROUNDS):
        p = subprocess.Popen(
            [sys.executable, str(HERE / "blk_flush_child.py"), str(image), engine, "1" if direct else "0", str(seed)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        try:
            line = p.stdout.readline()
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=10)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        err = p.stderr.read().decode(errors="replace")
        p.stdout.close()
        p.stderr.close()
        if b"O_DIRECT" in err.encode() and direct:
            pytest.skip(err.strip().splitlines()[-1])
        assert line == b"flushed 0\n", err
        assert p.returncode == -signal.SIGKILL
        with open(image, "rb") as f:
            for sector, data in blocks(seed, sectors):  # blocks 64 and up: the child's later writes go below
                f.seek(sector * 512)
                assert f.read(4096) == data, f"round {seed}: sector {sector} lost"
