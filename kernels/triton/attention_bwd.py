"""The attention backward kernels: a pre-pass ``delta = rowsum(out * grad_out)``, then one kernel
over key blocks for dK and dV (here) and one over query blocks for dQ and the bias gradient
(``attention_bwd_dq.py``), both recomputing the probabilities from the saved log-sum-exp: no
atomics, no (Nq, Nk) matrix kept (``attention_bwd_fused.py`` is the one-kernel alternative). Also
the kernel that writes the dropout keep mask the others draw, for tests. Launched by
``kernels/triton/launch.py``.
"""

import triton
import triton.language as tl

from kernels.triton.configs import (
    _AUTOTUNE_KEY,
    _BACKWARD_KV_TABLE,
    _INTERPRETER_BACKWARD_KV_CONFIG,
    BACKWARD_KV_CONFIGS,
    _pruner,
)
from kernels.triton.tiles import (
    MASK_NONE_KIND,
    _add_rows,
    _dropout_keep,
    _head_seed,
    _load_rows,
    _logits_base2,
    _offsets,
    _sequence,
    _slice_offset,
    _store_rows,
)
from kernels.triton.utils import autotune_configs, dot, rounded_to


@triton.jit
def _attention_backward_delta_kernel(
    out_ptr, grad_out_ptr, delta_ptr,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_delta_b, stride_delta_h, n_heads, seqlen_q,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, ROW_ALIGN: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta = rowsum(out * grad_out): the softmax backward's row term, dropout included. Its rows
    lie as the statistics' do (``launch._dense_stats``)."""
    n_row_blocks = tl.cdiv(seqlen_q, BLOCK_M)
    pid = tl.program_id(0)
    row_block = pid % n_row_blocks
    batch_head = pid // n_row_blocks
    batch = (batch_head // n_heads).to(tl.int64)
    head = (batch_head % n_heads).to(tl.int64)
    out_strides = (stride_ob, stride_oh, stride_om, stride_od)
    grad_out_strides = (stride_gb, stride_gh, stride_gm, stride_gd)
    out_ptr += _slice_offset(batch, head, out_strides, ROW_ALIGN)
    grad_out_ptr += _slice_offset(batch, head, grad_out_strides, ROW_ALIGN)
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    out = _load_rows(
        out_ptr, rows, out_strides, seqlen_q, HEAD_DIM=HEAD_DIM_V, BLOCK_D=BLOCK_DV, ROW_ALIGN=ROW_ALIGN,
        CHECK_LENGTH=True, TRANSPOSED=False,
    )
    grad_out = _load_rows(
        grad_out_ptr, rows, grad_out_strides, seqlen_q, HEAD_DIM=HEAD_DIM_V, BLOCK_D=BLOCK_DV, ROW_ALIGN=ROW_ALIGN,
        CHECK_LENGTH=True, TRANSPOSED=False,
    )  # (BLOCK_M, BLOCK_DV)
    delta = tl.sum(out.to(tl.float32) * grad_out.to(tl.float32), 1)
    tl.store(delta_ptr + batch * stride_delta_b + head * stride_delta_h + rows, delta, mask=rows < seqlen_q)


@triton.jit
def _backward_kv_block(
    grad_k, grad_v, grad_k_lo, grad_v_lo, k, v, k_lo, v_lo, cols, start_m,
    q_ptr, grad_out_ptr, stats_ptr, delta_ptr, mask_ptr, q_strides, grad_out_strides, mask_strides, stride_stats,
    head_seed, keep_scale, seqlen_q, seqlen_k, scale_log2e, dropout_p,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    EXACT_FP32_DOTS: tl.constexpr, UPCAST_DOTS: tl.constexpr, ROW_ALIGN: tl.constexpr,
    SPLIT_D: tl.constexpr, BLOCK_D_LO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, grad_q_ptr=None, grad_bias_ptr=None, grad_q_strides=None,
    ADD_GRAD_Q: tl.constexpr = False, BIAS_NEEDS_GRAD: tl.constexpr = False,
):
    """dK and dV of the program's keys, summed over the query rows start_m + [0, BLOCK_M): updated.
    SPLIT_D: the head dim's second piece in k_lo, v_lo, grad_k_lo, grad_v_lo (else passed through).
    ADD_GRAD_Q (the fused backward, ``attention_bwd_fused.py``): also those rows' dQ over the
    program's keys, added to the fp32 sums at ``grad_q_ptr``, and, with BIAS_NEEDS_GRAD, their bias
    gradient d(logits), stored as the dQ kernel stores it."""
    rows = start_m + tl.arange(0, BLOCK_M)
    q_t = _load_rows(
        q_ptr, rows, q_strides, seqlen_q, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, ROW_ALIGN=ROW_ALIGN,
        CHECK_LENGTH=MASKED, TRANSPOSED=True,
    )  # (BLOCK_D, BLOCK_M)
    grad_out = _load_rows(
        grad_out_ptr, rows, grad_out_strides, seqlen_q, HEAD_DIM=HEAD_DIM_V, BLOCK_D=BLOCK_DV, ROW_ALIGN=ROW_ALIGN,
        CHECK_LENGTH=MASKED, TRANSPOSED=False,
    )  # (BLOCK_M, BLOCK_DV)
    q_lo_t, grad_out_lo = q_t, grad_out
    if SPLIT_D:
        q_lo_t = _load_rows(
            q_ptr, rows, q_strides, seqlen_q, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D_LO, ROW_ALIGN=ROW_ALIGN,
            CHECK_LENGTH=MASKED, TRANSPOSED=True, D_START=BLOCK_D,
        )  # (BLOCK_D_LO, BLOCK_M)
        grad_out_lo = _load_rows(
            grad_out_ptr, rows, grad_out_strides, seqlen_q, HEAD_DIM=HEAD_DIM_V, BLOCK_D=BLOCK_D_LO,
            ROW_ALIGN=ROW_ALIGN, CHECK_LENGTH=MASKED, TRANSPOSED=False, D_START=BLOCK_DV,
        )  # (BLOCK_M, BLOCK_D_LO)
    # The rows' log2-sum-exp in two parts (``_store_log_sum_exp``): the lean body needs the first only.
    if MASKED:
        lse = tl.load(stats_ptr + rows, mask=rows < seqlen_q, other=0.0)
        lse_rest = tl.load(stats_ptr + stride_stats + rows, mask=rows < seqlen_q, other=0.0)
        delta = tl.load(delta_ptr + rows, mask=rows < seqlen_q, other=0.0)
    else:
        lse = tl.load(stats_ptr + rows)
        delta = tl.load(delta_ptr + rows)
    qk_t = dot(k, q_t, tl.zeros([BLOCK_N, BLOCK_M], tl.float32), EXACT_FP32_DOTS, UPCAST_DOTS)
    if SPLIT_D:
        qk_t = dot(k_lo, q_lo_t, qk_t, EXACT_FP32_DOTS, UPCAST_DOTS)
    if MASKED:
        logits_t = _logits_base2(
            qk_t, rows[None, :], cols[:, None], mask_ptr, mask_strides, seqlen_q, seqlen_k, scale_log2e,
            MASK_KIND=MASK_KIND, IS_CAUSAL=IS_CAUSAL,
        )  # (BLOCK_N, BLOCK_M)
        probs_t = tl.exp2(logits_t - lse[None, :] - lse_rest[None, :])
    else:
        probs_t = tl.exp2(qk_t * scale_log2e - lse[None, :])
    # d(logits) = P * (dP - delta), dP = grad_out v^T times the dropout's keep / (1 - p).
    grad_probs_t = dot(v, tl.trans(grad_out), tl.zeros([BLOCK_N, BLOCK_M], tl.float32), EXACT_FP32_DOTS, UPCAST_DOTS)
    if SPLIT_D:
        grad_probs_t = dot(v_lo, tl.trans(grad_out_lo), grad_probs_t, EXACT_FP32_DOTS, UPCAST_DOTS)
    if HAS_DROPOUT:
        keep_t = _dropout_keep(head_seed, rows[None, :], cols[:, None], seqlen_k, dropout_p)
        kept_probs_t = tl.where(keep_t, probs_t * keep_scale, 0.0)
        grad_probs_t = tl.where(keep_t, grad_probs_t * keep_scale, 0.0)
    else:
        kept_probs_t = probs_t
    kept_probs_t = rounded_to(kept_probs_t, grad_out_ptr, UPCAST_DOTS)
    grad_v = dot(kept_probs_t, grad_out, grad_v, EXACT_FP32_DOTS, UPCAST_DOTS)
    grad_logits_t = probs_t * (grad_probs_t - delta[None, :])  # (BLOCK_N, BLOCK_M)
    if BIAS_NEEDS_GRAD:
        tl.store(
            grad_bias_ptr + rows[None, :] * seqlen_k + cols[:, None], grad_logits_t,
            mask=(rows[None, :] < seqlen_q) & (cols[:, None] < seqlen_k),
        )
    grad_logits_t = rounded_to(grad_logits_t, q_ptr, UPCAST_DOTS)
    grad_k = dot(grad_logits_t, tl.trans(q_t), grad_k, EXACT_FP32_DOTS, UPCAST_DOTS)
    if ADD_GRAD_Q:
        # This tile's share of dQ: dS^T k, (BLOCK_M, BLOCK_D), added to the rows' fp32 sums. The narrow
        # last block (16 rows) computes its transpose k^T dS, BLOCK_D rows: a wgmma needs 64 rows per
        # warpgroup, and 16 would make it an mma.sync.
        grad_logits = tl.trans(grad_logits_t)
        if BLOCK_M < 64:
            grad_q = tl.trans(
                dot(tl.trans(k), grad_logits_t, tl.zeros([BLOCK_D, BLOCK_M], tl.float32), EXACT_FP32_DOTS, UPCAST_DOTS)
            )
        else:
            grad_q = dot(grad_logits, k, tl.zeros([BLOCK_M, BLOCK_D], tl.float32), EXACT_FP32_DOTS, UPCAST_DOTS)
        _add_rows(grad_q_ptr, rows, grad_q_strides, seqlen_q, grad_q, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, CHECK_LENGTH=MASKED)
    if SPLIT_D:
        grad_v_lo = dot(kept_probs_t, grad_out_lo, grad_v_lo, EXACT_FP32_DOTS, UPCAST_DOTS)
        grad_k_lo = dot(grad_logits_t, tl.trans(q_lo_t), grad_k_lo, EXACT_FP32_DOTS, UPCAST_DOTS)
        if ADD_GRAD_Q:
            grad_q_lo = dot(grad_logits, k_lo, tl.zeros([BLOCK_M, BLOCK_D_LO], tl.float32), EXACT_FP32_DOTS, UPCAST_DOTS)
            _add_rows(
                grad_q_ptr, rows, grad_q_strides, seqlen_q, grad_q_lo, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D_LO,
                CHECK_LENGTH=MASKED, D_START=BLOCK_D,
            )
    return grad_k, grad_v, grad_k_lo, grad_v_lo


@triton.jit
def _backward_kv_tail(
    grad_k, grad_v, grad_k_lo, grad_v_lo, k, v, k_lo, v_lo, cols, start, end,
    q_ptr, grad_out_ptr, stats_ptr, delta_ptr, mask_ptr, q_strides, grad_out_strides, mask_strides, stride_stats,
    head_seed, keep_scale, seqlen_q, seqlen_k, scale_log2e, dropout_p,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    EXACT_FP32_DOTS: tl.constexpr, UPCAST_DOTS: tl.constexpr, ROW_ALIGN: tl.constexpr,
    SPLIT_D: tl.constexpr, BLOCK_D_LO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    grad_q_ptr=None, grad_bias_ptr=None, grad_q_strides=None,
    ADD_GRAD_Q: tl.constexpr = False, BIAS_NEEDS_GRAD: tl.constexpr = False,
):
    """The query rows [start, end), fewer than BLOCK_M, as one masked block 16 rows wide where they
    fit, else BLOCK_M: ``_forward_tail``'s construction (N = 577 ends in 1 row). ADD_GRAD_Q as in
    ``_backward_kv_block``, but never narrow with the head dim split: the second piece's dQ would be
    a 16 x 16 product, an mma.sync either way round."""
    tail = end - start
    if BLOCK_M > 16 and not (ADD_GRAD_Q and SPLIT_D):  # noqa: SIM102 (a compile-time choice around a run-time one)
        if tail <= 16:
            grad_k, grad_v, grad_k_lo, grad_v_lo = _backward_kv_block(
                grad_k, grad_v, grad_k_lo, grad_v_lo, k, v, k_lo, v_lo, cols, start,
                q_ptr, grad_out_ptr, stats_ptr, delta_ptr, mask_ptr, q_strides, grad_out_strides, mask_strides,
                stride_stats, head_seed, keep_scale, seqlen_q, seqlen_k, scale_log2e, dropout_p,
                HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, MASK_KIND=MASK_KIND,
                IS_CAUSAL=IS_CAUSAL, HAS_DROPOUT=HAS_DROPOUT, EXACT_FP32_DOTS=EXACT_FP32_DOTS,
                UPCAST_DOTS=UPCAST_DOTS, ROW_ALIGN=ROW_ALIGN, SPLIT_D=SPLIT_D, BLOCK_D_LO=BLOCK_D_LO,
                BLOCK_M=16, BLOCK_N=BLOCK_N, MASKED=True, grad_q_ptr=grad_q_ptr, grad_bias_ptr=grad_bias_ptr,
                grad_q_strides=grad_q_strides, ADD_GRAD_Q=ADD_GRAD_Q, BIAS_NEEDS_GRAD=BIAS_NEEDS_GRAD,
            )
    if (tail > 16) | (BLOCK_M == 16) | (ADD_GRAD_Q and SPLIT_D):
        grad_k, grad_v, grad_k_lo, grad_v_lo = _backward_kv_block(
            grad_k, grad_v, grad_k_lo, grad_v_lo, k, v, k_lo, v_lo, cols, start,
            q_ptr, grad_out_ptr, stats_ptr, delta_ptr, mask_ptr, q_strides, grad_out_strides, mask_strides,
            stride_stats, head_seed, keep_scale, seqlen_q, seqlen_k, scale_log2e, dropout_p,
            HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, MASK_KIND=MASK_KIND,
            IS_CAUSAL=IS_CAUSAL, HAS_DROPOUT=HAS_DROPOUT, EXACT_FP32_DOTS=EXACT_FP32_DOTS,
            UPCAST_DOTS=UPCAST_DOTS, ROW_ALIGN=ROW_ALIGN, SPLIT_D=SPLIT_D, BLOCK_D_LO=BLOCK_D_LO,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, MASKED=True, grad_q_ptr=grad_q_ptr, grad_bias_ptr=grad_bias_ptr,
            grad_q_strides=grad_q_strides, ADD_GRAD_Q=ADD_GRAD_Q, BIAS_NEEDS_GRAD=BIAS_NEEDS_GRAD,
        )
    return grad_k, grad_v, grad_k_lo, grad_v_lo


@triton.autotune(
    configs=autotune_configs(BACKWARD_KV_CONFIGS, _INTERPRETER_BACKWARD_KV_CONFIG),
    key=_AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _pruner(_BACKWARD_KV_TABLE, split_as_padded=True)},
)
@triton.jit
def _attention_backward_kv_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, seed_ptr, grad_out_ptr, stats_ptr, delta_ptr, grad_k_ptr, grad_v_ptr,
    cu_seqlens_q_ptr, cu_seqlens_k_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_maskb, stride_maskh, stride_maskm, stride_maskn,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_stats, stride_stats_b, stride_stats_h, n_heads, seqlen_q, seqlen_k, scale, scale_log2e, dropout_p,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    EXACT_FP32_DOTS: tl.constexpr, UPCAST_DOTS: tl.constexpr, ROW_ALIGN: tl.constexpr, VARLEN: tl.constexpr,
    SPLIT_D: tl.constexpr, BLOCK_D_LO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK and dV of one block of BLOCK_N keys, summed over every query row; tiles are (keys, queries).
    The delta and statistics share one layout (``stride_stats_b``, ``stride_stats_h``). The strides
    are grouped per tensor inside, not in the signature: see ``_attention_forward_kernel``."""
    q_strides = (stride_qb, stride_qh, stride_qm, stride_qd)
    k_strides = (stride_kb, stride_kh, stride_kn, stride_kd)
    v_strides = (stride_vb, stride_vh, stride_vn, stride_vd)
    mask_strides = (stride_maskb, stride_maskh, stride_maskm, stride_maskn)
    grad_out_strides = (stride_gb, stride_gh, stride_gm, stride_gd)
    grad_k_strides = (stride_dkb, stride_dkh, stride_dkn, stride_dkd)
    grad_v_strides = (stride_dvb, stride_dvh, stride_dvn, stride_dvd)
    n_col_blocks = tl.cdiv(seqlen_k, BLOCK_N)
    pid = tl.program_id(0)
    col_block = pid % n_col_blocks
    batch_head = pid // n_col_blocks
    batch = (batch_head // n_heads).to(tl.int64)
    head = (batch_head % n_heads).to(tl.int64)
    q_ptr += _slice_offset(batch, head, q_strides, ROW_ALIGN)
    k_ptr += _slice_offset(batch, head, k_strides, ROW_ALIGN)
    v_ptr += _slice_offset(batch, head, v_strides, ROW_ALIGN)
    mask_ptr += batch * stride_maskb + head * stride_maskh
    grad_out_ptr += _slice_offset(batch, head, grad_out_strides, ROW_ALIGN)
    grad_k_ptr += _slice_offset(batch, head, grad_k_strides, ROW_ALIGN)
    grad_v_ptr += _slice_offset(batch, head, grad_v_strides, ROW_ALIGN)
    stats_ptr += batch * stride_stats_b + head * stride_stats_h
    delta_ptr += batch * stride_stats_b + head * stride_stats_h
    if VARLEN:
        start_q, seqlen_q = _sequence(cu_seqlens_q_ptr, batch)
        start_k, seqlen_k = _sequence(cu_seqlens_k_ptr, batch)
        if col_block * BLOCK_N >= seqlen_k:  # a block past this sequence's end
            return
        q_ptr += _offsets(start_q, stride_qm, ROW_ALIGN)
        grad_out_ptr += _offsets(start_q, stride_gm, ROW_ALIGN)
        stats_ptr += start_q
        delta_ptr += start_q
        k_ptr += _offsets(start_k, stride_kn, ROW_ALIGN)
        v_ptr += _offsets(start_k, stride_vn, ROW_ALIGN)
        grad_k_ptr += _offsets(start_k, stride_dkn, ROW_ALIGN)
        grad_v_ptr += _offsets(start_k, stride_dvn, ROW_ALIGN)

    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    k = _load_rows(
        k_ptr, cols, k_strides, seqlen_k, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, ROW_ALIGN=ROW_ALIGN,
        CHECK_LENGTH=True, TRANSPOSED=False,
    )
    v = _load_rows(
        v_ptr, cols, v_strides, seqlen_k, HEAD_DIM=HEAD_DIM_V, BLOCK_D=BLOCK_DV, ROW_ALIGN=ROW_ALIGN,
        CHECK_LENGTH=True, TRANSPOSED=False,
    )
    head_seed = 0
    keep_scale = 1.0
    if HAS_DROPOUT:
        head_seed = _head_seed(seed_ptr, batch_head)
        keep_scale = 1.0 / (1.0 - dropout_p)

    grad_k = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    grad_v = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    k_lo, v_lo, grad_k_lo, grad_v_lo = k, v, grad_k, grad_v  # passed through unless SPLIT_D
    if SPLIT_D:
        k_lo = _load_rows(
            k_ptr, cols, k_strides, seqlen_k, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D_LO, ROW_ALIGN=ROW_ALIGN,
            CHECK_LENGTH=True, TRANSPOSED=False, D_START=BLOCK_D,
        )
        v_lo = _load_rows(
            v_ptr, cols, v_strides, seqlen_k, HEAD_DIM=HEAD_DIM_V, BLOCK_D=BLOCK_D_LO, ROW_ALIGN=ROW_ALIGN,
            CHECK_LENGTH=True, TRANSPOSED=False, D_START=BLOCK_DV,
        )
        grad_k_lo = tl.zeros([BLOCK_N, BLOCK_D_LO], tl.float32)
        grad_v_lo = tl.zeros([BLOCK_N, BLOCK_D_LO], tl.float32)
    # The lean body (tiles.py) where it applies.
    lean: tl.constexpr = MASK_KIND == MASK_NONE_KIND and not IS_CAUSAL and not EXACT_FP32_DOTS
    row_start = 0
    if IS_CAUSAL:
        row_start = (col_block * BLOCK_N // BLOCK_M) * BLOCK_M  # rows above the block's first key see none of it
    whole_end = seqlen_q // BLOCK_M * BLOCK_M
    for start_m in range(row_start, whole_end, BLOCK_M):
        grad_k, grad_v, grad_k_lo, grad_v_lo = _backward_kv_block(
            grad_k, grad_v, grad_k_lo, grad_v_lo, k, v, k_lo, v_lo, cols, start_m,
            q_ptr, grad_out_ptr, stats_ptr, delta_ptr, mask_ptr, q_strides, grad_out_strides, mask_strides,
            stride_stats, head_seed, keep_scale, seqlen_q, seqlen_k, scale_log2e, dropout_p,
            HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, MASK_KIND=MASK_KIND,
            IS_CAUSAL=IS_CAUSAL, HAS_DROPOUT=HAS_DROPOUT, EXACT_FP32_DOTS=EXACT_FP32_DOTS,
            UPCAST_DOTS=UPCAST_DOTS, ROW_ALIGN=ROW_ALIGN, SPLIT_D=SPLIT_D, BLOCK_D_LO=BLOCK_D_LO,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, MASKED=not lean,
        )
    if (whole_end < seqlen_q) & (row_start <= whole_end):  # the last, partial row block, narrowed
        grad_k, grad_v, grad_k_lo, grad_v_lo = _backward_kv_tail(
            grad_k, grad_v, grad_k_lo, grad_v_lo, k, v, k_lo, v_lo, cols, whole_end, seqlen_q,
            q_ptr, grad_out_ptr, stats_ptr, delta_ptr, mask_ptr, q_strides, grad_out_strides, mask_strides,
            stride_stats, head_seed, keep_scale, seqlen_q, seqlen_k, scale_log2e, dropout_p,
            HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, MASK_KIND=MASK_KIND,
            IS_CAUSAL=IS_CAUSAL, HAS_DROPOUT=HAS_DROPOUT, EXACT_FP32_DOTS=EXACT_FP32_DOTS,
            UPCAST_DOTS=UPCAST_DOTS, ROW_ALIGN=ROW_ALIGN, SPLIT_D=SPLIT_D, BLOCK_D_LO=BLOCK_D_LO,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        )

    _store_rows(
        grad_k_ptr, cols, grad_k_strides, seqlen_k, grad_k * scale, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D,
        ROW_ALIGN=ROW_ALIGN, UPCAST_DOTS=UPCAST_DOTS,
    )
    _store_rows(
        grad_v_ptr, cols, grad_v_strides, seqlen_k, grad_v, HEAD_DIM=HEAD_DIM_V, BLOCK_D=BLOCK_DV,
        ROW_ALIGN=ROW_ALIGN, UPCAST_DOTS=UPCAST_DOTS,
    )
    if SPLIT_D:
        _store_rows(
            grad_k_ptr, cols, grad_k_strides, seqlen_k, grad_k_lo * scale, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D_LO,
            ROW_ALIGN=ROW_ALIGN, UPCAST_DOTS=UPCAST_DOTS, D_START=BLOCK_D,
        )
        _store_rows(
            grad_v_ptr, cols, grad_v_strides, seqlen_k, grad_v_lo, HEAD_DIM=HEAD_DIM_V, BLOCK_D=BLOCK_D_LO,
            ROW_ALIGN=ROW_ALIGN, UPCAST_DOTS=UPCAST_DOTS, D_START=BLOCK_DV,
        )


@triton.jit
def _dropout_keep_mask_kernel(
    seed_ptr, keep_ptr, first_batch_head, seqlen_q, seqlen_k, dropout_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Write the keep decisions of the attention kernels into a contiguous (B, H, Nq, Nk) uint8 tensor;
    its (batch, head) slices are the kernels' first_batch_head onwards (a packed sequence's heads)."""
    n_row_blocks = tl.cdiv(seqlen_q, BLOCK_M)
    pid = tl.program_id(0)
    row_block = pid % n_row_blocks
    batch_head = pid // n_row_blocks
    head_seed = _head_seed(seed_ptr, first_batch_head + batch_head)
    keep_ptr += batch_head.to(tl.int64) * seqlen_q * seqlen_k
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    for start_n in range(0, seqlen_k, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(head_seed, rows[:, None], cols[None, :], seqlen_k, dropout_p)
        tl.store(
            keep_ptr + rows[:, None] * seqlen_k + cols[None, :], keep.to(tl.uint8),
            mask=(rows[:, None] < seqlen_q) & (cols[None, :] < seqlen_k),
        )
