"""Network namespaces the tests create, and what runs in them. Everything is removed on
exit, also when a test fails: the namespace (with any interface moved into it) and the
processes started in it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
_count = 0


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class Netns:
    def __init__(self, tag: str = "t"):
        global _count
        _count += 1
        self.name = f"avmm-{tag}-{os.getpid()}-{_count}"
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> "Netns":
        ip("netns", "add", self.name)
        self.exec("ip", "link", "set", "lo", "up")
        # Interfaces moved in get no IPv6: no router solicitations or MLD reports on the wire.
        self.exec("sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            for f in (p.stdin, p.stdout, p.stderr):
                if f:
                    f.close()
        ip("netns", "del", self.name, check=False)

    def exec(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.name, *argv], capture_output=True, text=True, check=check)

    def spawn(self, *argv: str, **kw) -> subprocess.Popen:
        p = subprocess.Popen(["ip", "netns", "exec", self.name, *argv], **kw)
        self.procs.append(p)
        return p

    def take(self, iface: str, *, mtu: int = 1500, addr: str | None = None) -> None:
        """Move `iface` in, with no IPv6 (no router solicitations on the wire) and up."""
        ip("link", "set", "dev", iface, "netns", self.name)
        self.exec("sysctl", "-qw", f"net.ipv6.conf.{iface}.disable_ipv6=1")
        self.exec("ip", "link", "set", "dev", iface, "mtu", str(mtu), "up")
        if addr:
            self.exec("ip", "addr", "add", addr, "dev", iface)


class Peer:
    """tests/integration/net_peer.py in the namespace, on `iface`."""

    def __init__(self, ns: Netns, iface: str):
        self.p = ns.spawn(sys.executable, str(HERE / "net_peer.py"), iface, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if not self.p.stdout.readline():  # {"ready": ...} once its sockets are bound
            raise RuntimeError(f"net_peer did not start: {self.p.stderr.read()}")

    def call(self, **cmd) -> dict:
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"net_peer died: {self.p.stderr.read()}")
        return json.loads(line)

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.stdin.write('{"op": "quit"}\n')
            self.p.stdin.flush()
            self.p.wait(timeout=10)

    def send(self, frames: list[bytes], vnet: list[bytes] | None = None) -> int:
        return self.call(op="send", frames=[f.hex() for f in frames], vnet=[v.hex() for v in vnet] if vnet else None)["sent"]

    def recv(self, count: int, *, timeout: float = 5, ethertype: int | None = None, vnet: bool = False,
             data: bool = False) -> list:
        return self.call(op="recv", count=count, timeout=timeout, ethertype=ethertype, vnet=vnet, data=data)["frames"]
