"""What a bare ``pytest --benchmark-only`` collects, and the benchmarks' one option.

The design card's benchmark command, ``pytest --benchmark-only`` from the repository root with no
path, times ``bench/`` only: ``tests/`` is left out (pytest-benchmark would skip every test there
as "not a benchmark"). A path says what to collect, as always: ``pytest tests`` is the test suite,
``pytest bench ...`` the benchmarks. ``--bench-sweep`` (every shape, batch, dtype and pass; see
bench/conftest.py) is registered here because pytest takes options only from the conftest files
it loads at start-up, and a bare run loads bench/conftest.py later, while collecting.

Every pytest run loads this file, so it imports nothing of the package: tests/conftest.py must
set TRITON_INTERPRET before ``kernels`` is first imported.
"""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent


def pytest_addoption(parser):
    parser.addoption(
        "--bench-sweep",
        action="store_true",
        help="bench/: time every shape, batch, dtype and pass (by default one representative size per file)",
    )


def pytest_ignore_collect(collection_path, config):
    """Leave tests/ out of ``pytest --benchmark-only`` run from the repository root with no path."""
    if Path(collection_path).resolve() != ROOT / "tests" or not config.getoption("benchmark_only", False):
        return None
    bare = config.args_source is pytest.Config.ArgsSource.INVOCATION_DIR
    return True if bare and Path(config.invocation_params.dir).resolve() == ROOT else None
