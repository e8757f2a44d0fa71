"""A small asyncio service around asyncvmm: boot a guest, run a command on its console,
return the output. (The guest is tests/guests' tinysh, a stand-in for a Linux shell.)

    .venv/bin/python tools/examples/shell_service.py "echo hello" "add 2 40" date

It runs from any directory: the guest is found beside this script, in the clone's build/.
"""

import asyncio
import re
import sys
from pathlib import Path

from asyncvmm import VM, VmConfig

REPO = Path(__file__).resolve().parents[2]
KERNEL = REPO / "build" / "guests" / "tinysh.elf"  # built by tools/setup


async def run_in_guest(command: str) -> str:
    """Boot a fresh guest, run `command` at its prompt, return what it printed."""
    # Unnamed VMs get names of their own (asyncvmm-PID-N): any number may run at once.
    async with VM(VmConfig(memory="64M", kernel=str(KERNEL))) as vm:
        await vm.console.expect(rb"# ")  # the prompt
        vm.console.writer.write(command.encode() + b"\n")
        await vm.console.writer.drain()
        # The guest echoes the command line, then prints its output and a new prompt.
        m = await vm.console.expect(rb"(?s)" + re.escape(command.encode()) + rb"\n(.*?)# ", timeout=30)
        return m.group(1).decode()
    # leaving `async with` stops the guest and releases everything


async def main(commands: list[str]) -> None:
    # One guest per command, all at once, on this one loop.
    outputs = await asyncio.gather(*(run_in_guest(c) for c in commands))
    for command, output in zip(commands, outputs, strict=True):
        print(f"$ {command}\n{output}", end="")


if __name__ == "__main__":
    if not KERNEL.exists():
        sys.exit(f"shell_service: the guest {KERNEL} is not built: run {REPO / 'tools' / 'setup'} first")
    asyncio.run(main(sys.argv[1:] or ["echo hello from a guest"]))
