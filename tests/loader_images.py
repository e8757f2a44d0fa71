"""Disk images for the loader's tests, made with Debian's own tools: sfdisk (MBR, with
extended and logical partitions), sgdisk (GPT), mkfs.ext4 -d at an offset, mkfs.vfat
--offset with mtools, mkfs.xfs. No loop devices and no root needed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

MiB = 1 << 20
TOOLS = ("sfdisk", "sgdisk", "mkfs.ext4", "mkfs.vfat", "mcopy", "mmd", "debugfs", "blkid")
MTOOLS_ENV = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}

needs_disk_tools = pytest.mark.skipif(
    any(shutil.which(t, path="/usr/bin:/usr/sbin:/bin:/sbin") is None for t in TOOLS),
    reason="needs " + " ".join(TOOLS) + " (tools/setup installs them)",
)


def run(*cmd: str, stdin: str | None = None) -> str:
    p = subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=MTOOLS_ENV)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {p.stderr.strip()}")
    return p.stdout


def blank(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def mbr(path: Path, script: str) -> None:
    """sfdisk's script format: `start,size,type` lines (sectors)."""
    run("sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(path), stdin="label: dos\n" + script)


def gpt(path: Path, *args: str) -> None:
    run("sgdisk", "-o", *args, str(path))


def tree(files: dict[str, bytes | str]) -> Path:
    """A directory holding `files`: bytes are files, str values are symbolic links."""
    root = Path(tempfile.mkdtemp(prefix="loader-tree-"))
    for name, content in files.items():
        p = root / name.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            os.symlink(content, p)
        else:
            p.write_bytes(content)
    return root


def ext4(path: Path, offset: int, size: int, files: dict[str, bytes | str], *, label: str = "",
         uuid: str = "", kind: str = "ext4") -> None:
    src = tree(files)
    try:
        args = ["mkfs." + kind, "-q", "-F", "-E", f"offset={offset}", "-d", str(src)]
        args += ["-L", label] if label else []
        args += ["-U", uuid] if uuid else []
        run(*args, str(path), f"{size // 1024}k")
    finally:
        shutil.rmtree(src)


def fat(path: Path, offset: int, size: int, files: dict[str, bytes], *, label: str = "ESP") -> None:
    run("mkfs.vfat", "--offset", str(offset // 512), "-n", label, str(path), str(size // 1024))
    at = f"{path}@@{offset}"
    made = set()
    for name, content in files.items():
        parts = name.strip("/").split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if d not in made:
                run("mmd", "-i", at, "::/" + d)
                made.add(d)
        with tempfile.NamedTemporaryFile() as tmp:
            tmp.write(content)
            tmp.flush()
            run("mcopy", "-i", at, tmp.name, "::/" + "/".join(parts))


def fs_uuid(path: Path, offset: int, size: int) -> str:
    return run("blkid", "-p", "-s", "UUID", "-o", "value", "-O", str(offset), "-S", str(size), str(path)).strip()
