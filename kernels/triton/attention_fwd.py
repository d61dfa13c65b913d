"""The attention forward kernel: FlashAttention-2's online softmax over blocks of keys.

One program per block of BLOCK_M query rows of one (batch, head), or of one packed sequence:
walk the keys in blocks of BLOCK_N keeping a running row maximum ``m``, row sum ``l`` and an
fp32 accumulator, rescaled when the maximum grows. Exponentials are base 2 (``exp2``, the scale
folded into ``scale * log2(e)``), and the row log-sum-exp (base 2, ``m + log2(l)``) is saved for
the backward as its two terms, so that a huge ``m`` (a bias of finfo.min) cannot round
``log2(l)`` away. Launched by ``kernels/triton/attention_ops.py``.
"""

import triton
import triton.language as tl

from kernels.triton.configs import (
    _AUTOTUNE_KEY,
    _FORWARD_TABLE,
    _INTERPRETER_FORWARD_CONFIG,
    FORWARD_CONFIGS,
    SM100_SPILLS_AT_SPLIT,
    _pruner,
)
from kernels.triton.tiles import (
    MASK_NONE_KIND,
    _dropout_keep,
    _head_seed,
    _load_rows,
    _logits_base2,
    _offsets,
    _online_softmax_step,
    _sequence,
    _slice_offset,
    _store_log_sum_exp,
)
from kernels.triton.utils import autotune_configs, dot, rounded_to


@triton.jit
def _forward_block(
    acc, acc_lo, row_sum, row_max, q, q_lo, rows, start_n, k_ptr, v_ptr, mask_ptr, k_strides, v_strides, mask_strides,
    head_seed, seqlen_q, seqlen_k, scale_log2e, dropout_p,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    EXACT_FP32_DOTS: tl.constexpr, UPCAST_DOTS: tl.constexpr, ROW_ALIGN: tl.constexpr,
    SPLIT_D: tl.constexpr, BLOCK_D_LO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
):
    """The online softmax over the keys start_n + [0, BLOCK_N): (acc, acc_lo, row_sum, row_max) updated.

    SPLIT_D (see ``_head_dim_split``): the head dim in two pieces, BLOCK_D then BLOCK_D_LO columns;
    q and q_lo, acc and acc_lo hold them, and each dot is two. Otherwise q_lo and acc_lo pass through.
    """
    cols = start_n + tl.arange(0, BLOCK_N)
    k_t = _load_rows(
        k_ptr, cols, k_strides, seqlen_k, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, ROW_ALIGN=ROW_ALIGN,
        CHECK_LENGTH=MASKED, TRANSPOSED=True,
    )  # (BLOCK_D, BLOCK_N)
    qk = dot(q, k_t, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), EXACT_FP32_DOTS, UPCAST_DOTS)
    if SPLIT_D:
        k_lo_t = _load_rows(
            k_ptr, cols, k_strides, seqlen_k, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D_LO, ROW_ALIGN=ROW_ALIGN,
            CHECK_LENGTH=MASKED, TRANSPOSED=True, D_START=BLOCK_D,
        )  # (BLOCK_D_LO, BLOCK_N)
        qk = dot(q_lo, k_lo_t, qk, EXACT_FP32_DOTS, UPCAST_DOTS)
    logits = qk  # unread by the lean body
    if MASKED:
        logits = _logits_base2(
            qk, rows[:, None], cols[None, :], mask_ptr, mask_strides, seqlen_q, seqlen_k, scale_log2e,
            MASK_KIND=MASK_KIND, IS_CAUSAL=IS_CAUSAL,
        )  # (BLOCK_M, BLOCK_N)
    probs, rescale, row_sum, new_max = _online_softmax_step(qk, logits, row_max, row_sum, scale_log2e, MASKED=MASKED)
    if HAS_DROPOUT:
        probs = tl.where(_dropout_keep(head_seed, rows[:, None], cols[None, :], seqlen_k, dropout_p), probs, 0.0)
    v = _load_rows(
        v_ptr, cols, v_strides, seqlen_k, HEAD_DIM=HEAD_DIM_V, BLOCK_D=BLOCK_DV, ROW_ALIGN=ROW_ALIGN,
        CHECK_LENGTH=MASKED, TRANSPOSED=False,
    )  # (BLOCK_N, BLOCK_DV)
    probs = rounded_to(probs, v_ptr, UPCAST_DOTS)
    acc = dot(probs, v, acc * rescale[:, None], EXACT_FP32_DOTS, UPCAST_DOTS)
    if SPLIT_D:
        v_lo = _load_rows(
            v_ptr, cols, v_strides, seqlen_k, HEAD_DIM=HEAD_DIM_V, BLOCK_D=BLOCK_D_LO, ROW_ALIGN=ROW_ALIGN,
            CHECK_LENGTH=MASKED, TRANSPOSED=False, D_START=BLOCK_DV,
        )  # (BLOCK_N, BLOCK_D_LO)
        acc_lo = dot(probs, v_lo, acc_lo * rescale[:, None], EXACT_FP32_DOTS, UPCAST_DOTS)
    return acc, acc_lo, row_sum, new_max


