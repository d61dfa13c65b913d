"""Fused multi-head attention in Triton, the host side: launchers, custom ops and their autograd.

    out = attention_triton(q, k, v, mask=None, scale=None, dropout_p=0.0, is_causal=False)
    # q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv) -> out (B, H, Nq, Dv)
    out = attention_varlen_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)

What it computes is ``kernels.reference.attention_reference``: ``softmax(q k^T * scale + mask) v``
with dropout on the weights, a query row whose every key is masked giving zeros. The kernels are
in ``attention_fwd.py`` and ``attention_bwd.py``, their tile helpers in ``tiles.py``, their
autotune tables in ``configs.py``. ``torch.compile``: the forward and backward are
``torch.library.triton_op`` custom ops (``vitriton::attention_forward``, ...) with
``register_autograd``, so ``torch.compile(fullgraph=True)`` traces them.

Inputs and layout
- q, k, v may have any strides (for example views of a fused qkv projection (B, N, 3, H, D)
  permuted to (B, H, N, D)): the kernels take the strides, nothing is made contiguous. The output
  (B, H, Nq, Dv) is allocated with the strides of (B, Nq, H, Dv) memory (not a view: in-place ops
  on it work), the layout the output projection reads as (B, Nq, H * Dv) without a copy.
- Any lengths Nq, Nk >= 1 (cross-attention too): the last blocks are masked in the loads (keys past
  the end get a logit of -inf), nothing is padded in memory. The grid is one axis of
  ``row blocks * B * H`` programs, so batch * heads is not bound by CUDA's 65,535 limit of axes 1-2.
  An empty output (B, H or Nq of 0) launches nothing: the reference returns it.
- Head dims D and Dv: any integer from 16 to 256 (so 80, 96, 160 too). With D = Dv of 40-48,
  72-96 or 160-192 the head dim is split into two power-of-two pieces (``_head_dim_split``: 64 + 16
  at 80), otherwise padded in registers to the next power of two (BLOCK_D) with masked loads.
- float16, bfloat16, float32, accumulated in fp32. float32 dots follow PyTorch's own switch: TF32
  when ``torch.backends.cuda.matmul.allow_tf32`` is True, exact ("ieee") otherwise (the default).
- ``mask``: bool (True = may attend) or a float bias (q's dtype or float32) added to the scaled
  logits, of any shape broadcastable to (B, H, Nq, Nk). It is read through the strides of
  ``mask.expand(B, H, Nq, Nk)`` (0 on broadcast dims), never materialised. When a float bias
  requires grad the backward writes a full (B, H, Nq, Nk) fp32 gradient and sums it down to the
  bias's shape: B*H*Nq*Nk*4 bytes of temporary memory (119 MB at B=64, H=12, N=197).
- ``is_causal``: top-left aligned as in ``torch.nn.functional.scaled_dot_product_attention``
  (query i sees keys j <= i); key blocks above the diagonal are skipped. With a mask, both apply.
- Dropout: Philox (``tl.rand``) keyed by a seed drawn once per forward from torch's default
  generator of q's device (so ``torch.manual_seed`` reproduces it) and by the (batch, head)
  index, counted by ``row * Nk + col``; the backward draws exactly the same keep mask.
  ``return_dropout_mask=True`` also returns that mask, for tests.
- Non-finite inputs go where the reference sends them: NaN or inf in row i of q gives NaN in row i
  of the output only; in k of key j, in the rows that attend key j (a masked logit is -inf
  whatever it was); in v of key j, in that column of every row whose key block holds key j,
  attended or not, since a weight of 0 times inf is NaN (as in the einsum reference and PyTorch's
  SDPA). The one difference: key blocks a causal row block skips are never read, so there the
  kernel has a finite row where the reference has 0 * inf. Finite inputs whose logits fit float32
  give a finite output.
- Offsets inside one (batch, head) slice are int32 (the slice base is int64): each of q, k, v,
  the expanded mask and, with dropout, Nq * Nk must stay below 2**31 elements per slice.
"""

import torch

from kernels import reference
from kernels.checks import head_dim_problem
from kernels.triton.attention_bwd import _dropout_keep_mask_kernel
from kernels.triton.configs import _KEEP_MASK_BLOCK_M, _KEEP_MASK_BLOCK_N
from kernels.triton.launch import (  # noqa: F401  (attention_grid, _head_dim_split, _kernel_constants: read by tests)
    _dense_layout,
    _dense_output,
    _dense_stats,
    _head_dim_split,
    _kernel_constants,
    _launch_backward,
    _launch_forward,
    _varlen_layout,
    attention_grid,
)

