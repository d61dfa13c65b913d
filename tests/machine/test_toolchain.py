"""A compile test that cannot compile fails on the pinned toolchain and skips only where the platform lacks it."""

import platform
import sys

import pytest
import triton

from tests.machine.toolchain import cannot_compile


@pytest.fixture
def pinned(monkeypatch):
    """Linux x86_64, Triton 3.8, its bundled ptxas: the toolchain setup.py installs."""
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(triton, "__version__", "3.8.0")
    monkeypatch.delenv("TRITON_PTXAS_PATH", raising=False)
    return monkeypatch


@pytest.mark.parametrize("version", ["3.6.0", "3.7.1", "3.8.0"])
def test_the_pinned_toolchain_fails(pinned, version):
    pinned.setattr(triton, "__version__", version)
    with pytest.raises(pytest.fail.Exception, match=r"the pinned toolchain .* cannot compile for sm_90: no ptxas$"):
        cannot_compile("no ptxas")


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda m: m.setattr(sys, "platform", "darwin"), "darwin x86_64 is not Linux x86_64"),
        (lambda m: m.setattr(platform, "machine", lambda: "aarch64"), "linux aarch64 is not Linux x86_64"),
        (lambda m: m.setattr(triton, "__version__", "3.5.1"), "Triton 3.5.1 is not the pinned 3.6 to 3.8"),
        (lambda m: m.setattr(triton, "__version__", "3.9.0"), "Triton 3.9.0 is not the pinned 3.6 to 3.8"),
        (lambda m: m.setenv("TRITON_PTXAS_PATH", "/opt/ptxas"), "TRITON_PTXAS_PATH=/opt/ptxas replaces the ptxas"),
    ],
    ids=["macos", "arm", "older-triton", "newer-triton", "other-ptxas"],
)
def test_elsewhere_it_skips_saying_what_the_platform_lacks(pinned, change, reason):
    change(pinned)
    with pytest.raises(pytest.skip.Exception, match=rf"^{reason}.*: no ptxas$"):
        cannot_compile("no ptxas")
