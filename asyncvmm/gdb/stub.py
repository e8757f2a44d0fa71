"""The protocol's commands (the GDB manual, "Packets"), one handler each.

A Session is one client's conversation with a Target; `handle(payload)` returns the
reply payload, or None when the reply comes later (a stop reply after `c`, `s`,
`vCont` or `?` while the vCPUs are still being stopped). Threads are vCPUs: thread ID
i+1 is vCPU i (IDs 0 and -1 mean "any" and "all").
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ..log import get_logger
from .breakpoints import Kind
from .packets import PACKET_SIZE, unescape
from .registers import G_PACKET_BYTES, LAYOUT, REGNUM, target_xml
from .target import Signal, State, StopEvent, Target, TargetError

log = get_logger("asyncvmm.gdb")

OK = b"OK"
EMPTY = b""  # "not supported"


def error(code: int = 1) -> bytes:
    return b"E%02x" % code


E_BAD_PACKET = 1  # malformed
E_TARGET = 2  # the target cannot do it (running, no memory there, no free debug register)
E_MEMORY = 14  # EFAULT, as gdb's own gdbserver answers for unreadable memory

SUPPORTED = (f"PacketSize={PACKET_SIZE:x};qXfer:features:read+;QStartNoAckMode+;"
             "swbreak+;hwbreak+;vContSupported+").encode()
_HEX = re.compile(rb"^[0-9a-fA-F]+$")


class BadPacket(Exception):
    pass


def _hex(text: bytes) -> int:
    if not _HEX.match(text):
        raise BadPacket(text)
    return int(text, 16)


def _hexbytes(text: bytes) -> bytes:
    try:
        return bytes.fromhex(text.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        raise BadPacket(text) from None


def _thread_id(text: bytes) -> int:
    """A thread-id as gdb writes it: -1 all, 0 any, else a vCPU's ID + 1 (pPID.TID: TID)."""
    if b"." in text:
        text = text.split(b".", 1)[1]
    if text.startswith(b"p"):
        text = text[1:]
    if text == b"-1":
        return -1
    return _hex(text)


