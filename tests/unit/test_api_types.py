"""The embedding API's types, as a Python caller meets them (no guest is booted)."""

from __future__ import annotations

import inspect

import pytest
from conftest import ROOT

import asyncvmm
from asyncvmm import VM, ConfigError, PciSlot, VmConfig, parse_slot
from asyncvmm.config import MiB

KERNEL = str(ROOT / "pyproject.toml")  # readable: enough for what is checked before start


def test_the_package_exports_what_a_caller_needs():
    for name in asyncvmm.__all__:
        assert getattr(asyncvmm, name) is not None
    assert issubclass(ConfigError, asyncvmm.VmmError)
    assert parse_slot("3,virtio-blk,disk.img") == PciSlot(0, 3, 0, "virtio-blk", "disk.img")


def test_memory_takes_a_size_string_as_dash_m_does():
    assert VmConfig(memory="64M").memory == 64 * MiB
    assert VmConfig(memory="2G").memory == 2 << 30
    assert VmConfig(memory=64 << 20).memory == 64 * MiB
    with pytest.raises(ConfigError, match=r"^memory='64X': not a size"):
        VmConfig(memory="64X")


def test_memory_below_a_mib_is_refused_as_bytes_not_mib():
    with pytest.raises(ConfigError) as e:
        VM(VmConfig(kernel=KERNEL, memory=64))
    assert str(e.value).startswith("memory=64 is bytes")
    assert "64 << 20" in str(e.value) and '"64M"' in str(e.value)


@pytest.mark.parametrize(
    "kw, words",
    [
        ({}, ["no kernel given: VmConfig(kernel=PATH)"]),
        ({"kernel": KERNEL, "cpus": 0}, ["cpus=0", "at least one vCPU"]),
        ({"kernel": KERNEL, "memory": 1 << 20}, ["memory=1048576", "at least 2 MiB"]),
        ({"kernel": KERNEL, "cpu_template": "fast"}, ["cpu_template='fast'", "host or baseline"]),
        ({"kernel": KERNEL, "decompress": "maybe"}, ["decompress='maybe'"]),
        ({"kernel": KERNEL, "pins": {3: 0}}, ["pins={3: 0}", "no vCPU 3"]),
        ({"kernel": KERNEL, "symbols": "/no/such/map"}, ["symbols /no/such/map", "no such file"]),
        ({"kernel": KERNEL, "name": "a/b"}, ["VM name 'a/b'"]),
    ],
)
def test_errors_speak_python_to_a_python_caller(kw, words):
    with pytest.raises(ConfigError) as e:
        VM(VmConfig(**kw))  # refused at construction: nothing started
    for w in words:
        assert w in str(e.value), str(e.value)
    assert not any(flag in str(e.value) for flag in ("--kernel", "-m ", "-c ", "--cpu", "-p ")), str(e.value)


def test_unnamed_vms_get_names_of_their_own():
    a, b = VmConfig(), VmConfig()
    assert a.name != b.name and a.name.startswith("asyncvmm-")


def test_help_documents_every_public_method_and_field():
    for cls in (VM, VmConfig):
        for name, member in inspect.getmembers(cls):
            if (name.startswith("_") and name not in ("__aenter__", "__aexit__")) or not (
                inspect.isfunction(member) or isinstance(member, property)
            ):
                continue
            assert member.__doc__, f"{cls.__name__}.{name} has no docstring"
    for field in VmConfig.__dataclass_fields__:
        assert field in VmConfig.__doc__, f"VmConfig.{field} is not documented"
