"""The errors asyncvmm raises. Each message is what the user reads.

    VmmError
     ├── ConfigError        bad flag, bad value, missing or unusable file (exit status 2)
     ├── KvmError           /dev/kvm missing, refused, or an ioctl failed
     ├── BootError          a kernel image that cannot be loaded as given
     └── GuestMemoryError   a guest physical address or length outside guest RAM
"""


class VmmError(Exception):
    """Base of every error asyncvmm raises on purpose."""


class ConfigError(VmmError):
    """The user's configuration cannot work: the command line says so with status 2."""


class KvmError(VmmError):
    """KVM refused or failed something asyncvmm needs."""


class BootError(ConfigError):
    """A kernel, initrd or command line that cannot be loaded into this guest."""


class GuestMemoryError(VmmError):
    """A guest physical range that is not wholly inside guest RAM (the guest's error)."""
