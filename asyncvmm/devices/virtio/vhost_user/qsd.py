"""qemu-storage-daemon as a disk's vhost-user back-end: every image format QEMU's block
layer reads (qcow2, vmdk, vdi, vhdx, vpc...), served to the guest over vhost-user-blk.

    daemon = await Daemon.start("disk.qcow2", "qcow2", readonly=False, queues=2)
    daemon.socket            # the export's Unix socket, in a private directory
    await daemon.stop()      # with the VM: the log says so

A detected format (no `format=` given) whose image names other files — a backing file, a
qcow2 data file, VMDK extents — is refused unless `format=` says it: a raw disk's guest
could have written such a header into its sector 0 to have the next boot read host files
(CVE-2008-2004's lesson; QEMU's raw driver guards sector 0 for the same reason).

The image is opened by the daemon (its block node read-only for `ro`, the export
writable=off then), which locks it as QEMU does: a second VM on the same image is refused
with one line. The daemon dies with the VMM (PR_SET_PDEATHSIG through setpriv).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import shutil
import signal
import tempfile
import time

from ....errors import ConfigError
from ....log import get_logger

log = get_logger("asyncvmm.machine")

QSD = "qemu-storage-daemon"
QEMU_IMG = "qemu-img"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


def binary() -> str | None:
    return shutil.which(QSD)


def command(qsd: str, image: str, fmt: str, *, readonly: bool, queues: int, sock: str, direct: bool = False) -> list[str]:
    """The daemon's command line: the image's node (`fmt` over a file node) and its export;
    `direct`: the file opened with O_DIRECT, I/O through io_uring (QEMU's fastest path)."""
    ro = bool(readonly)
    file: dict = {"driver": "file", "filename": os.path.abspath(image), "read-only": ro}
    if direct:
        file.update({"cache": {"direct": True}, "aio": "io_uring"})
    node = {"driver": fmt, "node-name": "disk", "read-only": ro, "file": file}
    export = {"type": "vhost-user-blk", "id": "disk", "node-name": "disk", "writable": not ro,
              "num-queues": queues, "addr": {"type": "unix", "path": sock}}
    argv = [qsd, "--blockdev", json.dumps(node), "--export", json.dumps(export)]
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *argv] if setpriv else argv


async def references(image: str, fmt: str) -> list[str]:
    """The other files the image names (qemu-img info: backing file, data file, extents)."""
    qemu_img = shutil.which(QEMU_IMG)
    if qemu_img is None:
        raise ConfigError(f"disk {image} is a {fmt} image: say format={fmt} (qemu-img, which would check what "
                          "other files it names, is not installed: apt-get install qemu-utils)")
    p = await asyncio.create_subprocess_exec(qemu_img, "info", "-U", "--output=json", "-f", fmt, image,
                                             stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                                             stderr=asyncio.subprocess.PIPE)
    out, err = await p.communicate()
    if p.returncode != 0:
        said = err.decode(errors="replace").strip().splitlines()
        raise ConfigError(f"disk {image}: qemu-img cannot read it as {fmt}: {said[-1] if said else p.returncode}")
    info = json.loads(out)
    data = info.get("format-specific", {}).get("data", {})
    named = [info.get("backing-filename"), data.get("data-file")]
    named += [e.get("filename") for e in data.get("extents", [])]
    me = os.path.realpath(image)
    return [n for n in named if n and os.path.realpath(n) != me]