# ---------------------------------------------------------------------------------------------
# The custom ops and their autograd.


@torch.library.triton_op("vitriton::attention_forward", mutates_args={})
def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    dropout_seed: torch.Tensor | None,
    scale: float,
    dropout_p: float,
    is_causal: bool,
    allow_tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, H, Nq, Dv), softmax statistics (2, B, H, Nq) fp32) of checked inputs.

    The statistics are each row's log-sum-exp in base 2, kept in two parts whose exact sum it is:
    [0] the sum rounded to fp32, [1] what that rounding lost (``tiles._store_log_sum_exp``). The
    lean backward reads [0] only; the masked one subtracts both, so a huge row maximum (a finfo.min
    bias) cannot round the sum's logarithm away. Rows padded in memory: ``launch._dense_stats``.
    """
    out = _dense_output(q, v, q.dtype)
    stats = _dense_stats(q)
    _launch_forward(_dense_layout(q, k), q, k, v, mask, dropout_seed, scale, dropout_p, is_causal, allow_tf32, out, stats)
    return out, stats


@torch.library.triton_op("vitriton::attention_backward", mutates_args={})
def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    stats: torch.Tensor,
    mask: torch.Tensor | None,
    dropout_seed: torch.Tensor | None,
    scale: float,
    dropout_p: float,
    is_causal: bool,
    allow_tf32: bool,
    bias_needs_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, d(logits) (B, H, Nq, Nk) fp32 if ``bias_needs_grad`` else an empty tensor)."""
    batch, heads, seqlen_q, _ = q.shape
    seqlen_k = k.shape[2]
    grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty_strided(stats.shape[1:], stats.stride()[1:], device=q.device, dtype=torch.float32)
    # Zeros: the blocks a causal mask skips are never written, and their gradient is 0.
    grad_bias = (
        torch.zeros(batch, heads, seqlen_q, seqlen_k, device=q.device, dtype=torch.float32)
        if bias_needs_grad else stats.new_empty(0)
    )
    _launch_backward(
        _dense_layout(q, k), grad_out, q, k, v, out, stats, mask, dropout_seed, scale, dropout_p, is_causal,
        allow_tf32, bias_needs_grad, grad_q, grad_k, grad_v, delta, grad_bias,
    )
    return grad_q, grad_k, grad_v, grad_bias


def _setup_context(ctx, inputs, output):
    q, k, v, mask, dropout_seed, scale, dropout_p, is_causal, allow_tf32 = inputs
    out, stats = output
    ctx.save_for_backward(q, k, v, out, stats, mask, dropout_seed)
    ctx.scale, ctx.dropout_p, ctx.is_causal, ctx.allow_tf32 = scale, dropout_p, is_causal, allow_tf32
    ctx.mark_non_differentiable(stats)


def _backward(ctx, grad_out, _grad_stats):
    q, k, v, out, stats, mask, dropout_seed = ctx.saved_tensors
    bias_needs_grad = mask is not None and mask.is_floating_point() and ctx.needs_input_grad[3]
    grad_q, grad_k, grad_v, grad_bias = attention_backward(
        grad_out, q, k, v, out, stats, mask, dropout_seed,
        ctx.scale, ctx.dropout_p, ctx.is_causal, ctx.allow_tf32, bias_needs_grad,
    )
    # (B, H, Nq, Nk) summed over the dims the bias was broadcast along, back to its shape.
    grad_mask = grad_bias.sum_to_size(mask.shape).to(mask.dtype) if bias_needs_grad else None
    return grad_q, grad_k, grad_v, grad_mask, None, None, None, None, None


