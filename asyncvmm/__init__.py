"""asyncvmm: a virtual machine monitor for Linux/KVM, in Python with a small C core.

vCPUs run in native threads (cext/); all device work runs on one asyncio loop.

    from asyncvmm import VM, VmConfig
    async with VM(VmConfig(kernel="guest.elf", memory="64M")) as vm: ...

Errors are VmmError's: ConfigError (a configuration that cannot work), KvmError, BootError.
The VMM's messages go to the logging module's "asyncvmm" loggers.
"""

__version__ = "0.1.0"
__all__ = ["VM", "VmConfig", "PciSlot", "parse_slot", "Stop", "StopReason", "VmmError", "ConfigError", "KvmError",
           "BootError", "BlockBackend"]


def __getattr__(name: str):
    # Imported on first use: `asyncvmm --help` and its errors need none of it.
    if name == "VM":
        from .api import VM

        return VM
    if name in ("VmConfig", "PciSlot", "parse_slot"):
        from . import config

        return getattr(config, name)
    if name in ("VmmError", "ConfigError", "KvmError", "BootError"):
        from . import errors

        return getattr(errors, name)
    if name == "BlockBackend":
        from .devices.virtio.block.backend import BlockBackend

        return BlockBackend
    if name in ("Stop", "StopReason"):
        from . import machine

        return getattr(machine, name)
    raise AttributeError(f"module 'asyncvmm' has no attribute {name!r}")
