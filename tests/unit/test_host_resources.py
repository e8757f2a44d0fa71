"""HostResources.close when stop() did not run: a back-end's daemon is stopped and reaped."""

from __future__ import annotations

import asyncio
import os
import sys

from asyncvmm.devices.slots import HostResources


class Daemon:
    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc


class Backend:
    def __init__(self, proc: asyncio.subprocess.Process):
        self.process = Daemon(proc)
        self.closed = False

    def close(self) -> None:
        self.closed = True


def _gone(pid: int) -> bool:
    """Neither running nor a zombie: /proc has no such pid (it was reaped)."""
    return not os.path.exists(f"/proc/{pid}")


def test_close_reaps_the_back_ends_daemons_it_terminates():
    async def go():
        plain = await asyncio.create_subprocess_exec("sleep", "30")
        # One that ignores SIGTERM: killed once the bound has passed.
        stubborn = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(30)", stdout=asyncio.subprocess.PIPE)
        assert await stubborn.stdout.readline() == b"ready\n"
        host = HostResources()
        host.backends = {(4, 0): Backend(plain), (5, 0): Backend(stubborn)}
        backends = list(host.backends.values())
        try:
            host.close()
            assert all(b.closed for b in backends) and not host.backends
            assert _gone(plain.pid) and _gone(stubborn.pid)
        finally:
            for p in (plain, stubborn):
                if p.returncode is None and not _gone(p.pid):
                    p.kill()
                    await p.wait()
    asyncio.run(go())
