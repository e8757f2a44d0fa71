"""The errors asyncvmm raises. Each message is what the user reads.

    VmmError
     ├── ConfigError        bad flag, bad value, missing or unusable file (exit status 2)
     ├── KvmError           /dev/kvm missing, refused, or an ioctl failed
     ├── BootError          a kernel image that cannot be loaded as given
     └── GuestMemoryError   a guest physical address or length outside guest RAM

The exit statuses of `asyncvmm run` are here too (EXIT_*): the runner maps a VM's end to
them and the CLI its errors, and neither imports the other for them.
"""

# Exit statuses of `asyncvmm run` (also in its --help).
EXIT_OK = 0  # the guest powered off (ACPI S5), or reset with --no-reboot
EXIT_ERROR = 1  # the VM stopped on an error: emulation failure, KVM error, unhandled exit
EXIT_USAGE = 2  # bad command line or configuration: nothing was started
EXIT_TRIPLE_FAULT = 3  # the guest triple-faulted with --no-reboot (without it, it restarts)
EXIT_HOST = 4  # stopped hard from the host: SIGINT, a second SIGTERM, SIGHUP, the console Ctrl-A x


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
