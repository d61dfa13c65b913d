"""Every input check of the public functions, once: one line each, naming what was expected and
what came. A wrong type (not a tensor, not a number, a dtype the op does not take or two dtypes
mixed) is a TypeError; a wrong shape, device or value is a ValueError. The checks are the same
whatever the backend; what only the Triton kernels cannot take is said by ``cannot_take`` in
``kernels/triton/attention_ops.py``.
"""

from __future__ import annotations

import itertools
import math
import numbers

import torch

# The head dims (of q and of v) the Triton kernels take: 16, a tensor core's depth, to 256.
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256


def head_dim_problem(head_dim: int, head_dim_v: int | None = None) -> str | None:
    """Why the Triton kernels cannot take these head dims, in words, or None."""
    for what, dim in (("head dim", head_dim), ("value head dim", head_dim_v)):
        if dim is not None and not MIN_HEAD_DIM <= dim <= MAX_HEAD_DIM:
            return f"{what} {dim} is outside the Triton kernels' range, {MIN_HEAD_DIM} to {MAX_HEAD_DIM}"
    return None



def _check_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: expected {name} to be a tensor, got {type(t).__name__}")


def _check_same(op: str, what: str, named: dict[str, torch.Tensor | None]) -> None:
    present = {name: t for name, t in named.items() if t is not None}
    values = {name: getattr(t, what) for name, t in present.items()}
    if len(set(values.values())) > 1:
        listed = ", ".join(f"{name} {value}" for name, value in values.items())
        error = TypeError if what == "dtype" else ValueError
        raise error(f"{op}: expected every tensor on one {what}, got {listed}")


# The float8 dtypes: FP8 attention takes float8_e4m3fn; the others are refused by name.
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2, torch.float8_e5m2fnuz)


def _check_float(op: str, named: dict[str, torch.Tensor], fp8: bool = False) -> None:
    """Floating-point tensors; float8 ones only where ``fp8`` (FP8 attention), never by accident."""
    for name, t in named.items():
        if not t.is_floating_point():
            raise TypeError(f"{op}: expected a floating-point {name}, got {t.dtype}")
        if t.dtype in FP8_DTYPES and not fp8:
            raise TypeError(
                f"{op}: expected {name} in float16, bfloat16, float32 or float64, got {t.dtype} "
                "(FP8 is taken by kernels.attention and kernels.attention_varlen only, all of q, k, v in torch.float8_e4m3fn)"
            )


