"""One instruction's disassembly, for messages about a vCPU that stopped on it."""

from __future__ import annotations


def disassemble(code: bytes, address: int, bits: int) -> tuple[str, int]:
    """The first instruction in `code`: ('mnemonic operands', its length in bytes).

    The length is 0 when it cannot be decoded (or capstone is missing).
    """
    if not code:
        return "(no instruction bytes)", 0
    try:
        import capstone  # noqa: PLC0415 (only needed when a VM stops on an instruction)
    except ImportError:
        return "(capstone not installed)", 0
    mode = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}[bits]
    md = capstone.Cs(capstone.CS_ARCH_X86, mode)
    for insn in md.disasm(code, address):
        return f"{insn.mnemonic} {insn.op_str}".strip(), insn.size
    return "(undecodable)", 0
