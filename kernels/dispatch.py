"""The public functions: each checks its input (``kernels/checks.py``), picks the backend
(``kernels/backend.py``) and calls the Triton kernels (``kernels/triton/``) or the einsum
fallback (``kernels/reference/``). The one dispatch point.
"""

from __future__ import annotations

import functools
import math

import torch

from kernels import reference
from kernels.backend import pick_backend
from kernels.checks import (
    _assert_cu_seqlens_on_device,
    _check_attention_inputs,
    _check_float,
    _check_same,
    _check_scalars,
    _check_tensor,
    _checked_max_seqlen,
    _cu_seqlens_facts,
)
from kernels.context_parallel import _context_parallel_mesh, _keys_of_every_rank
from kernels.fp8 import (
    FP8_DTYPES,
    check_fp8_inputs,
    dequantize,
    fp8_mode_on,
    packed_descales,
    quantize_fp8,
)

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
    q_descale: torch.Tensor | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Scaled multi-head attention: q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv) -> (B, H, Nq, Dv).

    ``mask`` broadcasts to (B, H, Nq, Nk): bool with True = may attend, or float added to the
    logits. The rest is keyword-only: ``scale`` (default D**-0.5; any finite real number, as
    PyTorch's SDPA takes) multiplies the logits before the softmax; ``dropout_p`` drops attention
    weights (pass 0 in eval); ``is_causal`` masks keys after the query (top-left aligned). A query
    row with every key masked returns zeros. Under ``torch.autocast`` it runs in the autocast dtype,
    as SDPA (float64 inputs stay float64). Bad input is a one-line TypeError (a wrong type or
    dtype) or ValueError (a wrong shape, device or value), whatever the backend. Inside
    ``torch.distributed.tensor.experimental.context_parallel``, on its sequence slices, each rank's
    queries attend to every rank's keys (gathered: ``kernels/context_parallel.py``; no mask or
    is_causal there). DTensors sharded on the batch or the heads run the kernels locally
    (``kernels/triton/sharding.py``).

    FP8, for inference (``kernels/fp8.py``): q, k, v in ``torch.float8_e4m3fn`` with float32
    ``q_descale``, ``k_descale``, ``v_descale`` of shape (B, H) (None: 1), the output in
    ``out_dtype`` (bfloat16 by default); no dropout, no backward. ``kernels.quantize_fp8`` makes
    them from float q, k, v.
    """
    op = "attention"
    fp8_inputs = any(isinstance(t, torch.Tensor) and t.dtype in FP8_DTYPES for t in (q, k, v))
    if fp8_inputs or fp8_mode_on():
        return _attention_fp8(
            op, q, k, v, mask, scale, dropout_p, is_causal, backend, q_descale, k_descale, v_descale, out_dtype,
            quantize=not fp8_inputs,
        )
    if (q_descale, k_descale, v_descale, out_dtype) != (None, None, None, None):
        raise TypeError(
            f"{op}: q_descale, k_descale, v_descale and out_dtype are for FP8 (torch.float8_e4m3fn) q, k, v, "
            f"got q in {getattr(q, 'dtype', type(q).__name__)}"
        )
    device_type = _autocast_device([q, k, v])
    if device_type is not None:
        q, k, v, mask = _autocast_cast(device_type, [q, k, v, mask])
        with torch.autocast(device_type, enabled=False):
            return attention(q, k, v, mask, scale=scale, dropout_p=dropout_p, is_causal=is_causal, backend=backend)
    mesh = _context_parallel_mesh()
    if mesh is not None:
        k, v = _keys_of_every_rank(op, mesh, q, k, v, mask, is_causal)
    scale, dropout_p, is_causal = _check_attention_inputs(op, q, k, v, mask, scale, dropout_p, is_causal)
    from kernels.triton.attention_ops import cannot_take

    def kernel_cannot_take():
        return cannot_take(q, k, v, mask, dropout_p)

    if pick_backend(backend, op, [q, k, v, mask], kernel_cannot_take) == "einsum":
        return reference.attention_fallback(q, k, v, mask, scale, dropout_p, is_causal=is_causal)
    from kernels.triton.attention_ops import attention_triton

    return attention_triton(q, k, v, mask, scale, dropout_p, is_causal=is_causal)


def _quantised_in_fp8_mode(op, q, k, v, mask, descales, dropout_p, out_dtype):
    """(q8, k8, v8, q_descale, k_descale, v_descale, out dtype): float inputs quantised for FP8 inside
    ``kernels.fp8_mode`` (``kernels.swap(..., fp8=True)``), after its own one-line errors."""
    if descales != (None, None, None):
        raise TypeError(f"{op}: descales are for FP8 q, k, v, got q in {q.dtype} (inside kernels.fp8_mode)")
    if dropout_p:
        raise ValueError(f"{op}: FP8 attention (kernels.swap(..., fp8=True)) is for eval mode: expected dropout_p=0, got {dropout_p}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, mask)):
        raise NotImplementedError(
            f"{op}: FP8 attention (kernels.swap(..., fp8=True)) is for inference and has no backward; "
            "run the model under torch.no_grad() or torch.inference_mode()"
        )
    return (*quantize_fp8(q, k, v), q.dtype if out_dtype is None else out_dtype)


def _attention_fp8(
    op, q, k, v, mask, scale, dropout_p, is_causal, backend, q_descale, k_descale, v_descale, out_dtype, quantize
):
    """``attention`` of FP8 inputs, or (``quantize``, in ``fp8_mode``) of float ones quantised here,
    returned in q's dtype."""
    if _context_parallel_mesh() is not None:
        raise NotImplementedError(f"{op}: FP8 attention inside torch's context_parallel is not supported")
    scale, dropout_p, is_causal = _check_attention_inputs(op, q, k, v, mask, scale, dropout_p, is_causal, fp8=not quantize)
    if quantize:
        q, k, v, q_descale, k_descale, v_descale, out_dtype = _quantised_in_fp8_mode(
            op, q, k, v, mask, (q_descale, k_descale, v_descale), dropout_p, out_dtype
        )
    out_dtype = check_fp8_inputs(op, q, k, v, mask, q_descale, k_descale, v_descale, out_dtype, dropout_p)
    from kernels.triton.attention_fp8 import fp8_target

    def kernel_cannot_take():
        from kernels.triton.attention_ops import cannot_take

        return cannot_take(q, k, v, mask, 0.0) or (fp8_target(q) if q.device.type == "cuda" else None)

    if pick_backend(backend, op, [q, k, v, mask], kernel_cannot_take) == "einsum":
        dequantized = [dequantize(t, d) for t, d in ((q, q_descale), (k, k_descale), (v, v_descale))]
        if mask is not None and mask.is_floating_point():
            mask = mask.float()
        return reference.attention_fallback(*dequantized, mask, scale, 0.0, is_causal=is_causal).to(out_dtype)
    from kernels.triton.attention_fp8 import attention_fp8_triton

    descales = packed_descales(q.shape[:2], q.device, q_descale, k_descale, v_descale)
    return attention_fp8_triton(q, k, v, descales, mask, scale, is_causal=is_causal, out_dtype=out_dtype)


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
    # Autocast's cast and the checks here, so errors name this function; ``attention`` then finds
    # the inputs already cast (its own cast is a no-op) and repeats the checks (host-side, cheap).
    device_type = _autocast_device([q, k, v])
    if device_type is not None:
        q, k, v, mask = _autocast_cast(device_type, [q, k, v, mask])
    _check_attention_inputs(op, q, k, v, mask, scale, dropout_p, is_causal)
    out = attention(q, k, v, mask, scale=scale, dropout_p=dropout_p, is_causal=is_causal, backend=backend)
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
    conv_names = ("images", "weight", "bias")
    cast = dict(zip(conv_names, _autocast_cast(device_type, [named[name] for name in conv_names])))
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
    q_descale: torch.Tensor | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
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
    FP8 as ``attention``: e4m3 q, k, v with float32 descales of shape (n, H), one row per sequence,
    or (1, H) for all of them (what ``kernels.quantize_fp8`` gives packed inputs); in
    ``kernels.fp8_mode`` float inputs are quantised here.
    """
    op = "attention_varlen"
    fp8_inputs = any(isinstance(t, torch.Tensor) and t.dtype in FP8_DTYPES for t in (q, k, v))
    if fp8_mode_on() and not fp8_inputs and all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        q, k, v, q_descale, k_descale, v_descale, out_dtype = _quantised_in_fp8_mode(
            op, q, k, v, None, (q_descale, k_descale, v_descale), dropout_p, out_dtype
        )
        fp8_inputs = True
    if not fp8_inputs and (q_descale, k_descale, v_descale, out_dtype) != (None, None, None, None):
        raise TypeError(
            f"{op}: q_descale, k_descale, v_descale and out_dtype are for FP8 (torch.float8_e4m3fn) q, k, v, "
            f"got q in {getattr(q, 'dtype', type(q).__name__)}"
        )
    if _context_parallel_mesh() is not None:
        raise NotImplementedError(f"{op}: packed sequences inside torch's context_parallel are not supported")
    device_type = None if fp8_inputs else _autocast_device([q, k, v])
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
    _check_float(op, {"q": q, "k": k, "v": v}, fp8=fp8_inputs)
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

    if fp8_inputs:
        return _attention_varlen_fp8(
            op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, dropout_p, is_causal, backend,
            (q_descale, k_descale, v_descale), out_dtype, cannot_take, compiling,
        )

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


def _attention_varlen_fp8(
    op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, dropout_p, is_causal, backend,
    descales, out_dtype, cannot_take, compiling,
):
    """``attention_varlen`` of checked packed e4m3 inputs: descales (n, H) or (1, H) broadcast to (n, H)."""
    shape = (cu_seqlens_q.numel() - 1, q.shape[1])  # (sequences, H)
    rows = [  # a (1, H) descale serves every sequence
        d.expand(shape) if isinstance(d, torch.Tensor) and d.dim() == 2 and d.shape[0] == 1 else d for d in descales
    ]
    out_dtype = check_fp8_inputs(op, q, k, v, None, *rows, out_dtype, dropout_p, descale_shape=("(sequences, H)", shape))
    from kernels.triton.attention_fp8 import fp8_target

    def kernel_cannot_take():
        return cannot_take() or (fp8_target(q) if q.device.type == "cuda" else None)

    if pick_backend(backend, op, [q, k, v], kernel_cannot_take) == "einsum":
        lengths_q = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
        lengths_k = cu_seqlens_k[1:] - cu_seqlens_k[:-1]

        def per_row(t, descale, lengths):  # (total, H, D) times its sequence's (H,) descale
            if descale is None:
                return t.float()
            scales = torch.repeat_interleave(descale.float(), lengths.long(), dim=0, output_size=t.shape[0])
            return t.float() * scales[:, :, None]

        q, k, v = (per_row(t, d, n) for t, d, n in zip((q, k, v), rows, (lengths_q, lengths_k, lengths_k)))
        attend = reference.attention_varlen_masked if compiling else reference.attention_varlen_reference
        out = attend(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, 0.0, is_causal=is_causal, attend=reference.attention_fallback)
        return out.to(out_dtype)
    from kernels.triton.attention_fp8 import attention_fp8_varlen_triton

    packed = packed_descales(shape, q.device, *rows)
    return attention_fp8_varlen_triton(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, packed, scale, is_causal=is_causal,
        out_dtype=out_dtype,
    )