@triton.jit
def _forward_tail(
    acc, acc_lo, row_sum, row_max, q, q_lo, rows, start_n, end_n, k_ptr, v_ptr, mask_ptr, k_strides, v_strides,
    mask_strides, head_seed, seqlen_q, seqlen_k, scale_log2e, dropout_p,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    EXACT_FP32_DOTS: tl.constexpr, UPCAST_DOTS: tl.constexpr, ROW_ALIGN: tl.constexpr,
    SPLIT_D: tl.constexpr, BLOCK_D_LO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The keys [start_n, end_n), fewer than BLOCK_N, as one masked block: 16 keys wide (a tensor
    core's depth) where they fit, else BLOCK_N.

    At N = 197 and BLOCK_N = 64 the last block holds 5 keys: 16 columns where a whole block computes
    64 (the masked body costs about its width: 784 -> 299 instructions at 128x64, 4 warps, in the
    study of issue 21). The 16-wide copy is picked at run time (packed sequences end anywhere; one
    compilation serves every N). Widths 32 and 64 as well cost registers at the split head dims on
    sm_90 (ViT-H/14's 64x64 forward 126 -> 140, 4 -> 3 blocks per SM; 128x64, 8 warps, 2 -> 1):
    not taken.
    """
    tail = end_n - start_n
    if BLOCK_N > 16:  # noqa: SIM102 (a compile-time choice around a run-time one)
        if tail <= 16:
            acc, acc_lo, row_sum, row_max = _forward_block(
                acc, acc_lo, row_sum, row_max, q, q_lo, rows, start_n, k_ptr, v_ptr, mask_ptr,
                k_strides, v_strides, mask_strides, head_seed, seqlen_q, seqlen_k, scale_log2e, dropout_p,
                HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, MASK_KIND=MASK_KIND,
                IS_CAUSAL=IS_CAUSAL, HAS_DROPOUT=HAS_DROPOUT, EXACT_FP32_DOTS=EXACT_FP32_DOTS,
                UPCAST_DOTS=UPCAST_DOTS, ROW_ALIGN=ROW_ALIGN, SPLIT_D=SPLIT_D, BLOCK_D_LO=BLOCK_D_LO,
                BLOCK_M=BLOCK_M, BLOCK_N=16, MASKED=True,
            )
    if (tail > 16) | (BLOCK_N == 16):
        acc, acc_lo, row_sum, row_max = _forward_block(
            acc, acc_lo, row_sum, row_max, q, q_lo, rows, start_n, k_ptr, v_ptr, mask_ptr,
            k_strides, v_strides, mask_strides, head_seed, seqlen_q, seqlen_k, scale_log2e, dropout_p,
            HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, MASK_KIND=MASK_KIND,
            IS_CAUSAL=IS_CAUSAL, HAS_DROPOUT=HAS_DROPOUT, EXACT_FP32_DOTS=EXACT_FP32_DOTS,
            UPCAST_DOTS=UPCAST_DOTS, ROW_ALIGN=ROW_ALIGN, SPLIT_D=SPLIT_D, BLOCK_D_LO=BLOCK_D_LO,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, MASKED=True,
        )
    return acc, acc_lo, row_sum, row_max


@triton.autotune(
    configs=autotune_configs(FORWARD_CONFIGS, _INTERPRETER_FORWARD_CONFIG),
    key=_AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _pruner(_FORWARD_TABLE, sm100_spills_at_split=SM100_SPILLS_AT_SPLIT["forward"])},
)
@triton.jit
def _attention_forward_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, seed_ptr, out_ptr, stats_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_maskb, stride_maskh, stride_maskm, stride_maskn,
    stride_ob, stride_oh, stride_om, stride_od, stride_stats, stride_stats_b, stride_stats_h,
    n_heads, seqlen_q, seqlen_k, scale_log2e, dropout_p,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, NEGATIVE_SCALE: tl.constexpr,
    EXACT_FP32_DOTS: tl.constexpr, UPCAST_DOTS: tl.constexpr, ROW_ALIGN: tl.constexpr, VARLEN: tl.constexpr,
    SPLIT_D: tl.constexpr, BLOCK_D_LO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The output and softmax statistics of one block of BLOCK_M query rows of one (batch, head).

    VARLEN: a "batch" is a packed sequence, seqlen_q and seqlen_k the longest (they size the grid).
    SPLIT_D: BLOCK_D and BLOCK_DV are the head dim's first piece, BLOCK_D_LO its second.
    The strides stay separate arguments, grouped per tensor as (batch, head, row, head dim) inside:
    Inductor cannot pass a tuple to a user-defined Triton kernel (torch 2.14), so a tuple parameter
    would break ``torch.compile`` of the custom ops."""
    q_strides = (stride_qb, stride_qh, stride_qm, stride_qd)
    k_strides = (stride_kb, stride_kh, stride_kn, stride_kd)
    v_strides = (stride_vb, stride_vh, stride_vn, stride_vd)
    mask_strides = (stride_maskb, stride_maskh, stride_maskm, stride_maskn)
    out_strides = (stride_ob, stride_oh, stride_om, stride_od)
    n_row_blocks = tl.cdiv(seqlen_q, BLOCK_M)
    pid = tl.program_id(0)
    # Last row blocks first: under a causal mask they have the most keys, so they start earliest.
    row_block = n_row_blocks - 1 - pid % n_row_blocks
    batch_head = pid // n_row_blocks
    batch = (batch_head // n_heads).to(tl.int64)
    head = (batch_head % n_heads).to(tl.int64)
    q_ptr += _slice_offset(batch, head, q_strides, ROW_ALIGN)
    k_ptr += _slice_offset(batch, head, k_strides, ROW_ALIGN)
    v_ptr += _slice_offset(batch, head, v_strides, ROW_ALIGN)
    mask_ptr += batch * stride_maskb + head * stride_maskh
    out_ptr += _slice_offset(batch, head, out_strides, ROW_ALIGN)
    stats_ptr += batch * stride_stats_b + head * stride_stats_h
    if VARLEN:
        start_q, seqlen_q = _sequence(cu_seqlens_q_ptr, batch)
        start_k, seqlen_k = _sequence(cu_seqlens_k_ptr, batch)
        if row_block * BLOCK_M >= seqlen_q:  # a block past this sequence's end (the grid fits the longest)
            return
        q_ptr += _offsets(start_q, stride_qm, ROW_ALIGN)
        out_ptr += _offsets(start_q, stride_om, ROW_ALIGN)
        stats_ptr += start_q
        k_ptr += _offsets(start_k, stride_kn, ROW_ALIGN)
        v_ptr += _offsets(start_k, stride_vn, ROW_ALIGN)

    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    q = _load_rows(
        q_ptr, rows, q_strides, seqlen_q, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, ROW_ALIGN=ROW_ALIGN,
        CHECK_LENGTH=True, TRANSPOSED=False,
    )
    head_seed = 0
    if HAS_DROPOUT:
        head_seed = _head_seed(seed_ptr, batch_head)

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    q_lo, acc_lo = q, acc  # passed through unless SPLIT_D
    if SPLIT_D:
        q_lo = _load_rows(
            q_ptr, rows, q_strides, seqlen_q, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D_LO, ROW_ALIGN=ROW_ALIGN,
            CHECK_LENGTH=True, TRANSPOSED=False, D_START=BLOCK_D,
        )
        acc_lo = tl.zeros([BLOCK_M, BLOCK_D_LO], tl.float32)
    # The lean body (tiles.py) where it applies; a negative scale (rare) takes the masked one: its
    # largest logit is the smallest product, where the lean body scales the largest.
    lean: tl.constexpr = MASK_KIND == MASK_NONE_KIND and not IS_CAUSAL and not EXACT_FP32_DOTS and not NEGATIVE_SCALE
    key_end = seqlen_k
    if IS_CAUSAL:
        key_end = tl.minimum(seqlen_k, (row_block + 1) * BLOCK_M)  # keys past the last row: all masked
    whole_end = key_end // BLOCK_N * BLOCK_N
    for start_n in range(0, whole_end, BLOCK_N):
        acc, acc_lo, row_sum, row_max = _forward_block(
            acc, acc_lo, row_sum, row_max, q, q_lo, rows, start_n, k_ptr, v_ptr, mask_ptr,
            k_strides, v_strides, mask_strides, head_seed, seqlen_q, seqlen_k, scale_log2e, dropout_p,
            HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, MASK_KIND=MASK_KIND,
            IS_CAUSAL=IS_CAUSAL, HAS_DROPOUT=HAS_DROPOUT, EXACT_FP32_DOTS=EXACT_FP32_DOTS,
            UPCAST_DOTS=UPCAST_DOTS, ROW_ALIGN=ROW_ALIGN, SPLIT_D=SPLIT_D, BLOCK_D_LO=BLOCK_D_LO,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, MASKED=not lean,
        )
    if whole_end < key_end:  # the last, partial block, narrowed
        acc, acc_lo, row_sum, row_max = _forward_tail(
            acc, acc_lo, row_sum, row_max, q, q_lo, rows, whole_end, key_end, k_ptr, v_ptr, mask_ptr,
            k_strides, v_strides, mask_strides, head_seed, seqlen_q, seqlen_k, scale_log2e, dropout_p,
            HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, MASK_KIND=MASK_KIND,
            IS_CAUSAL=IS_CAUSAL, HAS_DROPOUT=HAS_DROPOUT, EXACT_FP32_DOTS=EXACT_FP32_DOTS,
            UPCAST_DOTS=UPCAST_DOTS, ROW_ALIGN=ROW_ALIGN, SPLIT_D=SPLIT_D, BLOCK_D_LO=BLOCK_D_LO,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        )

    # A row with every key masked has row_sum 0: divide by 1, output 0, and save a log-sum-exp of 0
    # so the backward's exp2(-inf - 0) gives it zero probabilities, hence zero gradients.
    row_sum = tl.where(row_sum == 0.0, 1.0, row_sum)
    if HAS_DROPOUT:
        acc = acc * (1.0 / (1.0 - dropout_p))
    acc = acc / row_sum[:, None]
    offs_dv = tl.arange(0, BLOCK_DV)
    out_rows = out_ptr + _offsets(rows, stride_om, ROW_ALIGN)[:, None]
    tl.store(
        out_rows + offs_dv[None, :] * stride_od, rounded_to(acc, out_ptr, UPCAST_DOTS),
        mask=(rows[:, None] < seqlen_q) & (offs_dv[None, :] < HEAD_DIM_V),
    )
    if SPLIT_D:
        acc_lo = acc_lo / row_sum[:, None]
        if HAS_DROPOUT:
            acc_lo = acc_lo * (1.0 / (1.0 - dropout_p))
        offs_lo = BLOCK_DV + tl.arange(0, BLOCK_D_LO)
        tl.store(
            out_rows + offs_lo[None, :] * stride_od, rounded_to(acc_lo, out_ptr, UPCAST_DOTS),
            mask=(rows[:, None] < seqlen_q) & (offs_lo[None, :] < HEAD_DIM_V),
        )
    # Last, once the output is stored: its temporaries beside the accumulator cost a block per SM
    # (ViT-H/14's 64x64 tile, sm_90).
    _store_log_sum_exp(stats_ptr, stride_stats, rows, rows < seqlen_q, row_max, row_sum)
