"""Launching the attention kernels: the grid, the constexprs, the layouts (dense or packed), and
one launcher per pass. ``attention_ops.py`` calls these from its custom ops. The backward is the
pair of kernels (dK/dV, then dQ) or the one fused kernel, chosen per launch by ``_fused_backward_wanted``.
"""

import dataclasses

import torch
import triton

from kernels.triton.attention_bwd import (
    _attention_backward_delta_kernel,
    _attention_backward_kv_kernel,
)
from kernels.triton.attention_bwd_dq import _attention_backward_q_kernel
from kernels.triton.attention_bwd_fused import _attention_backward_fused_kernel
from kernels.triton.attention_fwd import _attention_forward_kernel
from kernels.triton.attention_fwd_ws import launch_ws_forward, ws_forward_takes
from kernels.triton.configs import (
    _PREPASS_BLOCK_M,
    LOG2E,
    MASK_BIAS,
    MASK_BOOL,
    MASK_NONE,
    is_sm100,
    target_arch,
)
from kernels.triton.utils import INTERPRETING

# The fused backward (``attention_bwd_fused.py``: 5 GEMMs per tile where the pair does 7, dQ by fp32
# atomic adds) from this many keys per sequence. From the sm_90 estimate of issue 21 (instruction
# counts, no GPU run yet): about -30% of the attention backward at ViT-L/16-384 (N = 577, 651 ->
# 452 us), none or negative at ViT-B/16 (N = 197, where the fp32 dQ traffic, which grows with N,
# outweighs the saved GEMMs, which grow with N**2). The break-even lies between; 512 (8 key blocks of
# 64) takes the fused kernel at N = 577 and above (ViT-L/16-384, SigLIP's 729) and leaves 197 and
# 257 (ViT-H/14, not estimated) to the pair until ``python -m bench.gpu_check`` measures the switch-over.
FUSED_BACKWARD_MIN_KEYS = 512


def attention_grid(n_rows: int, batch_heads: int, block_rows: int) -> tuple[int]:
    """One program per block of ``block_rows`` rows per (batch, head), all on grid axis 0.

    Axis 0 takes up to 2**31 - 1 programs where axes 1 and 2 stop at 65,535, so batch * heads
    is not limited by the grid.
    """
    return (triton.cdiv(n_rows, block_rows) * batch_heads,)


def _mask_arguments(q, k, mask):
    """(pointer, its four (B, H, Nq, Nk) strides, MASK_KIND); q stands in for an absent mask, unread."""
    if mask is None:
        return q, (0, 0, 0, 0), MASK_NONE
    batch, heads, seqlen_q, _ = q.shape
    expanded = mask.expand(batch, heads, seqlen_q, k.shape[2])  # a view: broadcast dims get stride 0
    return expanded, expanded.stride(), MASK_BOOL if mask.dtype == torch.bool else MASK_BIAS


def _row_align(*tensors: torch.Tensor) -> int:
    """ROW_ALIGN for kernels that read or write ``tensors`` (of one dtype): 16 bytes in elements if
    every stride but the head dim's is a multiple of it, so each row of each (batch, head) slice
    starts 16 bytes apart from the pointer (vector loads and cp.async then apply), else 1."""
    vector = 16 // tensors[0].element_size()
    return vector if all(stride % vector == 0 for t in tensors for stride in t.stride()[:-1]) else 1


def _head_dim_split(head_dim: int, head_dim_v: int, exact_fp32: bool) -> tuple[int, int] | None:
    """(first piece, second piece) of the kernels' head dim, or None to pad it to a power of two.

    A head dim of 72-96 padded to 128 spends 25-44% of each q k^T and p v product on zeros; as
    64 + 16 (72, 80) or 64 + 32 (88, 96) the padding is 0-10%, for a second, smaller tensor-core
    product per dot. So: the largest power of two below it, then the rest rounded up to a power of
    two of at least 16 (a tensor core's depth), where that is less than the padded width. Only
    with D = Dv (one split serves both dots) and tensor-core dots; forward and backward alike.
    """
    if head_dim != head_dim_v or exact_fp32:
        return None
    padded = triton.next_power_of_2(head_dim)
    first = padded // 2
    if head_dim <= first or first < 32:
        return None
    second = max(16, triton.next_power_of_2(head_dim - first))
    return (first, second) if first + second < padded else None


