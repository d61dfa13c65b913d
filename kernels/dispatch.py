"""The one place that picks the backend, checks the inputs, and says why.

Three backends:
  ``"triton"``  the fused kernels of ``kernels/triton/`` (attention and the patch projection);
                CUDA tensors, or CPU tensors when Triton's interpreter is on
                (``TRITON_INTERPRET=1``, how the tests run the real kernels without a GPU).
                Input they cannot take is a one-line error.
  ``"einsum"``  the CPU fallback of ``kernels/reference.py``: any device, any float dtype, every
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
import functools
import itertools
import math
import numbers
import os
import sys
import warnings

import torch

from kernels import reference

BACKENDS = ("auto", "triton", "einsum")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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


_PUBLIC_ENTRY_FILE = __file__


def _warn_once(reason: str) -> None:
    """Warn once per reason, at the line that called the public function (the first frame above
    this file, however many of its own functions the call went through)."""
    if reason not in _warned:
        _warned.add(reason)
        frame, level = sys._getframe(1), 2
        while frame is not None and frame.f_code.co_filename == _PUBLIC_ENTRY_FILE:
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


# ---------------------------------------------------------------------------------------------
# Input checks: one line each, naming what was expected and what came. A wrong type (not a
# tensor, not a number, a dtype the op does not take or two dtypes mixed) is a TypeError; a
# wrong shape, device or value is a ValueError.


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


def _check_float(op: str, named: dict[str, torch.Tensor]) -> None:
    for name, t in named.items():
        if not t.is_floating_point():
            raise TypeError(f"{op}: expected a floating-point {name}, got {t.dtype}")


def _is_real(value) -> bool:
    """A Python or NumPy real number; not a bool (a flag passed in the wrong place), not a tensor."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _type_name(value) -> str:
    kind = type(value)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _as_float(op: str, name: str, value, expected: str) -> float:
    """A real number as a Python float, one rule for every backend: ints, Fractions, NumPy scalars."""
    if not _is_real(value):
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


def _check_attention_inputs(op, q, k, v, mask, scale, dropout_p, is_causal):
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(op, name, t)
        if t.dim() != 4:
            raise ValueError(f"{op}: expected {name} of shape (B, H, N, D), got {tuple(t.shape)}")
    if mask is not None:
        _check_tensor(op, "the mask", mask)
    _check_float(op, {"q": q, "k": k, "v": v})
    _check_same(op, "dtype", {"q": q, "k": k, "v": v})
    if mask is not None:
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(f"{op}: expected a bool mask (True = may attend) or a float mask, got {mask.dtype}")
        if mask.is_floating_point() and mask.dtype not in (q.dtype, torch.float32):
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


# ---------------------------------------------------------------------------------------------
# Autocast, as for PyTorch's SDPA: attention is one of autocast's lower-precision ops, so under
# ``torch.autocast(device, dtype)`` every floating-point input (q, k, v, a float mask) that is
# not float64 is cast to the autocast dtype (a bfloat16 q with float32 k and v runs), float64
# stays float64, and the op runs with autocast off inside (the fallback's own float32 products
# must not be cast down again).


def _autocast_device(tensors) -> str | None:
    """The device type whose autocast is on for these inputs, or None."""
    first = tensors[0]
    if not isinstance(first, torch.Tensor) or first.device.type not in ("cuda", "cpu"):
        return None
    return first.device.type if torch.is_autocast_enabled(first.device.type) else None


def _autocast_cast(device_type: str, tensors):
    """Each floating-point tensor but a float64 one in the autocast dtype; the others as they came."""
    low = torch.get_autocast_dtype(device_type)
    return [
        t.to(low) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
        for t in tensors
    ]


