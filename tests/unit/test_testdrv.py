"""The benchmarks' virtio driver is a test-only extension, apart from the product's.

cext/testdrv.c is built by tools/setup into build/native (cext/build_testdrv.py), not into
asyncvmm._native; perf/blk.py drives a real virtio-blk with it (no guest CPU).
"""

import sys
from pathlib import Path

PERF = Path(__file__).resolve().parents[2] / "perf"


def test_the_product_extension_has_no_test_driver():
    from asyncvmm._native import lib

    assert not any(name.startswith("avmm_testdrv") for name in dir(lib))
    assert hasattr(lib, "avmm_vq_pop")  # read from cext/virtq.h, not re-declared


def _perf_blk():
    """perf/blk.py, the benchmark that drives the test driver."""
    sys.path.insert(0, str(PERF))
    try:
        import blk
    finally:
        sys.path.remove(str(PERF))
    return blk


def test_the_test_driver_drives_virtio_blk(tmp_path):
    blk = _perf_blk()
    image = tmp_path / "disk.img"
    blk.make_image(str(image), 8 << 20)
    w = blk.Workload("randread-4k-qd4", "randread", 4096, 4, 500)
    figs = blk.run_asyncvmm(str(image), w, 500, direct=False)
    assert figs["iops"] > 0 and figs["kicks"] > 0 and figs["batches"] > 0


def test_the_halt_polling_driver_polls_and_the_sleeping_one_does_not(tmp_path):
    """The driver as a halt-polling vCPU (cext/testdrv.h) ends halts in its window, and sleeps
    on the eventfd for the rest (its first halt has no window yet, as KVM's); the driver that
    always sleeps never polls."""
    blk = _perf_blk()
    image = tmp_path / "disk.img"
    blk.make_image(str(image), 8 << 20)
    w = blk.Workload("randread-4k-qd1", "randread", 4096, 1, 400)
    hp = blk.run_asyncvmm(str(image), w, 400, direct=False, halt_poll_ns=blk.HALT_POLL_NS)
    assert hp["halts_polled"] + hp["halts_slept"] == hp["halts"]
    assert hp["halts_slept"] > 0
    # A halt polls until a completion comes (polled) or, on a host with more runnable
    # tasks than CPUs, not at all or cut short, as KVM does when another task wants the CPU (yielded).
    assert hp["halts_polled"] > 0 or hp["halts_yielded"] > 0
    sleeps = blk.run_asyncvmm(str(image), w, 400, direct=False)
    assert sleeps["halts_polled"] == sleeps["halts_yielded"] == sleeps["halt_poll_us"] == 0
    assert sleeps["halts_slept"] == sleeps["halts"] > 0
    assert sleeps["interrupts"] > 0