def is_real(value) -> bool:
    """A Python or NumPy real number; not a bool (a flag passed in the wrong place), not a tensor."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _type_name(value) -> str:
    kind = type(value)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _as_float(op: str, name: str, value, expected: str) -> float:
    """A real number as a Python float, one rule for every backend: ints, Fractions, NumPy scalars."""
    if not is_real(value):
        raise TypeError(f"{op}: expected {name} to be {expected}, got {_type_name(value)}")
    if isinstance(value, float):  # float and its subclasses (numpy.float64); SymFloat under compile
        return value
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{op}: expected {name} to be {expected}, got a {_type_name(value)} too large for a float") from None


def _check_scalars(op: str, scale, dropout_p, is_causal) -> tuple[float | None, float, bool]:
    """``scale``: None or any finite number, as PyTorch's SDPA; ``dropout_p`` in [0, 1); ``is_causal`` a bool.

    Returns them as (float or None, float, bool), so both backends see the same values.
    """
    if scale is not None:
        scale = _as_float(op, "scale", scale, "None or a finite number")
        if not -math.inf < scale < math.inf:  # not math.isfinite: this form also traces (a SymFloat under compile)
            raise ValueError(f"{op}: expected scale to be None or a finite number, got {scale}")
    dropout_p = _as_float(op, "dropout_p", dropout_p, "a number in [0, 1)")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: expected 0 <= dropout_p < 1, got {dropout_p}")
    if type(is_causal).__module__ == "numpy" and type(is_causal).__name__ in ("bool", "bool_"):
        is_causal = bool(is_causal)  # numpy.bool: a bool by another name
    if not isinstance(is_causal, bool):
        raise TypeError(f"{op}: expected is_causal to be a bool (True or False), got {_type_name(is_causal)}")
    return scale, dropout_p, is_causal


def _check_attention_inputs(op, q, k, v, mask, scale, dropout_p, is_causal, fp8=False):
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(op, name, t)
        if t.dim() != 4:
            raise ValueError(f"{op}: expected {name} of shape (B, H, N, D), got {tuple(t.shape)}")
    if mask is not None:
        _check_tensor(op, "the mask", mask)
    _check_float(op, {"q": q, "k": k, "v": v}, fp8=fp8)
    _check_same(op, "dtype", {"q": q, "k": k, "v": v})
    if mask is not None:
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(f"{op}: expected a bool mask (True = may attend) or a float mask, got {mask.dtype}")
        if mask.is_floating_point() and mask.dtype not in (q.dtype, torch.float32) and not fp8:
            raise TypeError(f"{op}: expected a float mask of q's dtype ({q.dtype}) or float32, got {mask.dtype}")
    _check_same(op, "device", {"q": q, "k": k, "v": v, "mask": mask})
    if q.shape[:2] != k.shape[:2] or k.shape[:2] != v.shape[:2]:
        raise ValueError(
            f"{op}: expected q, k, v with the same batch and heads (B, H), "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{op}: expected q and k with the same head dim, got q {q.shape[-1]} and k {k.shape[-1]}")
    if q.shape[-1] == 0:
        raise ValueError(f"{op}: expected a head dim of at least 1, got q of shape {tuple(q.shape)}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"{op}: expected k and v with the same length, got k {k.shape[-2]} and v {v.shape[-2]}")
    if k.shape[-2] == 0:
        raise ValueError(f"{op}: expected at least one key, got k of shape {tuple(k.shape)}")
    if mask is not None:
        target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        try:
            fits = mask.dim() <= 4 and torch.broadcast_shapes(mask.shape, target) == target
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"{op}: expected a mask broadcastable to (B, H, Nq, Nk) = {target}, got {tuple(mask.shape)}")
    return _check_scalars(op, scale, dropout_p, is_causal)


# Facts of cu_seqlens tensors already checked, by the tensor itself (held weakly) and its version:
# a model's layers share one, so its values are read back (a host sync on a GPU) once per forward,
# not once per layer. Keyed on the object, not its address: a new tensor that the caching
# allocator puts where a freed one was is a new key, never the old one's facts.
_checked_cu_seqlens = torch.utils.weak.WeakTensorKeyDictionary()


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor, or a DTensor's whole value (which ``.tolist()`` refuses: cu_seqlens are replicated)."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(tensor, DTensor):
            return tensor.full_tensor()
    return tensor


def _cu_seqlens_facts(op: str, name: str, cu_seqlens: torch.Tensor, total: int) -> tuple[int, int]:
    """(number of sequences, longest length) of a checked cu_seqlens, read back once."""
    key = (cu_seqlens._version, cu_seqlens.numel(), total)
    known = _checked_cu_seqlens.get(cu_seqlens)
    if known is not None and known[0] == key:
        return known[1]
    values = _whole(cu_seqlens).tolist()
    if values[0] != 0:
        raise ValueError(f"{op}: expected {name} to start at 0, got {values[0]}")
    lengths = [b - a for a, b in itertools.pairwise(values)]
    if any(length < 0 for length in lengths):
        where = next(i for i, length in enumerate(lengths) if length < 0)
        raise ValueError(f"{op}: expected {name} non-decreasing, got {values[where]} then {values[where + 1]} at {where}")
    if values[-1] != total:
        raise ValueError(f"{op}: expected {name}[-1] to be the packed length {total}, got {values[-1]}")
    facts = (len(lengths), max(lengths, default=0))
    _checked_cu_seqlens[cu_seqlens] = (key, facts)
    return facts


def _assert_cu_seqlens_on_device(name: str, cu_seqlens: torch.Tensor, total: int, longest: int | None) -> None:
    """The checks of ``_cu_seqlens_facts`` as a device-side assert: what a traced graph can hold.

    Under ``torch.compile`` the values cannot be read on the host (a data-dependent graph break),
    so they are checked where they are, when the graph runs.
    """
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    valid = (cu_seqlens[0] == 0) & (cu_seqlens[-1] == total) & (lengths >= 0).all()
    if longest is not None:
        valid = valid & (lengths.max() <= longest) if lengths.numel() else valid
    torch._assert_async(
        valid, f"attention_varlen: expected {name} to start at 0, be non-decreasing, end at the packed length {total}"
        + ("" if longest is None else f" and hold no sequence longer than max_seqlen {longest}")
    )


def _checked_max_seqlen(op: str, name: str, value) -> int | torch.Tensor | None:
    """``max_seqlen_*`` as given: None, an int >= 0, or a 0-d integer tensor (what models compute
    with ``cu_seqlens.diff().max()``; its value is never read on the host: see ``attention_varlen``)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{op}: expected {name} to be None, an int or a 0-d integer tensor, got a tensor of shape "
                            f"{tuple(value.shape)} and dtype {value.dtype}")
        return value
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{op}: expected {name} to be None, an int or a 0-d integer tensor, got {_type_name(value)}")
    if value < 0:
        raise ValueError(f"{op}: expected {name} to be at least 0, got {value}")
    return int(value)