attention_forward.register_autograd(_backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(
        "attention: the Triton kernels' backward has no derivative of its own (double backward, "
        "e.g. a gradient penalty); run the forward with backend='einsum'"
    )


attention_backward.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


# Packed sequences (flash-attn's varlen layout): the same kernels, VARLEN on.


@torch.library.triton_op("vitriton::attention_varlen_forward", mutates_args={})
def attention_varlen_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_seed: torch.Tensor | None,
    scale: float,
    dropout_p: float,
    is_causal: bool,
    allow_tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (total_q, H, Dv), statistics (2, H, total_q) fp32) of checked packed inputs."""
    total_q, heads, _ = q.shape
    out = q.new_empty(total_q, heads, v.shape[2])
    stats = torch.empty(2, heads, total_q, device=q.device, dtype=torch.float32)
    layout = _varlen_layout(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if layout.batch and max_seqlen_q:  # else no query rows: nothing to launch
        _launch_forward(layout, q, k, v, None, dropout_seed, scale, dropout_p, is_causal, allow_tf32, out, stats)
    return out, stats


@torch.library.triton_op("vitriton::attention_varlen_backward", mutates_args={})
def attention_varlen_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    stats: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_seed: torch.Tensor | None,
    scale: float,
    dropout_p: float,
    is_causal: bool,
    allow_tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of packed inputs, in their layouts."""
    grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    layout = _varlen_layout(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if not (layout.batch and max_seqlen_q and max_seqlen_k):  # no score at all: every gradient is 0
        return grad_q.zero_(), grad_k.zero_(), grad_v.zero_()
    delta = torch.empty(q.shape[1], q.shape[0], device=q.device, dtype=torch.float32)
    _launch_backward(
        layout, grad_out, q, k, v, out, stats, None, dropout_seed, scale, dropout_p, is_causal, allow_tf32,
        False, grad_q, grad_k, grad_v, delta, delta,
    )
    return grad_q, grad_k, grad_v


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_seed, scale, dropout_p, is_causal, allow_tf32 = inputs
    out, stats = output
    ctx.save_for_backward(q, k, v, out, stats, cu_seqlens_q, cu_seqlens_k, dropout_seed)
    ctx.options = (max_seqlen_q, max_seqlen_k)
    ctx.scalars = (scale, dropout_p, is_causal, allow_tf32)
    ctx.mark_non_differentiable(stats)


def _varlen_backward(ctx, grad_out, _grad_stats):
    q, k, v, out, stats, cu_seqlens_q, cu_seqlens_k, dropout_seed = ctx.saved_tensors
    grad_q, grad_k, grad_v = attention_varlen_backward(
        grad_out, q, k, v, out, stats, cu_seqlens_q, cu_seqlens_k, *ctx.options, dropout_seed, *ctx.scalars
    )
    return grad_q, grad_k, grad_v, None, None, None, None, None, None, None, None, None


attention_varlen_forward.register_autograd(_varlen_backward, setup_context=_varlen_setup_context)
attention_varlen_backward.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


def dropout_keep_mask(
    dropout_seed: torch.Tensor, shape: tuple[int, int, int, int], dropout_p: float, first_batch_head: int = 0
) -> torch.Tensor:
    """The bool (B, H, Nq, Nk) keep mask (True = kept) the attention kernels draw from ``dropout_seed``
    (for a packed sequence i of H heads: shape (1, H, Nq_i, Nk_i), ``first_batch_head`` i * H)."""
    batch, heads, seqlen_q, seqlen_k = shape
    keep = torch.empty(shape, device=dropout_seed.device, dtype=torch.uint8)
    if keep.numel():
        _dropout_keep_mask_kernel[attention_grid(seqlen_q, batch * heads, _KEEP_MASK_BLOCK_M)](
            dropout_seed, keep, first_batch_head, seqlen_q, seqlen_k, dropout_p,
            BLOCK_M=_KEEP_MASK_BLOCK_M, BLOCK_N=_KEEP_MASK_BLOCK_N,
        )
    return keep.bool()


# ---------------------------------------------------------------------------------------------
# The public function.


def cannot_take(q, k, v, mask, dropout_p) -> str | None:
    """Why these (checked) inputs are beyond the kernels, in words, or None if they can take them."""
    reason = head_dim_problem(q.shape[-1], v.shape[-1])
    if reason is not None:
        return reason
    seqlen_q, seqlen_k = q.shape[2], k.shape[2]
    tensors = {"q": q, "k": k, "v": v}
    if mask is not None:
        tensors["mask"] = mask.expand(*q.shape[:3], seqlen_k)
    for name, t in tensors.items():
        last_offset = sum((size - 1) * stride for size, stride in zip(t.shape[2:], t.stride()[2:]))
        if last_offset >= 2**31:
            return f"each (batch, head) slice of {name} must span fewer than 2**31 elements for the Triton kernels, got {last_offset + 1}"
    if dropout_p > 0.0 and seqlen_q * seqlen_k >= 2**31:
        return f"dropout in the Triton kernels needs Nq * Nk < 2**31, got {seqlen_q} * {seqlen_k}"
    return None


def attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    *,
    is_causal: bool = False,
    return_dropout_mask: bool = False,
):
    """Fused attention: q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv) -> (B, H, Nq, Dv).

    Inputs as checked by ``kernels.dispatch.attention``. ``mask`` broadcasts to (B, H, Nq, Nk):
    bool (True = may attend) or a float bias added to the scaled logits (it gets a gradient when
    it requires one). ``scale`` defaults to D**-0.5. ``return_dropout_mask=True`` returns
    ``(out, keep)``, ``keep`` the bool (B, H, Nq, Nk) mask of the weights dropout kept, for tests.
    """
    reason = cannot_take(q, k, v, mask, dropout_p)
    if reason is not None:
        raise ValueError(f"attention: {reason}; use backend='einsum'")
    shape = (*q.shape[:3], k.shape[2])
    if q.shape[0] * q.shape[1] * q.shape[2] == 0:
        # An empty output (B, H or Nq of 0) has nothing to compute: no launch, no seed drawn. The
        # reference returns the empty result, with gradients, after the same checks as a launch.
        out = reference.attention_reference(q, k, v, mask, scale, dropout_p, is_causal=is_causal)
        return (out, torch.ones(shape, device=q.device, dtype=torch.bool)) if return_dropout_mask else out
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    dropout_seed = None
    if dropout_p > 0.0:
        # Drawn on q's device, so no host-to-device copy; torch.manual_seed seeds that generator too.
        dropout_seed = torch.randint(0, 2**31, (1,), device=q.device, dtype=torch.int64)
    out, _ = attention_forward(
        q, k, v, mask, dropout_seed, scale, float(dropout_p), bool(is_causal),
        bool(torch.backends.cuda.matmul.allow_tf32),
    )
    if not return_dropout_mask:
        return out
    if dropout_seed is None:
        return out, torch.ones(shape, device=q.device, dtype=torch.bool)
    return out, dropout_keep_mask(dropout_seed, shape, float(dropout_p))


