"""Where a COM port goes: the VMM's stdio, a file, a Unix socket or a TCP port (`-l comN,...`).

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
import re
import socket
import stat
import threading
from collections.abc import Callable

from . import seccomp
from .errors import ConfigError

# Terminal control sequences (ECMA-48's CSI ... final byte, and ESC + one byte, as ESC c):
# a firmware's or bootloader's output has them inside words (GRUB's progress indicator,
# drawn on a timer, wrote "Loading Linu\e[03;12H\e[03;13Hx" on a loaded machine).
CONTROL_SEQUENCE = re.compile(rb"\x1b(?:\[[0-?]*[ -/]*[@-~]|[@-Z\\-~])")

# Escape sequence on a terminal, as QEMU's: Ctrl-A then a key.
ESCAPE = 0x01
ESCAPE_HELP = "Ctrl-A x: quit   Ctrl-A b: send a break   Ctrl-A Ctrl-A: send Ctrl-A"
# What Ctrl-A h prints, as QEMU's does (the keys asyncvmm has).
ESCAPE_KEYS = (
    "C-a h    print this help",
    "C-a x    exit the VMM (the VM is stopped at once: status 4)",
    "C-a b    send a break (with a Linux guest's console on ttyS0: a SysRq key follows)",
    "C-a c    (QEMU's monitor: none here; asyncvmm ctl list, then asyncvmm ctl --help)",
    "C-a C-a  send C-a",
)
NO_MONITOR = "no monitor on this console: control the VM from another terminal with asyncvmm ctl (asyncvmm ctl list)"


class Console:
    """Base: output only, no input."""

    def __init__(self):
        self._loop: asyncio.AbstractEventLoop | None = None
        self._feed: Callable[[bytes], int] | None = None
        self._on_break: Callable[[], None] | None = None
        self._on_quit: Callable[[], None] | None = None
        self._held = bytearray()
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
        self._held += data
        accepted = self._feed(bytes(self._held)) if self._held else 0
        del self._held[:accepted]
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
        self._held.clear()
        self._feed = None
        self._on_break = None
        self._on_quit = None

    def close(self) -> None:
        self.detach()


def _write_all(fd: int, data: bytes) -> bool:
    """Write all of `data` (blocking); False if the reader is gone or the write failed."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            import select  # noqa: PLC0415 (a non-blocking fd shared with someone else)

            select.select([], [fd], [], 1.0)
            continue
        except OSError:
            return False  # EPIPE, EIO, ENOSPC...: console output is lost, never the VM
        view = view[n:]
    return True


class OutputThread:
    """Writes batches to an fd in order, from a thread of its own.

    A terminal, a pipe to `less` or a disk can stall; the loop only queues. Past `limit`
    bytes queued, new output is dropped and counted instead of growing without bound.
    """

    def __init__(self, fd: int, name: str, limit: int = 4 << 20):
        self.fd = fd
        self.limit = limit
        self.queued = 0
        self.dropped = 0
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, data: bytes) -> None:
        if self.queued + len(data) > self.limit:
            self.dropped += len(data)
            return
        self.queued += len(data)
        self._queue.put(data)

    def _run(self) -> None:
        while (data := self._queue.get()) is not None:
            seccomp.catch_up()  # started before `asyncvmm run` confined the process
            _write_all(self.fd, data)
            self.queued -= len(data)

    def close(self) -> None:
        """Write out what is queued, then end the thread."""
        self._queue.put(None)
        self._thread.join()


