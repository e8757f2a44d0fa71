"""The loader's one error: what the user reads (exit status 2, nothing started)."""

from ..errors import ConfigError


class LoaderError(ConfigError):
    """A disk, filesystem, boot menu or entry the loader cannot boot from, and why."""