class Daemon:
    def __init__(self, proc: asyncio.subprocess.Process, image: str, workdir: str):
        self.proc = proc
        self.image = image
        self.workdir = workdir
        self.socket = os.path.join(workdir, "vhost-user-blk.sock")
        self.lines: collections.deque[str] = collections.deque(maxlen=8)  # the daemon's last words
        self.stopping = False
        self.ready = False
        self._stderr = asyncio.get_running_loop().create_task(self._read_stderr())
        self._waiter = asyncio.get_running_loop().create_task(self._watch())

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    async def start(cls, image: str, fmt: str, *, readonly: bool, queues: int, explicit: bool = True,
                    direct: bool = False) -> "Daemon":
        """`explicit`: the user said format=FMT (else it was detected: see references)."""
        qsd = binary()
        if qsd is None:
            raise ConfigError(f"disk {image} is a {fmt} image, and qemu-storage-daemon, which serves it, is not installed "
                              "(apt-get install qemu-system-common), or say format=raw")
        if not explicit:
            named = await references(image, fmt)
            if named:
                raise ConfigError(f"disk {image} is a {fmt} image that names {', '.join(named)}: say format={fmt} "
                                  "to use it (a detected format may not reach other files)")
        workdir = tempfile.mkdtemp(prefix="asyncvmm-qsd-")
        try:
            proc = await asyncio.create_subprocess_exec(
                *command(qsd, image, fmt, readonly=readonly, queues=queues, sock=os.path.join(workdir, "vhost-user-blk.sock"),
                         direct=direct),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        except OSError as e:
            _remove_dir(workdir)
            raise ConfigError(f"disk {image}: cannot start qemu-storage-daemon: {e.strerror}") from None
        d = cls(proc, image, workdir)
        try:
            await d._ready()
            d.ready = True
        except BaseException:
            await d.stop(quiet=True)
            raise
        log.info(f"disk {image}: {fmt} served by qemu-storage-daemon (pid {d.pid}), over vhost-user-blk")
        return d

    async def _ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not os.path.exists(self.socket):
            if self.proc.returncode is not None:
                await asyncio.wait([self._stderr], timeout=1)
                raise ConfigError(self._why_not())
            if time.monotonic() > deadline:
                raise ConfigError(f"disk {self.image}: qemu-storage-daemon made no socket in {START_TIMEOUT_S:.0f} s")
            await asyncio.sleep(0.01)

    def _why_not(self) -> str:
        said = " ".join(self.lines).removeprefix("qemu-storage-daemon: ")
        if said.startswith("--") and "}: " in said:  # "--blockdev {...}: what went wrong": the option is ours
            said = said[said.rindex("}: ") + 3 :]
        said = said or f"it exited with status {self.proc.returncode}"
        if "lock" in said:
            return f"disk {self.image} is in use by another VM (qemu-storage-daemon: {said})"
        return f"disk {self.image}: qemu-storage-daemon cannot serve it: {said}"

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            text = line.decode(errors="replace").strip()
            if text:
                self.lines.append(text)

    async def _watch(self) -> None:
        status = await self.proc.wait()
        if self.ready and not self.stopping:  # (before it is ready, start() says why)
            last = f": {self.lines[-1]}" if self.lines else ""
            log.warning(f"disk {self.image}: qemu-storage-daemon (pid {self.pid}) exited with status {status}{last}")

    def connected(self) -> None:
        """The front-end is connected: the socket and its directory are not needed any more
        (nothing reconnects), so they go now; a VMM killed later leaves nothing in /tmp."""
        _remove_dir(self.workdir)

    async def stop(self, *, quiet: bool = False) -> None:
        """Stop the daemon (SIGTERM, then SIGKILL) and remove its directory."""
        self.stopping = True
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    await self.proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
            if not quiet:
                log.info(f"disk {self.image}: qemu-storage-daemon (pid {self.pid}) stopped")
        await asyncio.wait([self._stderr, self._waiter], timeout=STOP_TIMEOUT_S)
        _remove_dir(self.workdir)


def _remove_dir(path: str) -> None:
    """The daemon's directory and its socket, with unlink and unlinkat only: the loop's
    seccomp filter has no rmdir (shutil.rmtree's last call)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(path):
            os.unlink(os.path.join(path, name))
        parent = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.rmdir(os.path.basename(path), dir_fd=parent)
        finally:
            os.close(parent)
