"""What -g and -G say (parsed with no networking imported: the command line's floor)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

DEFAULT_ADDRESS = "127.0.0.1"


@dataclass(frozen=True)
class GdbOptions:
    """What -g/-G say: where to listen, and whether the guest waits for a client."""

    port: int
    address: str = DEFAULT_ADDRESS
    wait: bool = False


def parse_gdb(text: str, flag: str = "-G") -> GdbOptions:
    """`-G [w][ADDRESS:]PORT` (bhyve); `-g PORT` is the same without w or an address."""
    spec = text
    wait = flag == "-G" and spec.startswith("w")
    if wait:
        spec = spec[1:]
    address = DEFAULT_ADDRESS
    if flag == "-G" and ":" in spec:
        address, _, spec = spec.rpartition(":")
        address = address.strip("[]")
        if not address:
            raise ConfigError(f"{flag} {text}: no address before the ':'")
    if not spec.isdigit() or not 1 <= int(spec) <= 65535:
        form = "[w][ADDRESS:]PORT" if flag == "-G" else "PORT"
        raise ConfigError(f"{flag} {text}: use {form}, PORT from 1 to 65535")
    return GdbOptions(int(spec), address, wait)
