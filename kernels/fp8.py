"""FP8 attention for inference, the host side: quantising to e4m3, the input checks, the swap's mode.

    q8, k8, v8, q_descale, k_descale, v_descale = kernels.quantize_fp8(q, k, v)
    out = kernels.attention(q8, k8, v8, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale)

FlashAttention-3's vocabulary: q, k, v in ``torch.float8_e4m3fn``, each with a float32 descale of
shape (B, H) (per batch and key head; here every head is a key head), the real value being
``q8 * q_descale[b, h]``; the output in bfloat16 or a chosen ``out_dtype``; no backward. Descales
are positive, as ``quantize_fp8`` makes them (their values are not read on the host: a sync per
call): the kernel takes a row's largest product for its largest logit, as for any scale >= 0. The kernel
is ``kernels/triton/attention_fp8.py``; on the CPU (and wherever the einsum backend runs) the inputs
are dequantised to float32 and the fallback computes with them, without rounding the probabilities
to e4m3 as the kernel does (so the einsum path is the more accurate of the two).

``kernels.swap(model, fp8=True)`` runs the swapped attention layers of an eval-mode model through
``quantize_fp8`` and the FP8 kernel (``fp8_mode`` below); the cost of quantising is stated there.
Packed sequences (``kernels.attention_varlen``) take descales of shape (n, H), one row per sequence,
or (1, H) for all (what ``quantize_fp8`` gives packed (total, H, D) inputs).
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

from kernels.checks import FP8_DTYPES

FP8 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # the largest finite e4m3 value; float8_e4m3fn has no infinity
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _per_head_scale(t: torch.Tensor) -> torch.Tensor:
    """float32 (B, H): each (batch, head) slice's largest magnitude over E4M3_MAX (1 for an all-zero
    slice, NaN where the slice holds a NaN, inf where it holds an infinity); packed (total, H, D): (1, H)."""
    t = t.detach()
    dims = (2, 3) if t.dim() == 4 else (0, 2)
    amax = torch.maximum(t.amax(dim=dims), -t.amin(dim=dims)).float()  # no full-size |t| made for it
    amax = amax if t.dim() == 4 else amax[None]
    return torch.where(amax == 0, torch.ones_like(amax), amax / E4M3_MAX)


def _scaled(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 ``t`` over its (B, H) scale (dense), or its (1, H) one (packed)."""
    return t.float() / (scale[:, :, None, None] if t.dim() == 4 else scale[0][None, :, None])  # t may be float32: not in place