class StdioConsole(Console):
    """The VMM's own stdin/stdout. A terminal is put in raw mode (restored on close)."""

    def __init__(self, *, stdin_fd: int = 0, stdout_fd: int = 1):
        super().__init__()
        self.out_fd = stdout_fd
        self._out = OutputThread(stdout_fd, "console-stdout")
        self._saved_tty = None
        self._escape = False
        self._line_open = False  # the last byte written to the terminal was not a newline
        try:
            st = os.fstat(stdin_fd)
        except OSError:
            return  # no stdin at all (CI): output only
        if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
            return  # epoll cannot watch a regular file: output only
        self._in_fd = stdin_fd
        if os.isatty(stdin_fd):
            import termios  # noqa: PLC0415 (only a terminal needs them: two C modules a piped start skips)
            import tty  # noqa: PLC0415

            self._saved_tty = termios.tcgetattr(stdin_fd)
            tty.setraw(stdin_fd)
        # stdin stays blocking (its open file is shared with the shell and stdout): the
        # loop reads it only when epoll says it is readable.

    @property
    def is_tty(self) -> bool:
        return self._saved_tty is not None

    def write(self, data: bytes) -> None:
        if data:
            self._line_open = not data.endswith(b"\n")
        if self.is_tty:
            data = data.replace(b"\n", b"\r\n")  # raw mode: the terminal no longer adds CR
        self._out.put(data)

    def _say(self, lines) -> None:
        """Our own lines on the terminal, between the guest's (from a line of their own)."""
        text = ("\r\n" if self._line_open else "") + "".join(f"{line}\r\n" for line in lines)
        self._line_open = False
        self._out.put(text.encode())

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
                if b in (ord("h"), ord("?")):
                    self._say(ESCAPE_KEYS)
                    continue
                if b == ord("c"):
                    self._say([NO_MONITOR])
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
        if self._line_open and os.isatty(self.out_fd):  # what the VMM says next starts a line
            self._out.put(b"\r\n" if self.is_tty else b"\n")
        self._out.close()
        restore_terminal(self)


def restore_terminal(console: "StdioConsole") -> None:
    """Put the terminal back as it was (safe to call more than once, from any exit path)."""
    saved, console._saved_tty = console._saved_tty, None
    if saved is not None:
        import termios  # noqa: PLC0415 (imported when the terminal was saved)

        try:
            termios.tcsetattr(console._in_fd, termios.TCSADRAIN, saved)
        except termios.error:
            pass


class FileConsole(Console):
    """Guest output appended to a file; no input.

    A write to a file can block on the disk: an OutputThread appends the batches, in
    order. close() waits until all are written.
    """

    def __init__(self, path: str):
        super().__init__()
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise ConfigError(f"cannot open console file {path}: {e.strerror}") from None
        self._out = OutputThread(self.fd, "console-file")

    def write(self, data: bytes) -> None:
        self._out.put(data)

    def close(self) -> None:
        super().close()
        if self.fd >= 0:
            self._out.close()
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
        # bytes sent to clients, output dropped from a full backlog, clients accepted
        self.counters = {"bytes_out": 0, "dropped": 0, "clients": 0}
        self._client: socket.socket | None = None
        self._backlog = bytearray()
        self._listener = self._listen()
        self._listener.listen(1)
        self._listener.setblocking(False)
        self._listening = False
        self._writing = False

    @property
    def connected(self) -> bool:
        return self._client is not None

    def _listen(self) -> socket.socket:
        path = self.path
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            if os.path.exists(path) and _is_stale_socket(path):
                os.unlink(path)
            listener.bind(path)
        except OSError as e:
            listener.close()
            raise ConfigError(f"cannot listen on console socket {path}: {e.strerror}") from None
        return listener

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
        if self._client is not None and self._client_alive():
            conn.close()  # one terminal at a time
            return
        self._drop_client()
        conn.setblocking(False)
        self.counters["clients"] += 1
        self._client = conn
        self._in_fd = conn.fileno()
        self._start_reading()
        self._flush()  # the output kept while nobody was connected

    def _client_alive(self) -> bool:
        """Whether the current client is still there (it may have left while its input
        was held back, when nothing was reading its socket)."""
        try:
            return self._client.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            return True
        except OSError:
            return False

    def _input_closed(self) -> None:
        self._drop_client()

    def _drop_client(self) -> None:
        if self._client is None:
            return
        if self._writing:
            self._loop.remove_writer(self._client.fileno())
            self._writing = False
        self._stop_reading()
        self._client.close()
        self._client = None
        self._in_fd = None

    def write(self, data: bytes) -> None:
        # Output waits in the backlog (bounded: the oldest bytes go first) until the
        # client's socket takes it; the loop never blocks on a client that does not read.
        self._backlog += data
        over = len(self._backlog) - self.BACKLOG
        if over > 0:
            del self._backlog[:over]
            self.counters["dropped"] += over
        if self._client is not None and not self._writing:
            self._flush()

    def _flush(self) -> None:
        if self._client is None:
            return
        while self._backlog:
            try:
                n = self._client.send(self._backlog)
            except BlockingIOError:
                break
            except OSError:
                self._drop_client()  # gone: keep the output for the next client
                return
            self.counters["bytes_out"] += n
            del self._backlog[:n]
        want = bool(self._backlog)
        if want != self._writing:
            if want:
                self._loop.add_writer(self._client.fileno(), self._flush)
            else:
                self._loop.remove_writer(self._client.fileno())
            self._writing = want

    def close(self) -> None:
        super().close()
        if self._listening:
            self._loop.remove_reader(self._listener.fileno())
            self._listening = False
        self._drop_client()
        self._listener.close()
        self._unlink()

    def _unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class TcpConsole(SocketConsole):
    """bhyve's `tcp=HOST:PORT`: a TCP port the VMM listens on, otherwise as SocketConsole
    (one client at a time: a second one is disconnected at once while the first stays;
    output kept, bounded, until a client connects). telnet or nc is the terminal."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        super().__init__(f"{format_tcp(host, port)}")

    def _listen(self) -> socket.socket:
        try:
            return tcp_listener(self.host, self.port)
        except OSError as e:
            raise ConfigError(f"cannot listen on tcp={self.path}: {e.strerror}") from None

    def _on_accept(self) -> None:
        super()._on_accept()
        if self._client is not None:  # interactive: no Nagle delay on echoed keystrokes
            try:
                self._client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def _unlink(self) -> None:
        pass


class NullConsole(Console):
    """Nowhere: output is discarded and there is no input (COM1 when `-l` sends another
    port to stdio and says nothing of COM1)."""

    def write(self, data: bytes) -> None:
        pass


def parse_tcp(spec: str) -> tuple[str, int]:
    """`HOST:PORT` or `[IPV6]:PORT` of `tcp=...`; ValueError names what is wrong."""
    host, sep, port = spec.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("use tcp=HOST:PORT (a port 1-65535)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def format_tcp(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def tcp_listener(host: str, port: int) -> socket.socket:
    """A bound TCP socket (not yet listening) for HOST:PORT; OSError if it cannot be."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    listener = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT of the last run
        listener.bind(addr)
    except BaseException:
        listener.close()
        raise
    return listener


