"""asyncvmm: a virtual machine monitor for Linux/KVM, in Python with a small C core.

vCPUs run in native threads (cext/); all device work runs on one asyncio loop.

    from asyncvmm import VM, VmConfig
    async with VM(VmConfig(kernel="guest.elf")) as vm: ...
"""

__version__ = "0.1.0"
__all__ = ["VM", "VmConfig", "Stop", "StopReason"]


def __getattr__(name: str):
    # Imported on first use: `asyncvmm --help` and its errors need none of it.
    if name == "VM":
        from .api import VM

        return VM
    if name == "VmConfig":
        from .config import VmConfig

        return VmConfig
    if name in ("Stop", "StopReason"):
        from . import machine

        return getattr(machine, name)
    raise AttributeError(f"module 'asyncvmm' has no attribute {name!r}")
