"""What both Triton kernel files need: whether Triton's interpreter runs them, and how to launch.

Triton reads TRITON_INTERPRET when ``@triton.jit`` decorates a kernel, so this is read once,
at import, the same moment the kernels are decorated.
"""

import os

import triton

# Triton's CPU interpreter runs each program one after another in numpy: bf16 is stored as
# uint16 there and `tl.dot` of two bf16 tiles silently returns garbage, so the kernels upcast
# bf16 dot operands to fp32 when this is on (a `tl.constexpr`, so the GPU build keeps native
# bf16 dots). Autotuning in the interpreter would only multiply the run time: one config there.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_configs(configs: list[triton.Config], interpreter_config: triton.Config) -> list[triton.Config]:
    """The configs to autotune over: all of them on a GPU, just ``interpreter_config`` when interpreting."""
    return [interpreter_config] if INTERPRETING else configs
