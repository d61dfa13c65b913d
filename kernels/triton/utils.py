"""What both Triton kernel files need: whether Triton's interpreter runs them, how to launch,
their one dot product, and how to round to bf16 the way a GPU does when the interpreter runs them.

Triton reads TRITON_INTERPRET when ``@triton.jit`` decorates a kernel, so this is read once,
at import, the same moment the kernels are decorated.
"""

import logging
import os

import triton
import triton.language as tl

# Triton's CPU interpreter runs each program one after another in numpy: bf16 is stored as
# uint16 there and `tl.dot` of two bf16 tiles silently returns garbage, so the kernels upcast
# bf16 dot operands to fp32 when this is on (a `tl.constexpr`, so the GPU build keeps native
# bf16 dots). Autotuning in the interpreter would only multiply the run time: one config there.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


class _NoDriverWhileTracing(logging.Filter):
    """Drop torch's warning that it cannot analyse a kernel because this machine has no GPU driver.

    Tracing our custom ops on "meta" tensors (``torch.compile`` of a fused model on a CPU-only
    machine) makes torch ask Triton for the GPU target to find which arguments a kernel mutates;
    with no driver Triton raises, and torch logs a 17-line traceback per kernel, then assumes every
    argument is mutated (harmless: our kernels write only outputs they allocate). That is
    expected there, so it is not shown; any other warning of that logger still is.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (
            record.getMessage().startswith("Encountered an exception in identify_accessed_tensors")
            and isinstance(error, RuntimeError)
            and "0 active drivers" in str(error)
        )


# torch._higher_order_ops.triton_kernel_wrap logs through the "torch._dynamo" logger.
logging.getLogger("torch._dynamo").addFilter(_NoDriverWhileTracing())


def autotune_configs(configs: list[triton.Config], interpreter_config: triton.Config) -> list[triton.Config]:
    """The configs to autotune over: all of them on a GPU, just ``interpreter_config`` when interpreting."""
    return [interpreter_config] if INTERPRETING else configs


@triton.jit
def rounded_to(acc, out_ptr, INTERPRETING: tl.constexpr):
    """The fp32 tile ``acc`` in out_ptr's element type, rounded to nearest even as on a GPU.

    The interpreter's fp32 -> bf16 cast truncates (explicit ``.to`` and the implicit cast of a
    store alike), up to one bf16 ulp off, twice a GPU's error: so there bf16 is rounded on the
    bits: add 0x7FFF plus the lowest kept bit, keep the top half. On a GPU this is ``acc.to``.
    """
    out = acc.to(out_ptr.dtype.element_ty)
    if INTERPRETING and out_ptr.dtype.element_ty == tl.bfloat16:
        bits = acc.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return out


@triton.jit
def dot(a, b, acc, IEEE_FP32: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b, accumulated in fp32: native fp16/bf16 tensor-core dots; fp32 ones exact
    ("ieee") when IEEE_FP32, TF32 otherwise.

    UPCAST is for the interpreter, which stores bf16 as uint16 and whose dot of two bf16 tiles is
    garbage: there the operands are upcast first, which is what the GPU computes anyway (exact
    products, fp32 sums).
    """
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE_FP32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision="tf32")  # for fp16 / bf16 operands the precision is moot
    return acc
