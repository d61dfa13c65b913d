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
"""

import os

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