class Session:
    """One client. `send_stop(payload)` delivers a stop reply that comes later;
    `kill()` stops the VM."""

    def __init__(self, target: Target, send_stop: Callable[[bytes], None], kill: Callable[[], None]):
        self.target = target
        self.send_stop = send_stop
        self.kill = kill
        self.no_ack = False
        self.g_thread = 0  # vCPU for registers and memory (Hg)
        self.c_thread = -1  # vCPU(s) for c and s (Hc); -1 all
        self.waiting = False  # a stop reply is owed
        self.detached = False
        self.last_stop: StopEvent | None = None
        self.handlers: dict[bytes, Callable[[bytes], bytes | None]] = {
            b"?": self._why, b"g": self._read_regs, b"G": self._write_regs, b"p": self._read_reg,
            b"P": self._write_reg, b"m": self._read_mem, b"M": self._write_mem, b"X": self._write_mem,
            b"c": self._continue, b"s": self._step, b"C": self._continue, b"S": self._step,
            b"H": self._set_thread, b"T": self._thread_alive, b"Z": self._insert, b"z": self._remove,
            b"D": self._detach, b"k": self._kill, b"q": self._query, b"Q": self._set, b"v": self._v,
        }
        target.on_stop = self._on_stop
        target.attach()

    def retarget(self, target: Target) -> None:
        """A new boot (the guest reset): the same client, the new machine."""
        self.target = target
        target.on_stop = self._on_stop
        if not self.waiting:
            target.attach()
        else:
            target.state = State.RUNNING

    # -- dispatch ----------------------------------------------------------------------
    def handle(self, payload: bytes) -> bytes | None:
        if not payload:
            return EMPTY
        handler = self.handlers.get(payload[:1])
        if handler is None:
            return EMPTY
        try:
            return handler(payload)
        except BadPacket:
            return error(E_BAD_PACKET)
        except TargetError as e:
            log.info(f"gdb: {e}")
            return error(E_TARGET)
        except (ValueError, IndexError, OverflowError):
            return error(E_BAD_PACKET)

    def interrupt(self) -> None:
        if self.waiting and self.target.state is State.RUNNING:
            self.target.interrupt(self._first(self.c_thread))

    # -- stops -------------------------------------------------------------------------
    def _on_stop(self, event: StopEvent) -> None:
        self.last_stop = event
        self.g_thread = self.c_thread = event.vcpu
        if self.waiting:
            self.waiting = False
            self.send_stop(self._stop_reply(event))

    def _stop_reply(self, event: StopEvent) -> bytes:
        extra = b""
        if event.why == "watch":
            extra = b"watch:%x;" % event.addr
        elif event.why in ("swbreak", "hwbreak"):
            extra = event.why.encode() + b":;"
        return b"T%02x%sthread:%x;" % (event.signal, extra, event.vcpu + 1)

    def _why(self, _p: bytes) -> bytes | None:
        t = self.target
        if t.state is State.STOPPED:
            event = self.last_stop or (t.pending[0] if t.pending else StopEvent(0, Signal.TRAP))
            return self._stop_reply(event)
        if t.state is State.RUNNING:
            t.attach()
        self.waiting = True
        return None

    # -- registers ---------------------------------------------------------------------
    def _read_regs(self, _p: bytes) -> bytes:
        return self.target.registers(self._first(self.g_thread)).read_all().hex().encode()

    def _write_regs(self, p: bytes) -> bytes:
        data = _hexbytes(p[1:])
        if len(data) != G_PACKET_BYTES:
            raise BadPacket(p[:16])
        self.target.registers(self._first(self.g_thread)).write_all(data)
        return OK

    def _read_reg(self, p: bytes) -> bytes:
        num = _hex(p[1:])
        if num >= len(LAYOUT):
            return error(E_BAD_PACKET)
        return self.target.registers(self._first(self.g_thread)).read(num).hex().encode()

    def _write_reg(self, p: bytes) -> bytes:
        num_text, sep, value = p[1:].partition(b"=")
        if not sep:
            raise BadPacket(p)
        num = _hex(num_text)
        if num >= len(LAYOUT):
            return error(E_BAD_PACKET)
        try:
            self.target.registers(self._first(self.g_thread)).write(num, _hexbytes(value))
        except ValueError as e:
            raise TargetError(str(e)) from None
        return OK

    # -- memory ------------------------------------------------------------------------
    @staticmethod
    def _addr_len(text: bytes) -> tuple[int, int]:
        addr, sep, length = text.partition(b",")
        if not sep:
            raise BadPacket(text)
        a, n = _hex(addr), _hex(length)
        if a >= 1 << 64:
            raise BadPacket(text)
        return a, n

    def _read_mem(self, p: bytes) -> bytes:
        addr, length = self._addr_len(p[1:])
        length = min(length, PACKET_SIZE // 2)  # the reply's hex must fit a packet
        try:
            return self.target.read_memory(self._first(self.g_thread), addr, length).hex().encode()
        except TargetError:
            return error(E_MEMORY)

    def _write_mem(self, p: bytes) -> bytes:
        """`M addr,length:XX...` (hex) or `X addr,length:...` (binary, escaped)."""
        where, sep, data = p[1:].partition(b":")
        if not sep:
            raise BadPacket(p)
        addr, length = self._addr_len(where)
        raw = unescape(data) if p[:1] == b"X" else _hexbytes(data)
        if len(raw) != length:
            raise BadPacket(p[:32])
        return self._store(addr, raw)

    def _store(self, addr: int, raw: bytes) -> bytes:
        if not raw:
            return OK  # gdb's probe of X
        try:
            self.target.write_memory(self._first(self.g_thread), addr, raw)
        except TargetError as e:
            log.info(f"gdb: memory write refused: {e}")
            return error(E_MEMORY)
        return OK

    # -- execution ---------------------------------------------------------------------
    def _vcpus(self, thread: int) -> list[int]:
        """The vCPUs a thread-id names (-1 all, 0 any: all)."""
        if thread in (-1, 0):
            return list(range(self.target.n))
        return [thread - 1]

    @staticmethod
    def _first(vcpu: int) -> int:
        """A vCPU for a request on one: -1 ("all") means the first."""
        return max(vcpu, 0)

    def _resume(self, actions: dict[int, str]) -> None:
        self.target.resume(actions)
        self.waiting = True

    def _continue(self, p: bytes) -> bytes | None:
        self._check_resume_addr(p)
        self._resume({i: "c" for i in range(self.target.n)})
        return None

    def _step(self, p: bytes) -> bytes | None:
        self._check_resume_addr(p)
        self._resume({self._first(self.c_thread): "s"})
        return None

    def _check_resume_addr(self, p: bytes) -> None:
        """`c ADDR` / `s ADDR` resume elsewhere (C/S carry a signal we do not deliver)."""
        arg = p[1:]
        if p[:1] in b"CS":
            arg = arg.partition(b";")[2]
        if arg:
            addr = _hex(arg)
            rf = self.target.registers(self._first(self.c_thread))
            rf.set(REGNUM["rip"], addr)

    def _v(self, p: bytes) -> bytes | None:
        if p == b"vCont?":
            return b"vCont;c;C;s;S"
        if p.startswith(b"vCont;"):
            return self._vcont(p[6:])
        if p.startswith(b"vKill"):
            return self._kill(p)
        if p == b"vMustReplyEmpty":
            return EMPTY
        return EMPTY

    def _vcont(self, text: bytes) -> bytes | None:
        """vCont;ACTION[:THREAD];... — the first action naming a vCPU is its action;
        one without a thread applies to every vCPU no earlier action named."""
        actions: dict[int, str] = {}
        for part in text.split(b";"):
            act, _, thread = part.partition(b":")
            if not act or act[:1] not in b"cCsS" or (len(act) > 1 and not _HEX.match(act[1:])):
                if act[:1] in b"tr":
                    return error(E_BAD_PACKET)  # stop and range-step: not offered in vCont?
                raise BadPacket(part)
            kind = "s" if act[:1] in b"sS" else "c"
            targets = self._vcpus(_thread_id(thread)) if thread else list(range(self.target.n))
            for i in targets:
                if not 0 <= i < self.target.n:
                    raise BadPacket(part)
                actions.setdefault(i, kind)
        if not actions:
            raise BadPacket(text)
        self._resume(actions)
        return None

    def _set_thread(self, p: bytes) -> bytes:
        """Hg/Hc: the vCPU later requests are for. 0 (any) keeps the current one; -1
        (all) makes `c`/`s` apply to every vCPU."""
        op, thread = p[1:2], _thread_id(p[2:])
        if op not in (b"g", b"c"):
            raise BadPacket(p)
        if thread > 0:
            if thread > self.target.n:
                return error(E_TARGET)
            if op == b"g":
                self.g_thread = thread - 1
            else:
                self.c_thread = thread - 1
        elif thread == -1 and op == b"c":
            self.c_thread = -1
        return OK

    def _thread_alive(self, p: bytes) -> bytes:
        thread = _thread_id(p[1:])
        return OK if 1 <= thread <= self.target.n else error(E_TARGET)

    # -- breakpoints -------------------------------------------------------------------
    def _z(self, p: bytes) -> tuple[Kind, int, int]:
        fields = p[1:].split(b";", 1)[0].split(b",")
        if len(fields) != 3:
            raise BadPacket(p)
        try:
            kind = Kind(_hex(fields[0]))
        except ValueError:
            raise BadPacket(p) from None
        return kind, _hex(fields[1]), _hex(fields[2])

    def _insert(self, p: bytes) -> bytes:
        kind, addr, length = self._z(p)
        self.target.insert(self._first(self.g_thread), kind, addr, length)
        return OK

    def _remove(self, p: bytes) -> bytes:
        kind, addr, length = self._z(p)
        self.target.remove(kind, addr, length)
        return OK

    # -- the session -------------------------------------------------------------------
    def _detach(self, _p: bytes) -> bytes:
        self.target.detach()
        self.detached = True
        return OK

    def _kill(self, _p: bytes) -> bytes | None:
        self.detached = True
        self.kill()
        return OK

    def _query(self, p: bytes) -> bytes | None:
        if p.startswith(b"qSupported"):
            return SUPPORTED
        if p.startswith(b"qXfer:features:read:"):
            return self._xfer_features(p[len(b"qXfer:features:read:"):])
        if p == b"qfThreadInfo":
            return b"m" + b",".join(b"%x" % (i + 1) for i in range(self.target.n))
        if p == b"qsThreadInfo":
            return b"l"
        if p == b"qC":
            return b"QC%x" % (self._first(self.g_thread) + 1)
        if p.startswith(b"qAttached"):
            return b"1"  # an existing "process": detach, not kill, when gdb quits
        if p.startswith(b"qThreadExtraInfo,"):
            thread = _thread_id(p.split(b",", 1)[1])
            if not 1 <= thread <= self.target.n:
                return error(E_TARGET)
            return self.target.describe(thread - 1).encode().hex().encode()
        if p.startswith(b"qSymbol"):
            return OK
        return EMPTY

    def _xfer_features(self, rest: bytes) -> bytes:
        annex, sep, span = rest.partition(b":")
        if not sep or annex != b"target.xml":
            return error(E_TARGET)
        offset, length = self._addr_len(span)
        doc = target_xml()
        chunk = doc[offset : offset + min(length, PACKET_SIZE - 16)]
        return (b"l" if offset + len(chunk) >= len(doc) else b"m") + chunk

    def _set(self, p: bytes) -> bytes:
        if p == b"QStartNoAckMode":
            self.no_ack = True
            return OK
        return EMPTY
