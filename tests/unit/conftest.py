import pytest

from asyncvmm.vstate.memory import GuestMemory


@pytest.fixture
def mem():
    """64 MiB of guest RAM with no VM: what loaders and models write into."""
    m = GuestMemory(64 << 20)
    yield m
    m.close()