def quantize_fp8(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, transpose_v: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q8, k8, v8, q_descale, k_descale, v_descale): float q, k (B, H, N, D), v (B, H, Nk, Dv) in e4m3,
    each scaled per (batch, head) so its largest magnitude becomes 448, with float32 (B, H) descales.
    Packed inputs (total, H, D), for ``kernels.attention_varlen``: one scale per head over every
    sequence, descales (1, H).

    The cast rounds to nearest even and saturates (torch's e4m3 cast): a value is off by at most
    2**-4 of itself (relative), or 2**-10 of its slice's largest magnitude near zero (subnormals).
    A NaN or infinity in a slice makes its descale NaN or inf (and that slice's output NaN), never
    a silently finite answer.

    ``transpose_v`` (the default for dense inputs): v8 is a (B, H, Nk, Dv) view of (B, H, Dv, Nk')
    memory (keys contiguous, Nk' = Nk rounded up to 16 so each row starts 16-byte aligned), what FP8
    tensor cores read without a transpose in the kernel's loop. Packed inputs default to a row-major
    v8: their sequences start at any row, so keys-contiguous rows would be read a byte at a time
    (sm_90: loop 352 instructions at 64x64 against 363 row-major, which transposes through shared
    memory; sm_100 reads row-major V with no transpose, 290). Its cost: this function is not fused with what
    produced q, k, v: it reads each of them twice (the maxima, then the cast) and writes a byte per
    element, about 5 bytes moved per element against the attention's own 2 (bf16 in, out).
    """
    rank = q.dim() if isinstance(q, torch.Tensor) else 0
    for name, t in (("q", q), ("k", k), ("v", v)):
        if (not isinstance(t, torch.Tensor) or t.dim() not in (3, 4) or t.dim() != rank or not t.is_floating_point()
                or t.dtype in FP8_DTYPES):
            described = f"a {t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(
                f"quantize_fp8: expected {name} a float16/bfloat16/float32 tensor (B, H, N, D), or (total, H, D) "
                f"packed, like q, got {described}"
            )
    scales = [_per_head_scale(t) for t in (q, k, v)]
    q8, k8 = (_scaled(t, s).to(FP8) for t, s in zip((q, k), scales))
    v_scaled = _scaled(v, scales[2])
    if not (rank == 4 if transpose_v is None else transpose_v):
        return q8, k8, v_scaled.to(FP8), *scales
    # Keys last in memory, their count rounded up to 16 (16-byte rows): (B, H, Dv, Nk') or (H, Dv, total').
    keys = v.shape[-2] if rank == 4 else v.shape[0]
    padded = -(-keys // 16) * 16
    to_keys_last = (0, 1, 3, 2) if rank == 4 else (1, 2, 0)
    from_keys_last = (0, 1, 3, 2) if rank == 4 else (2, 0, 1)
    storage_shape = [v.shape[i] for i in to_keys_last][:-1] + [padded]
    storage = torch.empty(storage_shape, device=v.device, dtype=FP8)
    storage[..., :keys] = v_scaled.permute(to_keys_last).to(FP8)
    return q8, k8, storage[..., :keys].permute(from_keys_last), *scales


def dequantize(t: torch.Tensor, descale: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """e4m3 (B, H, N, D) times its (B, H) descale, or packed (total, H, D) times its (1, H) one
    (None: 1), in ``dtype``."""
    t = t.to(dtype)
    if descale is None:
        return t
    return t * (descale.to(dtype)[:, :, None, None] if t.dim() == 4 else descale.to(dtype)[0][None, :, None])


def check_fp8_inputs(
    op, q, k, v, mask, q_descale, k_descale, v_descale, out_dtype, dropout_p, descale_shape=None
) -> torch.dtype:
    """One-line errors for FP8 attention's own rules (the shapes are checked as for any attention);
    returns the output dtype (bfloat16 unless ``out_dtype`` says otherwise). ``descale_shape``: what
    the descales must be, as (name, (rows, heads)); by default q's (B, H)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype != FP8:
            raise TypeError(
                f"{op}: FP8 attention takes q, k and v in torch.float8_e4m3fn, got {name} in {t.dtype}"
                + ("" if t.dtype in FP8_DTYPES else " (quantise all three with kernels.quantize_fp8)")
            )
    shape_name, shape = descale_shape or ("(B, H)", tuple(q.shape[:2]))
    for name, descale in (("q_descale", q_descale), ("k_descale", k_descale), ("v_descale", v_descale)):
        if descale is None:
            continue
        if not isinstance(descale, torch.Tensor) or descale.dtype != torch.float32:
            got = descale.dtype if isinstance(descale, torch.Tensor) else type(descale).__name__
            raise TypeError(f"{op}: expected {name} a float32 tensor of shape {shape_name} = {shape}, got {got}")
        if tuple(descale.shape) != shape:
            raise ValueError(f"{op}: expected {name} of shape {shape_name} = {shape}, got {tuple(descale.shape)}")
        if descale.device != q.device:
            raise ValueError(f"{op}: expected {name} on q's device {q.device}, got {descale.device}")
    if out_dtype is None:
        out_dtype = torch.bfloat16
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"{op}: expected out_dtype torch.bfloat16, torch.float16 or torch.float32, got {out_dtype}")
    if mask is not None and mask.is_floating_point() and mask.dtype not in OUT_DTYPES:
        raise TypeError(f"{op}: expected a bool mask or a float16/bfloat16/float32 bias with FP8 inputs, got {mask.dtype}")
    if dropout_p:
        raise ValueError(f"{op}: FP8 attention is for inference: expected dropout_p=0, got {dropout_p}")
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, mask, q_descale, k_descale, v_descale)
    ):
        raise NotImplementedError(
            f"{op}: FP8 attention is for inference and has no backward; run it under torch.no_grad() or "
            "torch.inference_mode(), or without FP8 to train"
        )
    return out_dtype


def packed_descales(shape, device, q_descale, k_descale, v_descale) -> torch.Tensor:
    """The kernel's (*shape, 3) float32 descales, shape (B, H) or (sequences, H) (ones where None)."""
    ones = torch.ones(shape, device=device, dtype=torch.float32)
    return torch.stack([ones if d is None else d for d in (q_descale, k_descale, v_descale)], dim=-1)


# ---------------------------------------------------------------------------------------------
# The swap's FP8 mode: ``kernels.swap(model, fp8=True)`` wraps the model's forward in ``fp8_mode()``,
# and ``kernels.attention`` called with 16- or 32-bit q, k, v inside it quantises them and runs FP8.

_fp8_mode: contextvars.ContextVar[bool] = contextvars.ContextVar("vitriton_fp8", default=False)


@contextlib.contextmanager
def fp8_mode(enabled: bool = True):
    """``with fp8_mode(): model(x)``: every ``kernels.attention`` and ``kernels.attention_varlen`` call of
    the block (this thread) quantises its float q, k, v with ``quantize_fp8`` and runs FP8 attention,
    output in q's dtype."""
    token = _fp8_mode.set(bool(enabled))
    try:
        yield
    finally:
        _fp8_mode.reset(token)


# The same switch inside a graph torch.compile traces, where a ContextVar cannot be set: swap's hooks
# count up and down on this module attribute instead, a side effect Dynamo traces (the graph is
# traced in FP8; the count is back to 0 when it has run, so no other call sees it).
compiled_fp8_depth = 0


def fp8_mode_on() -> bool:
    return _fp8_mode.get() or compiled_fp8_depth > 0
