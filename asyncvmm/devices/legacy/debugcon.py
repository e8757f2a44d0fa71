"""The debug console port (QEMU's isa-debugcon at 0x402): bytes a firmware writes there go
to a file (`-l debugcon,PATH`). SeaBIOS and OVMF print their DEBUG output to it, and only
once a read of the port gives back 0xE9 (so with no debugcon they print nothing and cost
no exits)."""

from __future__ import annotations

DEBUGCON_PORT = 0x402
READBACK = 0xE9


class DebugCon:
    def __init__(self, path: str):
        self._file = open(path, "ab", buffering=0)  # noqa: SIM115 (closed by close())
        self._buf = bytearray()
        self.bytes = 0

    def read(self, offset: int, size: int) -> int:
        return READBACK

    def write(self, offset: int, size: int, value: int) -> None:
        self._buf += value.to_bytes(size, "little")[:1]
        self.bytes += 1
        if value & 0xFF == 0x0A or len(self._buf) >= 4096:
            self.flush()

    def flush(self) -> None:
        if self._buf and self._file is not None:
            self._file.write(self._buf)
            self._buf.clear()

    def close(self) -> None:
        if self._file is not None:
            self.flush()
            self._file.close()
            self._file = None
