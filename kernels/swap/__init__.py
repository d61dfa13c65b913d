"""Putting vitriton's kernels into the ViTs people already have: timm, torchvision, Hugging Face, ours.

    report = kernels.swap(model)     # in place, on the model you already built and loaded
    print(report)                    # what it replaced, and what it left alone and why
    report.undo()                    # or kernels.unswap(model): the original forwards, exactly

The Liger-Kernel way: ``forward`` is patched on each recognised *instance* (never on a class), so
the weights stay the very same Parameter objects, ``state_dict()`` is unchanged, other models of
the same class are untouched, and nothing has to happen before the model is built. Swapped
modules call with ``backend=None``: Triton where the kernels can take the input, the einsum
fallback otherwise, as ``kernels.use_backend`` / ``VITRITON_BACKEND`` choose.

Where things are: walk.py (``swap``), report.py (the report, undo), targets.py (``TARGETS``, the
README's ``swap_table()``), rows.py (``SwapTarget``, a row of it), redirect.py (a library's own
forward with its SDPA call on our kernels, and its limits), and one file per library with its
forwards and rows: timm.py, torch_nn.py (torch and torchvision), transformers.py (incl. the VLMs).
"""

from kernels.swap.report import SwapEntry, SwapReport, unswap
from kernels.swap.rows import SwapTarget
from kernels.swap.targets import TARGETS, swap_table
from kernels.swap.transformers import register_transformers_attention
from kernels.swap.walk import swap

__all__ = [
    "TARGETS",
    "SwapEntry",
    "SwapReport",
    "SwapTarget",
    "register_transformers_attention",
    "swap",
    "swap_table",
    "unswap",
]

# ``kernels.swap`` is the function (kernels/__init__.py binds the name over this package's), so
# the public names hang on it too, and the README's ``kernels.swap.TARGETS`` and
# ``kernels.swap.swap_table()`` work as written. ``from kernels.swap import ...`` reads the package.
swap.TARGETS = TARGETS
swap.SwapTarget = SwapTarget
swap.SwapReport = SwapReport
swap.SwapEntry = SwapEntry
swap.swap_table = swap_table
swap.register_transformers_attention = register_transformers_attention
swap.unswap = unswap
