"""Where COM1 goes: the VMM's stdio, a file, or a Unix socket (`-l com1,...`).

A backend moves bytes between the host side and the UART model, on the loop:
  write(data)       guest output, in batches (whatever the guest wrote since the last drain)
  attach(...)       start feeding host input to `feed(data) -> accepted`
  resume_input()    the UART has room again: push what was held back, re-add the reader
  close()           stop and restore whatever was changed (the terminal mode)

Flow control follows asyncio's: when the UART's FIFO is full the reader is removed and the
rest of the input is held; `resume_input` continues. Nothing is dropped on the way in.
"""

from __future__ import annotations

import asyncio
import errno
import os
import queue
import socket
import stat
import termios
import threading
import tty
from typing import Callable

from .errors import ConfigError

# Escape sequence on a terminal, as QEMU's: Ctrl-A then a key.
ESCAPE = 0x01
ESCAPE_HELP = "Ctrl-A x: quit   Ctrl-A b: send a break   Ctrl-A Ctrl-A: send Ctrl-A"


class Console:
    """Base: output only, no input."""

    def __init__(self):
        self._loop: asyncio.AbstractEventLoop | None = None
        self._feed: Callable[[bytes], int] | None = None
        self._on_break: Callable[[], None] | None = None
        self._on_quit: Callable[[], None] | None = None
        self._held = b""
        self._in_fd: int | None = None
        self._reading = False

    def attach(self, loop, feed: Callable[[bytes], int], on_break=None, on_quit=None) -> None:
        self._loop = loop
        self._feed = feed
        self._on_break = on_break
        self._on_quit = on_quit
        self._start_reading()

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    # -- input -------------------------------------------------------------------------
    def _start_reading(self) -> None:
        if self._in_fd is not None and not self._reading and self._feed is not None:
            try:
                self._loop.add_reader(self._in_fd, self._on_readable)
            except PermissionError:  # /dev/null and the like cannot be polled: no input
                self._in_fd = None
                return
            self._reading = True

    def _stop_reading(self) -> None:
        if self._reading and self._loop is not None:
            self._loop.remove_reader(self._in_fd)
            self._reading = False

    def _on_readable(self) -> None:
        try:
            data = os.read(self._in_fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._stop_reading()
            self._input_closed()
            return
        self._push(self._filter(data))

    def _filter(self, data: bytes) -> bytes:
        return data

    def _input_closed(self) -> None:
        pass

    def _push(self, data: bytes) -> None:
        if self._feed is None:
            return
        data = self._held + data
        accepted = self._feed(data) if data else 0
        self._held = data[accepted:]
        if self._held:
            self._stop_reading()

    def resume_input(self) -> None:
        if self._held:
            self._push(b"")
        if not self._held:
            self._start_reading()

    def detach(self) -> None:
        """Stop feeding the current UART (its machine is going away); output may go on."""
        self._stop_reading()
        self._held = b""
        self._feed = None

    def close(self) -> None:
        self.detach()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            import select  # noqa: PLC0415 (rare: a full pipe to a slow reader)

            select.select([], [fd], [])
            continue
        except OSError as e:
            if e.errno in (errno.EPIPE, errno.EBADF):
                return  # nobody reads the console any more
            raise
        view = view[n:]


class StdioConsole(Console):
    """The VMM's own stdin/stdout. A terminal is put in raw mode (restored on close)."""

    def __init__(self, *, stdin_fd: int = 0, stdout_fd: int = 1):
        super().__init__()
        self.out_fd = stdout_fd
        self._saved_tty = None
        self._escape = False
        try:
            st = os.fstat(stdin_fd)
        except OSError:
            return  # no stdin at all (CI): output only
        if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
            return  # epoll cannot watch a regular file: output only
        self._in_fd = stdin_fd
        if os.isatty(stdin_fd):
            self._saved_tty = termios.tcgetattr(stdin_fd)
            tty.setraw(stdin_fd)
        os.set_blocking(stdin_fd, False)

    @property
    def is_tty(self) -> bool:
        return self._saved_tty is not None

    def write(self, data: bytes) -> None:
        if self.is_tty:
            data = data.replace(b"\n", b"\r\n")  # raw mode: the terminal no longer adds CR
        _write_all(self.out_fd, data)

    def _filter(self, data: bytes) -> bytes:
        if not self.is_tty:
            return data
        out = bytearray()
        for b in data:
            if self._escape:
                self._escape = False
                if b == ord("x"):
                    if self._on_quit:
                        self._on_quit()
                    continue
                if b == ord("b"):
                    if self._on_break:
                        self._on_break()
                    continue
                if b == ESCAPE:
                    out.append(ESCAPE)
                continue
            if b == ESCAPE:
                self._escape = True
                continue
            out.append(b)
        return bytes(out)

    def close(self) -> None:
        super().close()
        if self._in_fd is not None:
            try:
                os.set_blocking(self._in_fd, True)
            except OSError:
                pass
        restore_terminal(self)


def restore_terminal(console: "StdioConsole") -> None:
    """Put the terminal back as it was (safe to call more than once, from any exit path)."""
    saved, console._saved_tty = console._saved_tty, None
    if saved is not None:
        try:
            termios.tcsetattr(console._in_fd, termios.TCSADRAIN, saved)
        except termios.error:
            pass


class FileConsole(Console):
    """Guest output appended to a file; no input.

    A write to a file can block on the disk, so the loop only queues the batches; one
    writer thread appends them, in order. close() waits until all are written.
    """

    def __init__(self, path: str):
        super().__init__()
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise ConfigError(f"cannot open console file {path}: {e.strerror}") from None
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_out, name="console-file", daemon=True)
        self._writer.start()

    def write(self, data: bytes) -> None:
        self._queue.put(data)

    def _write_out(self) -> None:
        while (data := self._queue.get()) is not None:
            try:
                _write_all(self.fd, data)
            except OSError:
                pass  # a full disk loses console output, never the VM

    def close(self) -> None:
        super().close()
        if self.fd >= 0:
            self._queue.put(None)
            self._writer.join()
            os.close(self.fd)
            self.fd = -1


