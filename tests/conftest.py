"""Run the real Triton kernels on a machine without a GPU.

Triton reads TRITON_INTERPRET when ``@triton.jit`` decorates a kernel, so it is set here, before
any test module imports ``kernels``. On a GPU machine nothing changes and the same tests compile
the kernels for real, at their full-size shapes (see ``tests.equivalence.ON_GPU``).

Hypothesis profiles, chosen by the environment variable ``VITRITON_HYPOTHESIS``:
- unset or ``vitriton`` (CI): the same examples on every run (derandomized), so a run is reproducible;
- ``fresh``: new random examples on every run (up to 300 per test), to hunt for failures the
  fixed ones miss: ``VITRITON_HYPOTHESIS=fresh pytest tests -k "property or random_lengths"``
  (every ``@given`` test today). A failure prints its ``@reproduce_failure`` line, and the example
  database (``.hypothesis/``) replays it first on the next fresh run. A test's own
  ``@settings(max_examples=...)`` wins over the profile's, so to draw more of those, run again.

Markers, registered below (``pytest tests -m "not slow"`` is the fast subset: about 3 minutes on a
2-core CPU, against about 18 for the whole suite, and it still calls every public function):
``slow`` (over ~3 s on a 2-core CPU; where a parametrized test's cases add up to over ~5 s, its
costly cases, the fast subset keeping the cheap ones; and every compile for sm_90),
``interpreter`` (runs the real Triton kernels: in the interpreter on a CPU, compiled on a GPU),
``subprocess`` (spawns Python), ``gpu`` (needs a CUDA GPU: skipped without one, with the reason
given as ``gpu(reason=...)``). The fixtures ``no_launches`` and ``fresh_warnings`` at the end are
shared by the robustness tests (tests/*/test_robustness.py).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# Property tests draw the same examples on every run (derandomize): a CI run is reproducible, and
# an example at the edge of the error rule cannot turn one run red and the next green. The "fresh"
# profile draws new ones each run (see the docstring); it is never the default.
from hypothesis import settings

settings.register_profile("vitriton", derandomize=True, print_blob=True)
settings.register_profile("fresh", derandomize=False, max_examples=300, deadline=None, print_blob=True)
_PROFILE = os.environ.get("VITRITON_HYPOTHESIS", "").strip().lower() or "vitriton"
if _PROFILE not in ("vitriton", "fresh"):
    raise ValueError(f"VITRITON_HYPOTHESIS: expected 'vitriton' or 'fresh' (or unset), got {_PROFILE!r}")
settings.load_profile(_PROFILE)


MARKERS = {
    "slow": "over ~3 s on a 2-core CPU (or the costly cases of a parametrized test whose cases add up to over "
            "~5 s), or a compile for sm_90; -m 'not slow' leaves them out",
    "interpreter": "runs the real Triton kernels (in Triton's interpreter on a CPU, compiled on a GPU)",
    "subprocess": "spawns a Python process",
    "gpu": "needs a CUDA GPU; skipped without one, saying why (gpu(reason=...))",
}


def pytest_configure(config):
    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    for item in items:
        marker = item.get_closest_marker("gpu")
        if marker is not None:
            reason = marker.kwargs.get("reason", "")
            item.add_marker(pytest.mark.skip(reason=f"needs a CUDA GPU{': ' + reason if reason else ''}"))


@pytest.fixture
def no_launches(monkeypatch):
    """Every Triton launch of the kernels goes through ``torch.library.wrap_triton``: make it fail."""

    def refuse(kernel):
        raise AssertionError(f"launched {getattr(kernel, '__name__', kernel)}")

    monkeypatch.setattr(torch.library, "wrap_triton", refuse)


@pytest.fixture
def fresh_warnings(monkeypatch):
    """The warn-once set is module state: start each test that counts warnings from an empty one."""
    from kernels import backend

    monkeypatch.setattr(backend, "_warned", set())