def socket_path_problem(path: str) -> str | None:
    """Why a Unix socket cannot be bound at `path` (None: it can; a stale socket is fine)."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        return f"cannot be made: no directory {directory}"
    if len(os.fsencode(path)) >= 108:
        return "is too long a path for a Unix socket (107 bytes at most)"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISSOCK(st.st_mode):
        return "exists and is not a socket"
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return None  # left by a process that is gone: it is replaced
    except OSError as e:
        return f"cannot be checked: {e.strerror}"
    finally:
        probe.close()
    return "is in use by another process (it is listening on it)"


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
    """The backend for `-l comN,SPEC`: stdio, socket=PATH, tcp=HOST:PORT, or a file PATH
    ("" is nowhere)."""
    if spec == "stdio":
        return StdioConsole()
    if spec.startswith("socket="):
        return SocketConsole(spec[len("socket=") :])
    if spec.startswith("tcp="):
        return TcpConsole(*parse_tcp(spec[len("tcp=") :]))
    if not spec:
        return NullConsole()
    return FileConsole(spec)


def check_console(spec: str, where: str) -> None:
    """Whether `open_console(spec)` can work, checked before anything starts: a socket
    path a live VMM listens on, a tcp port in use, a file in a missing directory.
    Raises ConfigError naming `where` (the option)."""
    if spec.startswith("tcp="):
        try:
            host, port = parse_tcp(spec[len("tcp=") :])
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        try:
            tcp_listener(host, port).close()
        except socket.gaierror as e:
            raise ConfigError(f"{where}: cannot resolve {host}: {e.strerror}") from None
        except OSError as e:
            why = "in use" if e.errno == errno.EADDRINUSE else e.strerror
            raise ConfigError(f"{where}: cannot listen on {format_tcp(host, port)}: {why}") from None
        return
    if spec.startswith("socket="):
        path = spec[len("socket=") :]
        why = socket_path_problem(path)
        if why:
            raise ConfigError(f"{where}: console socket {path} {why}")
        return
    elif spec in ("stdio", ""):
        return
    elif os.path.isdir(spec):
        raise ConfigError(f"{where}: {spec} is a directory")
    else:
        path = os.path.dirname(spec) or "."
    if not os.path.isdir(path):
        raise ConfigError(f"{where}: no such directory {path}")

