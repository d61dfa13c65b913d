"""What the sm_90 compile tests share: the pinned toolchain, and a line on the terminal per compile.

The pinned toolchain is what setup.py installs on Linux x86_64: Triton 3.6 to 3.8 (what torch 2.11
to 2.14.1 bring) with the ptxas its wheel bundles. There the kernels must compile for sm_90, so a
test that cannot compile fails, saying why; it skips only where the platform lacks that toolchain
(another OS or CPU, another Triton, a ptxas named by TRITON_PTXAS_PATH), and the reason says which.

The compiles take minutes in subprocesses, under pytest's capture: ``Progress`` writes past it.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import sys
import time

import pytest

PINNED_TRITON = ((3, 6), (3, 8))  # setup.py: triton>=3.6,<3.9 on Linux


def platform_lacks() -> str | None:
    """None where the pinned toolchain is what runs, else what this platform has instead."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"{sys.platform} {platform.machine()} is not Linux x86_64, where the pinned Triton wheel bundles ptxas"
    try:
        import triton
    except ImportError:
        return None  # setup.py installs Triton here: its absence is a broken install, not the platform
    found = re.match(r"(\d+)\.(\d+)", triton.__version__)
    version = (int(found[1]), int(found[2])) if found else None
    if version is None or not PINNED_TRITON[0] <= version <= PINNED_TRITON[1]:
        return f"Triton {triton.__version__} is not the pinned 3.6 to 3.8"
    if os.environ.get("TRITON_PTXAS_PATH"):
        return f"TRITON_PTXAS_PATH={os.environ['TRITON_PTXAS_PATH']} replaces the ptxas Triton bundles"
    return None


def cannot_compile(reason: str):
    """Fail on the pinned toolchain, which must compile for sm_90; skip elsewhere, naming what differs."""
    lacks = platform_lacks()
    if lacks is None:
        pytest.fail(f"the pinned toolchain (Triton 3.6-3.8 and its bundled ptxas, Linux x86_64) cannot "
                    f"compile for sm_90: {reason}", pytrace=False)
    pytest.skip(f"{lacks}: {reason}")


def import_triton() -> None:
    """Triton must import to compile; where it does not, ``cannot_compile`` decides."""
    try:
        import triton  # noqa: F401
    except ImportError as error:
        cannot_compile(f"import triton: {error}")


class Progress:
    """``progress("...")`` writes one line to the terminal now, past pytest's capture, with the seconds
    since it was made: the compile tests run for minutes in subprocesses and would say nothing."""

    def __init__(self, config: pytest.Config, what: str):
        has_terminal = config.pluginmanager.get_plugin("terminalreporter") is not None  # not with -p no:terminal
        self.writer = config.get_terminal_writer() if has_terminal else None
        self.capture = config.pluginmanager.get_plugin("capturemanager")
        self.what, self.start = what, time.perf_counter()

    def __call__(self, line: str) -> None:
        if self.writer is None:
            return
        with self.capture.global_and_fixture_disabled() if self.capture else contextlib.nullcontext():
            if self.writer.width_of_current_line:  # after the progress dots of -q
                self.writer.line()
            self.writer.line(f"{self.what} [{time.perf_counter() - self.start:4.0f} s] {line}")