class SocketConsole(Console):
    """A Unix socket the VMM listens on; one client at a time is the terminal.

    Output while no client is connected is kept (the last `BACKLOG` bytes) and sent when one
    connects, so a client that attaches late sees the boot log.
    """

    BACKLOG = 64 * 1024

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self._client: socket.socket | None = None
        self._backlog = bytearray()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            if os.path.exists(path) and _is_stale_socket(path):
                os.unlink(path)
            self._listener.bind(path)
        except OSError as e:
            self._listener.close()
            raise ConfigError(f"cannot listen on console socket {path}: {e.strerror}") from None
        self._listener.listen(1)
        self._listener.setblocking(False)
        self._listening = False

    def attach(self, loop, feed, on_break=None, on_quit=None) -> None:
        super().attach(loop, feed, on_break, on_quit)
        if not self._listening:
            loop.add_reader(self._listener.fileno(), self._on_accept)
            self._listening = True

    def _on_accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except BlockingIOError:
            return
        if self._client is not None:
            conn.close()  # one terminal at a time
            return
        self._client = conn
        self._in_fd = conn.fileno()
        if self._backlog:
            _write_all(conn.fileno(), bytes(self._backlog))
            self._backlog.clear()
        conn.setblocking(False)
        self._start_reading()

    def _input_closed(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
            self._in_fd = None

    def write(self, data: bytes) -> None:
        if self._client is None:
            self._backlog += data
            del self._backlog[: -self.BACKLOG]
            return
        _write_all(self._client.fileno(), data)

    def close(self) -> None:
        super().close()
        if self._listening:
            self._loop.remove_reader(self._listener.fileno())
            self._listening = False
        if self._client is not None:
            self._client.close()
            self._client = None
        self._listener.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _is_stale_socket(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    finally:
        probe.close()
    raise ConfigError(f"console socket {path} is in use by another process")


def open_console(spec: str) -> Console:
    """The backend for `-l com1,SPEC`: stdio, socket=PATH, or a file PATH."""
    if spec == "stdio":
        return StdioConsole()
    if spec.startswith("socket="):
        return SocketConsole(spec[len("socket=") :])
    return FileConsole(spec)