def cannot_take_varlen(q, k, v, max_seqlen_q, max_seqlen_k, dropout_p) -> str | None:
    """Why these (checked) packed inputs are beyond the kernels, in words, or None if they can take them."""
    reason = head_dim_problem(q.shape[-1], v.shape[-1])
    if reason is not None:
        return reason
    for name, t, longest in (("q", q, max_seqlen_q), ("k", k, max_seqlen_k), ("v", v, max_seqlen_k)):
        last_offset = max(longest - 1, 0) * t.stride(0) + (t.shape[2] - 1) * t.stride(2)
        if last_offset >= 2**31:
            return f"each sequence's head of {name} must span fewer than 2**31 elements for the Triton kernels, got {last_offset + 1}"
    if dropout_p > 0.0 and max_seqlen_q * max_seqlen_k >= 2**31:
        return f"dropout in the Triton kernels needs Nq * Nk < 2**31 per sequence, got {max_seqlen_q} * {max_seqlen_k}"
    return None


def attention_varlen_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float | None = None,
    dropout_p: float = 0.0,
    *,
    is_causal: bool = False,
    return_dropout_mask: bool = False,
):
    """Fused attention within each packed sequence: q (total_q, H, D), k (total_k, H, D),
    v (total_k, H, Dv) -> (total_q, H, Dv), one launch per kernel for every sequence.

    Inputs as checked by ``kernels.dispatch.attention_varlen`` (``max_seqlen_*`` at least the
    longest lengths: they size the grid). ``return_dropout_mask=True`` returns ``(out, keeps)``,
    ``keeps`` a list of each sequence's bool (H, Nq_i, Nk_i) mask of kept weights, for tests.
    """
    reason = cannot_take_varlen(q, k, v, max_seqlen_q, max_seqlen_k, dropout_p)
    if reason is not None:
        raise ValueError(f"attention_varlen: {reason}; use backend='einsum'")
    # The kernels read cu_seqlens[i] at offset i: a strided, offset or expanded view of the values
    # the checks read would be read wrong (or out of bounds). A copy only when it is not contiguous.
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    dropout_seed = None
    if dropout_p > 0.0:
        dropout_seed = torch.randint(0, 2**31, (1,), device=q.device, dtype=torch.int64)
    out, _ = attention_varlen_forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), dropout_seed, scale,
        float(dropout_p), bool(is_causal), bool(torch.backends.cuda.matmul.allow_tf32),
    )
    if not return_dropout_mask:
        return out
    heads, keeps = q.shape[1], []
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(starts_q) - 1):
        shape = (1, heads, starts_q[i + 1] - starts_q[i], starts_k[i + 1] - starts_k[i])
        keep = (
            torch.ones(shape, device=q.device, dtype=torch.bool) if dropout_seed is None
            else dropout_keep_mask(dropout_seed, shape, float(dropout_p), first_batch_head=i * heads)
        )
        keeps.append(keep[0])
    return out, keeps


# DTensor sharding rules of the four ops (kernels/triton/sharding.py).
from kernels.triton import sharding

sharding.register("attention_forward", "attention_backward", "attention_varlen_forward", "attention_varlen_backward")
