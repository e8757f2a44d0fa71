"""asyncvmm: a virtual machine monitor for Linux/KVM, in Python with a small C core.

vCPUs run in native threads (cext/); all device work runs on one asyncio loop.
See DESIGN.md in the project's shared notes and the README.
"""

__version__ = "0.1.0"
