"""Run the real Triton kernels on a machine without a GPU.

Triton reads TRITON_INTERPRET when ``@triton.jit`` decorates a kernel, so it is set here, before
any test module imports ``kernels``. On a GPU machine nothing changes and the same tests compile
the kernels for real, at their full-size shapes (see ``tests.equivalence.ON_GPU``).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# Property tests draw the same examples on every run (derandomize): a CI run is reproducible, and
# an example at the edge of the error rule cannot turn one run red and the next green.
from hypothesis import settings

settings.register_profile("vitriton", derandomize=True, print_blob=True)
settings.load_profile("vitriton")