# ---------------------------------------------------------------------------------------------
# The public functions.


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Scaled multi-head attention: q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv) -> (B, H, Nq, Dv).

    ``mask`` broadcasts to (B, H, Nq, Nk): bool with True = may attend, or float added to the
    logits. The rest is keyword-only: ``scale`` (default D**-0.5; any finite real number, as
    PyTorch's SDPA takes) multiplies the logits before the softmax; ``dropout_p`` drops attention
    weights (pass 0 in eval); ``is_causal`` masks keys after the query (top-left aligned). A query
    row with every key masked returns zeros. Under ``torch.autocast`` it runs in the autocast dtype,
    as SDPA (float64 inputs stay float64). Bad input is a one-line TypeError (a wrong type or
    dtype) or ValueError (a wrong shape, device or value), whatever the backend.
    """
    return _attention("attention", q, k, v, mask, scale, dropout_p, is_causal, backend)


def _attention(op, q, k, v, mask, scale, dropout_p, is_causal, backend) -> torch.Tensor:
    """``attention``, its errors naming ``op`` (the public function the caller used)."""
    device_type = _autocast_device([q, k, v])
    if device_type is not None:
        q, k, v, mask = _autocast_cast(device_type, [q, k, v, mask])
        with torch.autocast(device_type, enabled=False):
            return _attention(op, q, k, v, mask, scale, dropout_p, is_causal, backend)
    scale, dropout_p, is_causal = _check_attention_inputs(op, q, k, v, mask, scale, dropout_p, is_causal)
    from kernels.triton.attention_ops import cannot_take

    def kernel_cannot_take():
        return cannot_take(q, k, v, mask, dropout_p)

    if pick_backend(backend, op, [q, k, v, mask], kernel_cannot_take) == "einsum":
        return reference.attention_fallback(q, k, v, mask, scale, dropout_p, is_causal=is_causal)
    from kernels.triton.attention_ops import attention_triton

    return attention_triton(q, k, v, mask, scale, dropout_p, is_causal=is_causal)


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` with the same arguments and meaning.

    query (..., L, E), key (..., S, E), value (..., S, Ev) with matching leading dims; attn_mask
    broadcasts to (..., L, S), bool True = take part, float added; ``is_causal`` with a mask is
    an error, as in PyTorch; ``enable_gqa`` repeats key/value heads over the query heads.
    """
    op = "scaled_dot_product_attention"
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_tensor(op, name, t)
        if t.dim() < 2:
            raise ValueError(f"{op}: expected {name} of shape (..., L, E), got {tuple(t.shape)}")
    if attn_mask is not None:
        _check_tensor(op, "attn_mask", attn_mask)
    if is_causal and attn_mask is not None:
        raise ValueError(f"{op}: expected either attn_mask or is_causal=True, got both")
    if not (query.dim() == key.dim() == value.dim()):
        raise ValueError(
            f"{op}: expected query, key, value of one rank, got {query.dim()}, {key.dim()} and {value.dim()}"
        )
    if enable_gqa and query.dim() >= 3 and (key.shape[-3] != query.shape[-3] or value.shape[-3] != query.shape[-3]):
        # As PyTorch: query heads a multiple of key heads and of value heads, each repeated to match.
        q_heads, k_heads, v_heads = query.shape[-3], key.shape[-3], value.shape[-3]
        if k_heads == 0 or v_heads == 0 or q_heads % k_heads or q_heads % v_heads:
            raise ValueError(
                f"{op}: enable_gqa expects query heads divisible by key heads and by value heads, "
                f"got {q_heads}, {k_heads} and {v_heads} (dim -3 of query {tuple(query.shape)}, "
                f"key {tuple(key.shape)}, value {tuple(value.shape)})"
            )
        given = (tuple(query.shape), tuple(key.shape), tuple(value.shape))
        key = key.repeat_interleave(q_heads // k_heads, dim=-3)
        value = value.repeat_interleave(q_heads // v_heads, dim=-3)
    else:
        given = (tuple(query.shape), tuple(key.shape), tuple(value.shape))
    lead = query.shape[:-2]
    if key.shape[:-2] != lead or value.shape[:-2] != lead:
        raise ValueError(
            f"{op}: expected query, key, value with the same leading dims, "
            f"got {given[0]}, {given[1]} and {given[2]}"
        )
    # Bring (..., L, E) to the kernels' (B, H, L, E): views when possible, never for rank 4.
    if query.dim() == 4:
        q, k, v, mask = query, key, value, attn_mask
    else:
        def to_4d(t):  # the leading dims' product spelled out: -1 is ambiguous when L or E is 0
            return t.reshape(math.prod(lead), 1, *t.shape[-2:])

        q, k, v = to_4d(query), to_4d(key), to_4d(value)
        mask = None
        if attn_mask is not None:
            if attn_mask.dim() > query.dim():
                raise ValueError(f"{op}: expected attn_mask broadcastable to {(*lead, query.shape[-2], key.shape[-2])}, got {tuple(attn_mask.shape)}")
            full = (*lead, query.shape[-2], key.shape[-2])
            try:
                mask = to_4d(attn_mask.expand(full)) if attn_mask.dim() > 2 else attn_mask
            except RuntimeError:
                raise ValueError(f"{op}: expected attn_mask broadcastable to {full}, got {tuple(attn_mask.shape)}") from None
    out = _attention(op, q, k, v, mask, scale, dropout_p, is_causal, backend)
    return out.reshape(*lead, *out.shape[-2:])


def patch_embed(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    cls_token: torch.Tensor | None = None,
    pos_embed: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Images (B, C, H, W) to tokens (B, [T+]N, D) with a Conv2d-layout weight (D, C, P, P).

    ``bias`` (D,), ``cls_token`` (1, T, D) prepended (T prefix tokens: class, registers,
    distillation), ``pos_embed`` (1, [T+]N, D) added, each optional. H and W must be multiples of
    the patch size P, read from the weight.
    """
    op = "patch_embed"
    named = {"images": images, "weight": weight, "bias": bias, "cls_token": cls_token, "pos_embed": pos_embed}
    present = {name: t for name, t in named.items() if t is not None or name in ("images", "weight")}
    for name, t in present.items():
        _check_tensor(op, name, t)
    device_type = images.device.type
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type) and all(t.is_floating_point() for t in present.values()):
        return _patch_embed_autocast(device_type, named, backend)
    if images.dim() != 4:
        raise ValueError(f"{op}: expected images of shape (B, C, H, W), got {tuple(images.shape)}")
    if weight.dim() != 4 or weight.shape[-1] != weight.shape[-2] or weight.shape[-1] == 0:
        raise ValueError(f"{op}: expected a Conv2d weight of shape (D, C, P, P) with P >= 1, got {tuple(weight.shape)}")
    _check_float(op, present)
    _check_same(op, "dtype", present)
    _check_same(op, "device", present)
    _, channels, height, width = images.shape
    dim, weight_channels, patch, _ = weight.shape
    if channels != weight_channels:
        raise ValueError(f"{op}: expected images with {weight_channels} channels (the weight's), got {channels}")
    if height % patch or width % patch:
        raise ValueError(f"{op}: expected image sides that are multiples of the patch size {patch}, got {height}x{width}")
    n_patches = (height // patch) * (width // patch)
    if bias is not None and tuple(bias.shape) != (dim,):
        raise ValueError(f"{op}: expected bias of shape ({dim},), got {tuple(bias.shape)}")
    if cls_token is not None and (cls_token.dim() != 3 or cls_token.shape[0] != 1 or cls_token.shape[1] < 1
                                  or cls_token.shape[2] != dim):
        raise ValueError(
            f"{op}: expected cls_token of shape (1, T, {dim}), T >= 1 prefix tokens (class, registers, "
            f"distillation), got {tuple(cls_token.shape)}"
        )
    if pos_embed is not None:
        n_prefix = 0 if cls_token is None else cls_token.shape[1]
        n_tokens = n_patches + n_prefix
        if tuple(pos_embed.shape) != (1, n_tokens, dim):
            raise ValueError(
                f"{op}: expected pos_embed of shape (1, {n_tokens}, {dim}) for a {height}x{width} image "
                f"with patch {patch}{f' and {n_prefix} prefix token(s)' if n_prefix else ''}, got {tuple(pos_embed.shape)}"
            )
    if pick_backend(backend, op, list(present.values())) == "einsum":
        return reference.patch_embed_reference(images, weight, bias, cls_token, pos_embed)
    from kernels.triton.patch_embed import patch_embed_triton

    return patch_embed_triton(images, weight, bias, cls_token, pos_embed)


def _patch_embed_autocast(device_type: str, named: dict[str, torch.Tensor | None], backend: str | None) -> torch.Tensor:
    """``patch_embed`` under autocast, by autocast's own rules for Conv2d, then cat and add.

    Conv2d is a lower-precision op: its float arguments (images, weight, bias) are cast to the
    autocast dtype, except float64 ones, which autocast leaves alone (so float64 inputs project in
    float64, and float32 mixed with float64 is refused as outside autocast). ``cat`` with the class
    token and the add of the position embedding then promote: float32 parameters keep the tokens
    in float32, as in timm. The kernel adds them in its float32 epilogue, in the projection's dtype.
    """
    low = torch.get_autocast_dtype(device_type)
    conv_args = {name: named[name] for name in ("images", "weight", "bias")}
    cast = {name: t if t is None or t.dtype == torch.float64 else t.to(low) for name, t in conv_args.items()}
    _check_same("patch_embed (under autocast, which casts float32 to its dtype and leaves float64)", "dtype", cast)
    projection_dtype = cast["images"].dtype
    added = [named[name] for name in ("cls_token", "pos_embed") if named[name] is not None]
    out_dtype = functools.reduce(torch.promote_types, [t.dtype for t in added], projection_dtype)
    with torch.autocast(device_type, enabled=False):
        tokens = patch_embed(
            cast["images"], cast["weight"], cast["bias"],
            *(None if named[name] is None else named[name].to(projection_dtype) for name in ("cls_token", "pos_embed")),
            backend=backend,
        )
    return tokens.to(out_dtype)


# ---------------------------------------------------------------------------------------------
# Packed sequences of different lengths (flash-attn's varlen layout).

# Facts of cu_seqlens tensors already checked, by the tensor itself (held weakly) and its version:
# a model's layers share one, so its values are read back (a host sync on a GPU) once per forward,
# not once per layer. Keyed on the object, not its address: a new tensor that the caching
# allocator puts where a freed one was is a new key, never the old one's facts.
_checked_cu_seqlens = torch.utils.weak.WeakTensorKeyDictionary()


def _cu_seqlens_facts(op: str, name: str, cu_seqlens: torch.Tensor, total: int) -> tuple[int, int]:
    """(number of sequences, longest length) of a checked cu_seqlens, read back once."""
    key = (cu_seqlens._version, cu_seqlens.numel(), total)
    known = _checked_cu_seqlens.get(cu_seqlens)
    if known is not None and known[0] == key:
        return known[1]
    values = cu_seqlens.tolist()
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


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention within each of several packed sequences: q (total_q, H, D), k (total_k, H, D),
    v (total_k, H, Dv) -> (total_q, H, Dv), flash-attn's ``flash_attn_varlen_func`` layout.

    Sequence i holds rows ``cu_seqlens_q[i]:cu_seqlens_q[i + 1]`` of q and
    ``cu_seqlens_k[i]:cu_seqlens_k[i + 1]`` of k and v (int32, length n + 1, starting at 0,
    non-decreasing, ending at the packed length); its queries attend its keys only. Lengths may
    be 0 and differ between q and k (a sequence with queries and no keys gives zeros).
    ``max_seqlen_*``: None, an int at least the longest length, or a 0-d integer tensor (what
    models compute; its value is not read). In eager mode the values of a ``cu_seqlens`` are
    read and checked the first time that tensor is seen (one host sync per forward on a GPU, not
    one per layer), and give the longest lengths. Under ``torch.compile`` nothing is read on the
    host: the checks become a device-side assert, and the grid is sized by the int given, else
    by the packed length (correct, with idle programs: pass ints where you can).
    ``scale``, ``dropout_p`` and ``is_causal`` (top-left aligned per sequence) as ``attention``.
    """
    op = "attention_varlen"
    device_type = _autocast_device([q, k, v])
    if device_type is not None:
        q, k, v = _autocast_cast(device_type, [q, k, v])
        with torch.autocast(device_type, enabled=False):
            return attention_varlen(
                q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                scale=scale, dropout_p=dropout_p, is_causal=is_causal, backend=backend,
            )
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(op, name, t)
        if t.dim() != 3:
            raise ValueError(f"{op}: expected {name} of shape (total, H, D), got {tuple(t.shape)}")
    _check_float(op, {"q": q, "k": k, "v": v})
    _check_same(op, "dtype", {"q": q, "k": k, "v": v})
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        _check_tensor(op, name, t)
        if t.dtype != torch.int32:
            raise TypeError(f"{op}: expected {name} of dtype torch.int32, got {t.dtype}")
        if t.dim() != 1 or t.numel() == 0:
            raise ValueError(f"{op}: expected {name} of shape (number of sequences + 1,), got {tuple(t.shape)}")
    _check_same(op, "device", {"q": q, "k": k, "v": v, "cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k})
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"{op}: expected as many query as key sequences, got cu_seqlens_q of {cu_seqlens_q.numel()} "
            f"and cu_seqlens_k of {cu_seqlens_k.numel()} entries"
        )
    if q.shape[1] != k.shape[1] or k.shape[1] != v.shape[1]:
        raise ValueError(f"{op}: expected q, k, v with the same heads, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[2] != k.shape[2] or q.shape[2] == 0:
        raise ValueError(f"{op}: expected q and k with the same head dim of at least 1, got q {q.shape[2]} and k {k.shape[2]}")
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"{op}: expected k and v of the same packed length, got k {k.shape[0]} and v {v.shape[0]}")
    scale, dropout_p, is_causal = _check_scalars(op, scale, dropout_p, is_causal)
    given_q = _checked_max_seqlen(op, "max_seqlen_q", max_seqlen_q)
    given_k = _checked_max_seqlen(op, "max_seqlen_k", max_seqlen_k)
    compiling = torch.compiler.is_compiling()
    if compiling:
        # No host read in a traced graph: the values are asserted on the device, and the kernels'
        # grid is sized by the given int, or by the packed length (a bound) when none is given.
        longest_q = given_q if isinstance(given_q, int) else q.shape[0]
        longest_k = given_k if isinstance(given_k, int) else k.shape[0]
        _assert_cu_seqlens_on_device("cu_seqlens_q", cu_seqlens_q, q.shape[0], given_q if isinstance(given_q, int) else None)
        _assert_cu_seqlens_on_device("cu_seqlens_k", cu_seqlens_k, k.shape[0], given_k if isinstance(given_k, int) else None)
    else:
        _, longest_q = _cu_seqlens_facts(op, "cu_seqlens_q", cu_seqlens_q, q.shape[0])
        _, longest_k = _cu_seqlens_facts(op, "cu_seqlens_k", cu_seqlens_k, k.shape[0])
        for name, given, longest in (("max_seqlen_q", given_q, longest_q), ("max_seqlen_k", given_k, longest_k)):
            if isinstance(given, int) and given < longest:
                raise ValueError(f"{op}: expected {name} >= the longest sequence ({longest}), got {given}")
    # An int is the grid's size; a tensor's value is not read (a host sync per layer): the longest
    # length read from cu_seqlens, exact, takes its place.
    max_seqlen_q = given_q if isinstance(given_q, int) else longest_q
    max_seqlen_k = given_k if isinstance(given_k, int) else longest_k

    from kernels.triton.attention_ops import attention_varlen_triton, cannot_take_varlen

    def cannot_take():
        return cannot_take_varlen(q, k, v, max_seqlen_q, max_seqlen_k, dropout_p)

    if pick_backend(backend, op, [q, k, v], cannot_take) == "einsum":
        if compiling:  # one masked problem over the packed rows: no per-sequence split to read on the host
            return reference.attention_varlen_masked(
                q, k, v, cu_seqlens_q, cu_seqlens_k, scale, dropout_p, is_causal=is_causal, attend=reference.attention_fallback
            )
        return reference.attention_varlen_reference(
            q, k, v, cu_seqlens_q, cu_seqlens_k, scale, dropout_p, is_causal=is_causal, attend=reference.attention_fallback
        )
    return attention_varlen_triton(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, dropout_p, is_causal=is_causal
    )
