"""The snapshot reader (snapshot/file.py read) on damaged files: each ends in one SnapshotError
line, never another exception (what the `snapshot` fuzz target found; its inputs are in
tests/fuzz/regressions/snapshot)."""

from __future__ import annotations

import json
import zlib

import pytest

from asyncvmm.snapshot import file as snapfile

PAGE = snapfile.PAGE


def snapshot(path, state: bytes, *, flags: int = 0, stat_kind: bytes = snapfile.KIND_STATE) -> str:
    """A file laid out as the writer lays it: header, state at PAGE, one page of RAM, CRCs right."""
    mem_at = (PAGE + len(state) + PAGE - 1) // PAGE * PAGE
    parts = [snapfile.Part(stat_kind, 0, PAGE, len(state), zlib.crc32(state)),
             snapfile.Part(snapfile.KIND_MEMORY, flags, mem_at, PAGE, 0)]
    body = snapfile._header(parts).ljust(PAGE, b"\0") + state
    path.write_bytes(body.ljust(mem_at + PAGE, b"\0"))
    return str(path)


def test_a_well_formed_file_reads(tmp_path):
    snap = snapfile.read(snapshot(tmp_path / "s", json.dumps({"config": {"memory": PAGE}}).encode()))
    assert snap.memory.length == PAGE and not snap.is_diff


@pytest.mark.parametrize(("state", "flags", "message"), [
    (b"[]", 0, "the state part is not a machine's state"),
    (b"7", 0, "the state part is not a machine's state"),
    (b'{"config": [4096]}', 0, "the state part is not a machine's state"),
    (b"[" * 100_000, 0, "the state part is not JSON"),
    (b'{"config": {"memory": 4096}, "base": ["s"]}', snapfile.FLAG_DIFF, "a diff without a usable base"),
    (b'{"config": {"memory": 4096}, "base": {"path": "s\\u0000x"}}', snapfile.FLAG_DIFF, "a diff without a usable base"),
])
def test_a_state_part_that_is_not_a_machines_is_one_error(tmp_path, state, flags, message):
    with pytest.raises(snapfile.SnapshotError, match=message):
        snapfile.read(snapshot(tmp_path / "s", state, flags=flags))


def test_a_part_kind_with_newlines_is_named_on_one_line(tmp_path):
    path = tmp_path / "s"
    body = snapfile._header([snapfile.Part(b"\n\n\n\n", 0, PAGE, 1 << 60, 0)])
    path.write_bytes(body)
    with pytest.raises(snapfile.SnapshotError, match=r"its b'\\n\\n\\n\\n' part ends at") as e:
        snapfile.read(str(path))
    assert "\n" not in str(e.value)
