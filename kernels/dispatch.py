"""The one place that picks the backend, checks the inputs, and says why.

Three backends:
  ``"triton"``  the fused kernels of ``kernels/attention.py`` and ``kernels/patch_embed.py``;
                CUDA tensors, or CPU tensors when Triton's interpreter is on
                (``TRITON_INTERPRET=1``, how the tests run the real kernels without a GPU).
  ``"einsum"``  the references of ``kernels/reference.py``: any device, any float dtype.
  ``"auto"``    triton for CUDA tensors of a dtype the kernels take, einsum otherwise, with a
                one-time warning naming the reason, so a fallback is never silent.

Chosen per call (``backend=``), per module (the ``fused`` flag of the ``vit`` modules: off means
``"einsum"``), or globally: the environment variable ``VITRITON_BACKEND`` read at import,
``set_backend(name)``, or ``with use_backend(name):`` for a block. A per-call choice wins over
the global one.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import os
import warnings

import torch

from kernels import reference

BACKENDS = ("auto", "triton", "einsum")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _checked_backend_name(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where}: backend must be one of {BACKENDS}, got {name!r}")
    return name


_global_backend = _checked_backend_name(os.environ.get("VITRITON_BACKEND", "auto"), "VITRITON_BACKEND")
_warned: set[str] = set()


def get_backend() -> str:
    """The backend used by calls that do not name one."""
    return _global_backend


def set_backend(name: str) -> None:
    """Set the backend used by calls that do not name one: "auto", "triton" or "einsum"."""
    global _global_backend
    _global_backend = _checked_backend_name(name, "set_backend")


@contextlib.contextmanager
def use_backend(name: str):
    """``with use_backend("einsum"): model(x)`` runs the block on that backend, then restores."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def fused_by_default() -> bool:
    """The default of the ``vit`` modules' ``fused`` flag: on unless the global backend is einsum."""
    return get_backend() != "einsum"


def interpreter_on() -> bool:
    """Whether Triton's CPU interpreter is on, which lets the Triton kernels take CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"vitriton: using the einsum reference: {reason}", stacklevel=4)


def pick_backend(requested: str | None, op: str, tensors: list[torch.Tensor]) -> str:
    """Resolve ``requested`` (None = the global backend) to "triton" or "einsum" for these tensors."""
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
        return "triton"
    if device.type not in ("cuda", "meta"):
        _warn_once(f"{op} got tensors on {device}, and the Triton kernels run on CUDA tensors")
        return "einsum"
    if dtype not in TRITON_DTYPES:
        _warn_once(f"{op} got {dtype}, and the Triton kernels take float16, bfloat16 or float32")
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


def _check_scalars(op: str, scale, dropout_p, is_causal) -> None:
    """``scale``: None or any finite number, as PyTorch's SDPA; ``dropout_p`` in [0, 1); ``is_causal`` a bool."""
    if scale is not None:
        if not _is_real(scale):
            raise TypeError(f"{op}: expected scale to be None or a finite number, got {type(scale).__name__}")
        if not -math.inf < scale < math.inf:  # not math.isfinite: this form also traces (a SymFloat under compile)
            raise ValueError(f"{op}: expected scale to be None or a finite number, got {scale}")
    if not _is_real(dropout_p):
        raise TypeError(f"{op}: expected dropout_p to be a number in [0, 1), got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: expected 0 <= dropout_p < 1, got {dropout_p}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"{op}: expected is_causal to be a bool, got {type(is_causal).__name__}")


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
    _check_scalars(op, scale, dropout_p, is_causal)


# ---------------------------------------------------------------------------------------------
# The public functions.


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    *,
    is_causal: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Scaled multi-head attention: q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv) -> (B, H, Nq, Dv).

    ``mask`` broadcasts to (B, H, Nq, Nk): bool with True = may attend, or float added to the
    logits. ``scale`` (default D**-0.5; any finite number, as PyTorch's SDPA takes) multiplies the
    logits before the softmax. A query row with every key masked returns zeros. ``dropout_p``
    drops attention weights (pass 0 in eval). Bad input is a one-line TypeError (a wrong type or
    dtype) or ValueError (a wrong shape, device or value), whatever the backend.
    """
    _check_attention_inputs("attention", q, k, v, mask, scale, dropout_p, is_causal)
    if pick_backend(backend, "attention", [q, k, v]) == "einsum":
        return reference.attention_reference(q, k, v, mask, scale, dropout_p, is_causal=is_causal)
    from kernels.attention import attention_triton

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
    if enable_gqa and query.dim() >= 3 and key.shape[-3] != query.shape[-3]:
        if key.shape[-3] == 0 or query.shape[-3] % key.shape[-3] != 0:
            raise ValueError(
                f"{op}: enable_gqa expects query heads divisible by key heads, got {query.shape[-3]} and {key.shape[-3]}"
            )
        repeats = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(repeats, dim=-3)
        value = value.repeat_interleave(repeats, dim=-3)
    lead = query.shape[:-2]
    if key.shape[:-2] != lead or value.shape[:-2] != lead:
        raise ValueError(
            f"{op}: expected query, key, value with the same leading dims, "
            f"got {tuple(query.shape)}, {tuple(key.shape)} and {tuple(value.shape)}"
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
    out = attention(q, k, v, mask, scale, dropout_p, is_causal=is_causal, backend=backend)
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
    """Images (B, C, H, W) to tokens (B, [1+]N, D) with a Conv2d-layout weight (D, C, P, P).

    ``bias`` (D,), ``cls_token`` (1, 1, D) prepended, ``pos_embed`` (1, [1+]N, D) added, each
    optional. H and W must be multiples of the patch size P, read from the weight.
    """
    op = "patch_embed"
    named = {"images": images, "weight": weight, "bias": bias, "cls_token": cls_token, "pos_embed": pos_embed}
    present = {name: t for name, t in named.items() if t is not None or name in ("images", "weight")}
    for name, t in present.items():
        _check_tensor(op, name, t)
    device_type = images.device.type
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type) and all(t.is_floating_point() for t in present.values()):
        # Under autocast, do what Conv2d + cat + add do there: project in the autocast dtype, and
        # return tokens promoted to the class token's and position embedding's dtype (float32
        # parameters keep the residual stream in float32, as in timm).
        low = torch.get_autocast_dtype(device_type)
        out_dtype = functools.reduce(torch.promote_types, [t.dtype for t in (cls_token, pos_embed) if t is not None], low)
        with torch.autocast(device_type, enabled=False):
            tokens = patch_embed(*(None if t is None else t.to(low) for t in named.values()), backend=backend)
        return tokens.to(out_dtype)
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
    if cls_token is not None and tuple(cls_token.shape) != (1, 1, dim):
        raise ValueError(f"{op}: expected cls_token of shape (1, 1, {dim}), got {tuple(cls_token.shape)}")
    if pos_embed is not None:
        n_tokens = n_patches + (cls_token is not None)
        if tuple(pos_embed.shape) != (1, n_tokens, dim):
            raise ValueError(
                f"{op}: expected pos_embed of shape (1, {n_tokens}, {dim}) for a {height}x{width} image "
                f"with patch {patch}{' and a class token' if cls_token is not None else ''}, got {tuple(pos_embed.shape)}"
            )
    if pick_backend(backend, op, [images]) == "einsum":
        return reference.patch_embed_reference(images, weight, bias, cls_token, pos_embed)
    from kernels.patch_embed import patch_embed_triton

    return patch_embed_triton(images, weight, bias, cls_token, pos_embed)