def _kernel_constants(q, v, dropout_p, allow_tf32):
    """The constexprs every attention kernel takes, from the inputs."""
    head_dim, head_dim_v = q.shape[-1], v.shape[-1]
    return {
        "HEAD_DIM": head_dim,
        "HEAD_DIM_V": head_dim_v,
        "BLOCK_D": triton.next_power_of_2(head_dim),
        "BLOCK_DV": triton.next_power_of_2(head_dim_v),
        "HAS_DROPOUT": dropout_p > 0.0,
        "EXACT_FP32_DOTS": q.dtype == torch.float32 and not allow_tf32,
        # Interpreting bf16: dots upcast to fp32, and fp32 -> bf16 casts rounded as a GPU rounds them.
        "UPCAST_DOTS": INTERPRETING and q.dtype == torch.bfloat16,
    }


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How the kernels index one call's tensors: dense (B, H, N, D), or packed sequences.

    Packed (varlen): q, k, v, out and their gradients are (total, H, D) and the kernels see them
    as (n_seqs, H, longest, D) with a batch stride of 0, each sequence's first row read from
    ``cu_seqlens``; the statistics and delta are (2, H, total_q) and (H, total_q).
    """

    batch: int  # batches, or packed sequences
    heads: int
    seqlen_q: int  # the lengths, or the longest of the packed sequences (the grid is sized by them)
    seqlen_k: int
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    def strides(self, t: torch.Tensor) -> tuple[int, int, int, int]:
        """(batch, head, row, head dim) strides of q, k, v, out or a gradient."""
        return (0, t.stride(1), t.stride(0), t.stride(2)) if self.varlen else t.stride()

    def stats_strides(self, stats: torch.Tensor) -> tuple[int, int, int]:
        """(between max and log-sum, batch, head) strides of the statistics; delta's (batch, head) too."""
        return (stats.stride(0), 0, stats.stride(1)) if self.varlen else stats.stride()[:3]

    def cu_seqlens(self, stand_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cu_seqlens pointers; dense, any tensor stands in (unread)."""
        return (self.cu_seqlens_q, self.cu_seqlens_k) if self.varlen else (stand_in, stand_in)


def _dense_layout(q, k) -> _Layout:
    return _Layout(q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def _varlen_layout(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> _Layout:
    return _Layout(cu_seqlens_q.shape[0] - 1, q.shape[1], max_seqlen_q, max_seqlen_k, cu_seqlens_q, cu_seqlens_k)


def _dense_output(q: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The forwards' output (B, H, Nq, Dv) in (B, Nq, H, Dv) memory, what the output projection reads.
    Allocated with those strides rather than permuted, so it is no view and in-place ops on it are allowed."""
    batch, heads, seqlen_q, _ = q.shape
    head_dim_v = v.shape[3]
    return torch.empty_strided(
        (batch, heads, seqlen_q, head_dim_v), (seqlen_q * heads * head_dim_v, head_dim_v, heads * head_dim_v, 1),
        device=q.device, dtype=dtype,
    )


def _dense_stats(q: torch.Tensor) -> torch.Tensor:
    """The forward's statistics, (2, B, H, Nq) fp32 (``_store_log_sum_exp``), each (batch, head) row
    a multiple of 16 floats from the next: an unpadded stride of Nq = 197 or 729 tells Triton
    nothing of alignment, and the backward kernels then read each row's two floats with a scalar
    load apiece (sm_90: 16 LDG.E per thread per block of 64 rows, where 8 LDG.E.64 do). The backward
    gives delta the same strides. Allocated with them rather than sliced, so it is no view."""
    batch, heads, seqlen_q, _ = q.shape
    row_stride = -(-seqlen_q // 16) * 16
    return torch.empty_strided(
        (2, batch, heads, seqlen_q), (batch * heads * row_stride, heads * row_stride, row_stride, 1),
        device=q.device, dtype=torch.float32,
    )


def _ws_forward_wanted(q, k, v, out, dropout_p, masked=False) -> bool:
    """Whether the forward runs the warp-specialised kernel (``attention_fwd_ws.py``): on sm_100,
    where it can take the inputs (``ws_forward_takes``), and under a mask or causal (``masked``)
    at head dims up to 64 only: padded to 128 (72-96) its masked body spills 128-3140 bytes
    (ptxas-blackwell 12.9, SigLIP), where the 16-bit kernel's F16_MASKED_SM100 tile is clean."""
    if masked and max(q.shape[-1], v.shape[-1]) > 64:
        return False
    return is_sm100(target_arch(q)) and ws_forward_takes(q, k, v, out, dropout_p)


def _launch_forward(layout, q, k, v, mask, dropout_seed, scale, dropout_p, is_causal, allow_tf32, out, stats):
    """Fill ``out`` and ``stats`` with the forward kernel: warp-specialised on sm_100 where it can."""
    mask_ptr, mask_strides, mask_kind = _mask_arguments(q, k, mask)
    seed = dropout_seed if dropout_seed is not None else stats  # unread without dropout
    stride_stats, stride_stats_b, stride_stats_h = layout.stats_strides(stats)

    def grid(meta):
        return attention_grid(layout.seqlen_q, layout.batch * layout.heads, meta["BLOCK_M"])

    if _ws_forward_wanted(q, k, v, out, dropout_p, masked=mask is not None or is_causal):
        launch_ws_forward(layout, q, k, v, mask, scale, is_causal, out, stats, (mask_ptr, mask_strides, mask_kind), grid)
        return

    constants = _kernel_constants(q, v, dropout_p, allow_tf32)
    split = _head_dim_split(q.shape[-1], v.shape[-1], constants["EXACT_FP32_DOTS"])
    if split is not None:
        constants["BLOCK_D"] = constants["BLOCK_DV"] = split[0]
    torch.library.wrap_triton(_attention_forward_kernel)[grid](
        q, k, v, mask_ptr, seed, out, stats, *layout.cu_seqlens(stats),
        *layout.strides(q), *layout.strides(k), *layout.strides(v), *mask_strides, *layout.strides(out),
        stride_stats, stride_stats_b, stride_stats_h,
        layout.heads, layout.seqlen_q, layout.seqlen_k, scale * LOG2E, dropout_p,
        MASK_KIND=mask_kind, IS_CAUSAL=is_causal, NEGATIVE_SCALE=scale < 0, ROW_ALIGN=_row_align(q, k, v, out),
        VARLEN=layout.varlen, SPLIT_D=split is not None, BLOCK_D_LO=split[1] if split else 16, **constants,
    )


def _fused_backward_fits(
    head_dim: int, split: tuple[int, int] | None, dtype: torch.dtype, masked: bool, dropout: bool, arch: int = 90,
) -> bool:
    """Whether the fused kernel's sm_90 code at these inputs was read clean (no spills; the tables in
    ``attention_bwd_fused.py``): fp16/bf16 (TF32 spills 400-670 bytes), no dropout (its Philox in the
    loop spills 100-440 bytes at every tile tried), ``head_dim`` (the larger of D, Dv) up to 64, and
    65 to 80 where ``split`` (``_head_dim_split``) is 64 + 16 without a mask or causal (with them:
    236-344 bytes). D = 96 (64 + 32) and 128 spill. On sm_100 (``arch``) the split 64 + 16 spills
    too (148 bytes at SigLIP, ptxas-blackwell 12.9): D up to 64 only."""
    if dtype not in (torch.float16, torch.bfloat16) or dropout:
        return False
    return head_dim <= 64 or (split == (64, 16) and not masked and not is_sm100(arch))


def _fused_backward_wanted(keys_per_sequence: float, fits: bool, *tensors: torch.Tensor) -> bool:
    """Whether the backward runs the fused kernel rather than the pair: for ``keys_per_sequence`` (the
    mean over packed sequences) of at least ``FUSED_BACKWARD_MIN_KEYS``, where it ``fits``
    (``_fused_backward_fits``), when every one of ``tensors`` (q, k, v, the upstream gradient, dK, dV)
    has a contiguous head dim (the fused kernel takes no head-dim strides), and never under
    ``torch.use_deterministic_algorithms(True)``: the order of its atomic dQ adds, hence dQ's rounding,
    varies from run to run. The pair is deterministic."""
    if torch.are_deterministic_algorithms_enabled() or not fits:
        return False
    if any(t.stride(-1) != 1 for t in tensors):
        return False
    return keys_per_sequence >= FUSED_BACKWARD_MIN_KEYS


def _launch_backward(
    layout, grad_out, q, k, v, out, stats, mask, dropout_seed, scale, dropout_p, is_causal, allow_tf32,
    bias_needs_grad, grad_q, grad_k, grad_v, delta, grad_bias,
):
    """Fill ``delta``, ``grad_q``, ``grad_k``, ``grad_v`` (and ``grad_bias``) with the backward kernels:
    the delta pre-pass, then the fused kernel or the pair (``_fused_backward_wanted``)."""
    constants = _kernel_constants(q, v, dropout_p, allow_tf32)
    constants["ROW_ALIGN"] = _row_align(q, k, v, out, grad_out, grad_q, grad_k, grad_v)
    padded_dv = constants["BLOCK_DV"]  # the delta pre-pass reads whole rows
    split = _head_dim_split(q.shape[-1], v.shape[-1], constants["EXACT_FP32_DOTS"])
    if split is not None:
        constants["BLOCK_D"] = constants["BLOCK_DV"] = split[0]
    constants.update(SPLIT_D=split is not None, BLOCK_D_LO=split[1] if split else 16)
    mask_ptr, mask_strides, mask_kind = _mask_arguments(q, k, mask)
    seed = dropout_seed if dropout_seed is not None else stats  # unread without dropout
    stride_stats, stride_stats_b, stride_stats_h = layout.stats_strides(stats)
    cu_seqlens = layout.cu_seqlens(stats)

    # delta per query row: packed, the rows of every sequence are one batch of total_q rows.
    delta_batch, delta_rows = (1, q.shape[0]) if layout.varlen else (layout.batch, layout.seqlen_q)
    torch.library.wrap_triton(_attention_backward_delta_kernel)[
        attention_grid(delta_rows, delta_batch * layout.heads, _PREPASS_BLOCK_M)
    ](
        out, grad_out, delta, *layout.strides(out), *layout.strides(grad_out), stride_stats_b, stride_stats_h,
        layout.heads, delta_rows,
        HEAD_DIM_V=v.shape[-1], BLOCK_DV=padded_dv, ROW_ALIGN=constants["ROW_ALIGN"],
        BLOCK_M=_PREPASS_BLOCK_M,
    )

    keys_per_sequence = k.shape[0] / layout.batch if layout.varlen else layout.seqlen_k
    fits = _fused_backward_fits(
        max(q.shape[-1], v.shape[-1]), split, q.dtype, mask is not None or is_causal, dropout_p > 0.0, target_arch(q)
    )
    if _fused_backward_wanted(keys_per_sequence, fits, q, k, v, grad_out, grad_k, grad_v):
        # dQ's unscaled fp32 sums, (B, H, Nq, D) or packed (total_q, H, D), contiguous (the kernel
        # derives their strides), zeros: the kernel only adds.
        grad_q_sums = torch.zeros(q.shape, device=q.device, dtype=torch.float32)

        def fused_grid(meta):
            return attention_grid(layout.seqlen_k, layout.batch * layout.heads, meta["BLOCK_N"])

        head_strides = [stride for t in (q, k, v) for stride in layout.strides(t)[:3]]
        grad_strides = [stride for t in (grad_k, grad_v) for stride in layout.strides(t)[:3]]
        torch.library.wrap_triton(_attention_backward_fused_kernel)[fused_grid](
            q, k, v, mask_ptr, seed, grad_out, stats, delta, grad_q_sums, grad_k, grad_v,
            grad_bias if bias_needs_grad else delta, *cu_seqlens,
            *head_strides, *mask_strides, *layout.strides(grad_out)[:3], *grad_strides,
            stride_stats, stride_stats_b, stride_stats_h, layout.heads, layout.seqlen_q, layout.seqlen_k,
            scale, scale * LOG2E, dropout_p,
            MASK_KIND=mask_kind, IS_CAUSAL=is_causal, BIAS_NEEDS_GRAD=bias_needs_grad, VARLEN=layout.varlen,
            **constants,
        )
        grad_q.copy_(grad_q_sums.mul_(scale))  # rounded to q's dtype as the pair's dQ kernel rounds
        return

    def kv_grid(meta):
        return attention_grid(layout.seqlen_k, layout.batch * layout.heads, meta["BLOCK_N"])

    torch.library.wrap_triton(_attention_backward_kv_kernel)[kv_grid](
        q, k, v, mask_ptr, seed, grad_out, stats, delta, grad_k, grad_v, *cu_seqlens,
        *layout.strides(q), *layout.strides(k), *layout.strides(v), *mask_strides, *layout.strides(grad_out),
        *layout.strides(grad_k), *layout.strides(grad_v), stride_stats, stride_stats_b, stride_stats_h,
        layout.heads, layout.seqlen_q, layout.seqlen_k, scale, scale * LOG2E, dropout_p,
        MASK_KIND=mask_kind, IS_CAUSAL=is_causal, VARLEN=layout.varlen, **constants,
    )

    def q_grid(meta):
        return attention_grid(layout.seqlen_q, layout.batch * layout.heads, meta["BLOCK_M"])

    # Without a bias gradient the dQ kernel gets delta in its place, never written (BIAS_NEEDS_GRAD off).
    torch.library.wrap_triton(_attention_backward_q_kernel)[q_grid](
        q, k, v, mask_ptr, seed, grad_out, stats, delta, grad_q, grad_bias if bias_needs_grad else delta, *cu_seqlens,
        *layout.strides(q), *layout.strides(k), *layout.strides(v), *mask_strides, *layout.strides(grad_out),
        *layout.strides(grad_q), stride_stats, stride_stats_b, stride_stats_h,
        layout.heads, layout.seqlen_q, layout.seqlen_k, scale, scale * LOG2E, dropout_p,
        MASK_KIND=mask_kind, IS_CAUSAL=is_causal, BIAS_NEEDS_GRAD=bias_needs_grad, VARLEN=layout.varlen, **constants,
    )
