"""The backend choice: "triton", "einsum" or "auto", per call, per block of code, per process.

  ``"triton"``  the fused kernels of ``kernels/triton/``: CUDA tensors, or CPU tensors when
                Triton's interpreter is on (``TRITON_INTERPRET=1``, how the tests run the real
                kernels without a GPU). Input they cannot take is a one-line error.
  ``"einsum"``  the fallback of ``kernels/reference/``: any device, any float dtype, every
                autograd transform; float16/bfloat16 computed in float32, memory bounded.
  ``"auto"``    triton where the kernels can take the input (device, dtype, head dim, sizes,
                autograd mode), einsum otherwise with a one-time warning naming why.

The switches, from the narrowest: ``backend=`` per call; ``with use_backend(name):`` for a block
of code, in this thread or asyncio task only (a ``contextvars`` variable); ``VITRITON_BACKEND``
for the process, read at import. The ``vit`` modules' ``fused`` flag picks the kernels at build
time (its default: on unless the backend is "einsum" then); ``fused=False`` always runs einsum.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import warnings

import torch

BACKENDS = ("auto", "triton", "einsum")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn)  # FP8: attention only (checks.py)


def _checked_backend_name(name: str, where: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{where}: backend must be one of {BACKENDS}, got {name!r}")
    return name


def _process_backend(value: str | None) -> str | None:
    """``VITRITON_BACKEND`` as read at import: any case, empty or unset means "auto".

    A bad value is kept as it came (None here) and raised by the first call that needs a backend,
    so a typo in the environment cannot make ``import kernels`` itself fail.
    """
    name = (value or "auto").strip().lower() or "auto"
    return name if name in BACKENDS else None


_PROCESS_BACKEND_RAW = os.environ.get("VITRITON_BACKEND")
_PROCESS_BACKEND = _process_backend(_PROCESS_BACKEND_RAW)
# Per thread and per asyncio task: a new thread starts from the process default (None stands for it).
_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("vitriton_backend", default=None)
_warned: set[str] = set()


def get_backend() -> str:
    """The backend used here (this thread, this task) by calls that do not name one."""
    name = _backend.get()
    if name is not None:
        return name
    if _PROCESS_BACKEND is None:
        raise ValueError(
            f"VITRITON_BACKEND: expected one of {BACKENDS} (any case; empty means unset), got {_PROCESS_BACKEND_RAW!r}"
        )
    return _PROCESS_BACKEND


@contextlib.contextmanager
def use_backend(name: str):
    """``with use_backend("einsum"): model(x)`` runs the block on that backend, then restores.

    The choice holds in this thread (and asyncio task) only; other threads keep theirs.
    """
    token = _backend.set(_checked_backend_name(name, "use_backend"))
    try:
        yield
    finally:
        _backend.reset(token)


def fused_by_default() -> bool:
    """The default of the ``vit`` modules' ``fused`` flag, read when a module is built."""
    return get_backend() != "einsum"


def interpreter_on() -> bool:
    """Whether Triton's CPU interpreter is on, which lets the Triton kernels take CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# The public entry points' own files: a warning points past them, at the line that called them.
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _warn_once(reason: str) -> None:
    """Warn once per reason, at the line that called the public function (the first frame outside
    kernels/*.py, however many of its own functions the call went through)."""
    if reason not in _warned:
        _warned.add(reason)
        frame, level = sys._getframe(1), 2
        while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == _PACKAGE_DIR:
            frame, level = frame.f_back, level + 1
        warnings.warn(f"vitriton: using the einsum fallback: {reason}", stacklevel=level)


def _autograd_mode_problem(tensors: list[torch.Tensor]) -> str | None:
    """Why the Triton kernels cannot serve this call's autograd mode, or None.

    Their custom ops have a backward (reverse mode) and run under vmap, but have no forward-mode
    derivative and no functorch grad rule: ``torch.func.jvp``/``grad``/``vjp``/``jacrev`` and
    ``torch.autograd.forward_ad`` would otherwise get a zero tangent or a confusing error.
    """
    if torch.compiler.is_compiling():
        return None
    if torch._C._are_functorch_transforms_active():
        stack = torch._C._functorch.get_interpreter_stack() or []
        names = {torch._C._functorch.TransformType.Grad: "torch.func.grad/vjp/jacrev",
                 torch._C._functorch.TransformType.Jvp: "torch.func.jvp/jacfwd"}
        used = sorted({names[i.key()] for i in stack if i.key() in names})
        if used:
            return f"the Triton kernels have no {' or '.join(used)} rule"
    if torch.autograd.forward_ad._current_level >= 0 and any(
        torch.autograd.forward_ad.unpack_dual(t).tangent is not None for t in tensors if t is not None
    ):
        return "the Triton kernels have no forward-mode derivative (torch.autograd.forward_ad)"
    return None


def pick_backend(
    requested: str | None, op: str, tensors: list[torch.Tensor], cannot_take=lambda: None
) -> str:
    """Resolve ``requested`` (None = this thread's backend) to "triton" or "einsum" for these tensors.

    ``cannot_take()`` gives the kernel's own reason to refuse the input (a head dim or size out of
    its range), or None. An explicit "triton" raises it; "auto" warns once and runs einsum.
    """
    name = _checked_backend_name(requested if requested is not None else get_backend(), op)
    if name == "einsum":
        return "einsum"
    device, dtype = tensors[0].device, tensors[0].dtype
    # "meta" tensors carry shapes only: the Triton ops' shape functions take them and launch
    # nothing, which lets torch.compile trace a fused model without a GPU.
    runnable = device.type in ("cuda", "meta") or interpreter_on()
    if name == "triton":
        if not runnable:
            raise RuntimeError(
                f"{op}: backend='triton' needs CUDA tensors, got tensors on {device}; "
                "use backend='einsum' or 'auto', or set TRITON_INTERPRET=1 to run the kernels on the CPU"
            )
        if dtype not in TRITON_DTYPES:
            raise TypeError(f"{op}: the Triton kernels take float16, bfloat16 or float32, got {dtype}; use backend='einsum'")
        reason = cannot_take()
        if reason is not None:
            raise ValueError(f"{op}: {reason}; use backend='einsum' (or 'auto', which falls back to it)")
        reason = _autograd_mode_problem(tensors)
        if reason is not None:
            raise NotImplementedError(f"{op}: {reason}; use backend='einsum' (or 'auto', which falls back to it)")
        return "triton"
    if device.type not in ("cuda", "meta"):
        reason = f"{op} got tensors on {device}, and the Triton kernels run on CUDA tensors"
    elif dtype not in TRITON_DTYPES:
        reason = f"{op} got {dtype}, and the Triton kernels take float16, bfloat16 or float32"
    else:
        reason = cannot_take() or _autograd_mode_problem(tensors)
        reason = reason and f"{op}: {reason}"
    if reason is not None:
        _warn_once(reason)
        return "einsum"
    return "triton"
