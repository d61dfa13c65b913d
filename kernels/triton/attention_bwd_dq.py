"""The attention backward's dQ kernel: one program per block of query rows walks the keys,
recomputing the probabilities from the saved log-sum-exp, and writes dQ and the bias gradient
d(logits) of its rows. The pre-pass and the dK/dV kernel are in ``attention_bwd.py``. Launched by
``kernels/triton/launch.py``.
"""

import triton
import triton.language as tl

from kernels.triton.configs import (
    _AUTOTUNE_KEY,
    _BACKWARD_Q_TABLE,
    _INTERPRETER_BACKWARD_Q_CONFIG,
    BACKWARD_Q_CONFIGS,
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
    _sequence,
    _slice_offset,
    _store_rows,
)
from kernels.triton.utils import autotune_configs, dot, rounded_to


@triton.jit
def _backward_q_block(
    grad_q, grad_q_lo, q, q_lo, grad_out, grad_out_lo, lse, lse_rest, delta, rows, start_n,
    k_ptr, v_ptr, mask_ptr, grad_bias_ptr, k_strides, v_strides, mask_strides,
    head_seed, keep_scale, seqlen_q, seqlen_k, scale_log2e, dropout_p,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, BIAS_NEEDS_GRAD: tl.constexpr,
    EXACT_FP32_DOTS: tl.constexpr, UPCAST_DOTS: tl.constexpr, ROW_ALIGN: tl.constexpr,
    SPLIT_D: tl.constexpr, BLOCK_D_LO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
):
    """dQ of the program's query rows over the keys start_n + [0, BLOCK_N), and their bias gradient.
    SPLIT_D: the head dim's second piece in q_lo, grad_out_lo, grad_q_lo (else passed through)."""
    cols = start_n + tl.arange(0, BLOCK_N)
    k_t = _load_rows(
        k_ptr, cols, k_strides, seqlen_k, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, ROW_ALIGN=ROW_ALIGN,
        CHECK_LENGTH=MASKED, TRANSPOSED=True,
    )  # (BLOCK_D, BLOCK_N)
    v_t = _load_rows(
        v_ptr, cols, v_strides, seqlen_k, HEAD_DIM=HEAD_DIM_V, BLOCK_D=BLOCK_DV, ROW_ALIGN=ROW_ALIGN,
        CHECK_LENGTH=MASKED, TRANSPOSED=True,
    )  # (BLOCK_DV, BLOCK_N)
    qk = dot(q, k_t, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), EXACT_FP32_DOTS, UPCAST_DOTS)
    k_lo_t = k_t
    if SPLIT_D:
        k_lo_t = _load_rows(
            k_ptr, cols, k_strides, seqlen_k, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D_LO, ROW_ALIGN=ROW_ALIGN,
            CHECK_LENGTH=MASKED, TRANSPOSED=True, D_START=BLOCK_D,
        )  # (BLOCK_D_LO, BLOCK_N)
        v_lo_t = _load_rows(
            v_ptr, cols, v_strides, seqlen_k, HEAD_DIM=HEAD_DIM_V, BLOCK_D=BLOCK_D_LO, ROW_ALIGN=ROW_ALIGN,
            CHECK_LENGTH=MASKED, TRANSPOSED=True, D_START=BLOCK_DV,
        )  # (BLOCK_D_LO, BLOCK_N)
        qk = dot(q_lo, k_lo_t, qk, EXACT_FP32_DOTS, UPCAST_DOTS)
    if MASKED:
        logits = _logits_base2(
            qk, rows[:, None], cols[None, :], mask_ptr, mask_strides, seqlen_q, seqlen_k, scale_log2e,
            MASK_KIND=MASK_KIND, IS_CAUSAL=IS_CAUSAL,
        )  # (BLOCK_M, BLOCK_N)
        probs = tl.exp2(logits - lse[:, None] - lse_rest[:, None])
    else:
        probs = tl.exp2(qk * scale_log2e - lse[:, None])  # lse_rest unread: see _store_log_sum_exp
    grad_probs = dot(grad_out, v_t, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), EXACT_FP32_DOTS, UPCAST_DOTS)
    if SPLIT_D:
        grad_probs = dot(grad_out_lo, v_lo_t, grad_probs, EXACT_FP32_DOTS, UPCAST_DOTS)
    if HAS_DROPOUT:
        keep = _dropout_keep(head_seed, rows[:, None], cols[None, :], seqlen_k, dropout_p)
        grad_probs = tl.where(keep, grad_probs * keep_scale, 0.0)
    grad_logits = probs * (grad_probs - delta[:, None])  # (BLOCK_M, BLOCK_N)
    if BIAS_NEEDS_GRAD:
        tl.store(
            grad_bias_ptr + rows[:, None] * seqlen_k + cols[None, :], grad_logits,
            mask=(rows[:, None] < seqlen_q) & (cols[None, :] < seqlen_k),
        )
    grad_logits = rounded_to(grad_logits, k_ptr, UPCAST_DOTS)
    grad_q = dot(grad_logits, tl.trans(k_t), grad_q, EXACT_FP32_DOTS, UPCAST_DOTS)
    if SPLIT_D:
        grad_q_lo = dot(grad_logits, tl.trans(k_lo_t), grad_q_lo, EXACT_FP32_DOTS, UPCAST_DOTS)
    return grad_q, grad_q_lo


@triton.jit
def _backward_q_tail(
    grad_q, grad_q_lo, q, q_lo, grad_out, grad_out_lo, lse, lse_rest, delta, rows, start, end,
    k_ptr, v_ptr, mask_ptr, grad_bias_ptr, k_strides, v_strides, mask_strides,
    head_seed, keep_scale, seqlen_q, seqlen_k, scale_log2e, dropout_p,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, BIAS_NEEDS_GRAD: tl.constexpr,
    EXACT_FP32_DOTS: tl.constexpr, UPCAST_DOTS: tl.constexpr, ROW_ALIGN: tl.constexpr,
    SPLIT_D: tl.constexpr, BLOCK_D_LO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The keys [start, end), fewer than BLOCK_N, as one masked block 16 keys wide where they fit,
    else BLOCK_N: ``_forward_tail``'s construction."""
    tail = end - start
    if BLOCK_N > 16:  # noqa: SIM102 (a compile-time choice around a run-time one)
        if tail <= 16:
            grad_q, grad_q_lo = _backward_q_block(
                grad_q, grad_q_lo, q, q_lo, grad_out, grad_out_lo, lse, lse_rest, delta, rows, start,
                k_ptr, v_ptr, mask_ptr, grad_bias_ptr, k_strides, v_strides, mask_strides,
                head_seed, keep_scale, seqlen_q, seqlen_k, scale_log2e, dropout_p,
                HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, MASK_KIND=MASK_KIND,
                IS_CAUSAL=IS_CAUSAL, HAS_DROPOUT=HAS_DROPOUT, BIAS_NEEDS_GRAD=BIAS_NEEDS_GRAD,
                EXACT_FP32_DOTS=EXACT_FP32_DOTS, UPCAST_DOTS=UPCAST_DOTS, ROW_ALIGN=ROW_ALIGN, SPLIT_D=SPLIT_D,
                BLOCK_D_LO=BLOCK_D_LO, BLOCK_M=BLOCK_M, BLOCK_N=16, MASKED=True,
            )
    if (tail > 16) | (BLOCK_N == 16):
        grad_q, grad_q_lo = _backward_q_block(
            grad_q, grad_q_lo, q, q_lo, grad_out, grad_out_lo, lse, lse_rest, delta, rows, start,
            k_ptr, v_ptr, mask_ptr, grad_bias_ptr, k_strides, v_strides, mask_strides,
            head_seed, keep_scale, seqlen_q, seqlen_k, scale_log2e, dropout_p,
            HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, MASK_KIND=MASK_KIND,
            IS_CAUSAL=IS_CAUSAL, HAS_DROPOUT=HAS_DROPOUT, BIAS_NEEDS_GRAD=BIAS_NEEDS_GRAD,
            EXACT_FP32_DOTS=EXACT_FP32_DOTS, UPCAST_DOTS=UPCAST_DOTS, ROW_ALIGN=ROW_ALIGN, SPLIT_D=SPLIT_D,
            BLOCK_D_LO=BLOCK_D_LO, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, MASKED=True,
        )
    return grad_q, grad_q_lo


@triton.autotune(
    configs=autotune_configs(BACKWARD_Q_CONFIGS, _INTERPRETER_BACKWARD_Q_CONFIG),
    key=_AUTOTUNE_KEY + ["BIAS_NEEDS_GRAD"],
    prune_configs_by={"early_config_prune": _pruner(_BACKWARD_Q_TABLE, sm100_spills_at_split=SM100_SPILLS_AT_SPLIT["dq"])},
)
@triton.jit
def _attention_backward_q_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, seed_ptr, grad_out_ptr, stats_ptr, delta_ptr, grad_q_ptr, grad_bias_ptr,
    cu_seqlens_q_ptr, cu_seqlens_k_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_maskb, stride_maskh, stride_maskm, stride_maskn,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_stats, stride_stats_b, stride_stats_h, n_heads, seqlen_q, seqlen_k, scale, scale_log2e, dropout_p,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, BIAS_NEEDS_GRAD: tl.constexpr,
    EXACT_FP32_DOTS: tl.constexpr, UPCAST_DOTS: tl.constexpr, ROW_ALIGN: tl.constexpr, VARLEN: tl.constexpr,
    SPLIT_D: tl.constexpr, BLOCK_D_LO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NARROW_TAIL: tl.constexpr = True,
):
    """dQ of one block of BLOCK_M query rows, and the bias gradient d(logits) of those rows. The
    strides are grouped per tensor inside, not in the signature: see ``_attention_forward_kernel``.
    NARROW_TAIL (a config's): the last, partial block of keys narrowed (``_backward_q_tail``), or whole."""
    q_strides = (stride_qb, stride_qh, stride_qm, stride_qd)
    k_strides = (stride_kb, stride_kh, stride_kn, stride_kd)
    v_strides = (stride_vb, stride_vh, stride_vn, stride_vd)
    mask_strides = (stride_maskb, stride_maskh, stride_maskm, stride_maskn)
    grad_out_strides = (stride_gb, stride_gh, stride_gm, stride_gd)
    grad_q_strides = (stride_dqb, stride_dqh, stride_dqm, stride_dqd)
    n_row_blocks = tl.cdiv(seqlen_q, BLOCK_M)
    pid = tl.program_id(0)
    row_block = n_row_blocks - 1 - pid % n_row_blocks  # heaviest causal blocks first, as in the forward
    batch_head = pid // n_row_blocks
    batch = (batch_head // n_heads).to(tl.int64)
    head = (batch_head % n_heads).to(tl.int64)
    q_ptr += _slice_offset(batch, head, q_strides, ROW_ALIGN)
    k_ptr += _slice_offset(batch, head, k_strides, ROW_ALIGN)
    v_ptr += _slice_offset(batch, head, v_strides, ROW_ALIGN)
    mask_ptr += batch * stride_maskb + head * stride_maskh
    grad_out_ptr += _slice_offset(batch, head, grad_out_strides, ROW_ALIGN)
    grad_q_ptr += _slice_offset(batch, head, grad_q_strides, ROW_ALIGN)
    grad_bias_ptr += batch_head.to(tl.int64) * seqlen_q * seqlen_k  # a contiguous (B, H, Nq, Nk) tensor
    stats_ptr += batch * stride_stats_b + head * stride_stats_h
    delta_ptr += batch * stride_stats_b + head * stride_stats_h
    if VARLEN:  # no bias: grad_bias_ptr is not used
        start_q, seqlen_q = _sequence(cu_seqlens_q_ptr, batch)
        start_k, seqlen_k = _sequence(cu_seqlens_k_ptr, batch)
        if row_block * BLOCK_M >= seqlen_q:  # a block past this sequence's end
            return
        q_ptr += _offsets(start_q, stride_qm, ROW_ALIGN)
        grad_out_ptr += _offsets(start_q, stride_gm, ROW_ALIGN)
        grad_q_ptr += _offsets(start_q, stride_dqm, ROW_ALIGN)
        stats_ptr += start_q
        delta_ptr += start_q
        k_ptr += _offsets(start_k, stride_kn, ROW_ALIGN)
        v_ptr += _offsets(start_k, stride_vn, ROW_ALIGN)

    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    q = _load_rows(
        q_ptr, rows, q_strides, seqlen_q, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, ROW_ALIGN=ROW_ALIGN,
        CHECK_LENGTH=True, TRANSPOSED=False,
    )
    grad_out = _load_rows(
        grad_out_ptr, rows, grad_out_strides, seqlen_q, HEAD_DIM=HEAD_DIM_V, BLOCK_D=BLOCK_DV, ROW_ALIGN=ROW_ALIGN,
        CHECK_LENGTH=True, TRANSPOSED=False,
    )  # (BLOCK_M, BLOCK_DV)
    # The rows' log2-sum-exp in two parts (``_store_log_sum_exp``); the lean body reads the first only,
    # and the second is loaded where a masked body needs it, not held through the lean loop.
    lse = tl.load(stats_ptr + rows, mask=rows < seqlen_q, other=0.0)
    delta = tl.load(delta_ptr + rows, mask=rows < seqlen_q, other=0.0)
    head_seed = 0
    keep_scale = 1.0
    if HAS_DROPOUT:
        head_seed = _head_seed(seed_ptr, batch_head)
        keep_scale = 1.0 / (1.0 - dropout_p)

    grad_q = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    q_lo, grad_out_lo, grad_q_lo = q, grad_out, grad_q  # passed through unless SPLIT_D
    if SPLIT_D:
        q_lo = _load_rows(
            q_ptr, rows, q_strides, seqlen_q, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D_LO, ROW_ALIGN=ROW_ALIGN,
            CHECK_LENGTH=True, TRANSPOSED=False, D_START=BLOCK_D,
        )
        grad_out_lo = _load_rows(
            grad_out_ptr, rows, grad_out_strides, seqlen_q, HEAD_DIM=HEAD_DIM_V, BLOCK_D=BLOCK_D_LO,
            ROW_ALIGN=ROW_ALIGN, CHECK_LENGTH=True, TRANSPOSED=False, D_START=BLOCK_DV,
        )
        grad_q_lo = tl.zeros([BLOCK_M, BLOCK_D_LO], tl.float32)
    # The lean body (tiles.py) where it applies.
    lean: tl.constexpr = MASK_KIND == MASK_NONE_KIND and not IS_CAUSAL and not EXACT_FP32_DOTS
    key_end = seqlen_k
    if IS_CAUSAL:
        key_end = tl.minimum(seqlen_k, (row_block + 1) * BLOCK_M)
    whole_end = key_end // BLOCK_N * BLOCK_N
    lse_rest = lse  # unread by the lean body
    if not lean:
        lse_rest = tl.load(stats_ptr + stride_stats + rows, mask=rows < seqlen_q, other=0.0)
    for start_n in range(0, whole_end, BLOCK_N):
        grad_q, grad_q_lo = _backward_q_block(
            grad_q, grad_q_lo, q, q_lo, grad_out, grad_out_lo, lse, lse_rest, delta, rows, start_n,
            k_ptr, v_ptr, mask_ptr, grad_bias_ptr, k_strides, v_strides, mask_strides,
            head_seed, keep_scale, seqlen_q, seqlen_k, scale_log2e, dropout_p,
            HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, MASK_KIND=MASK_KIND,
            IS_CAUSAL=IS_CAUSAL, HAS_DROPOUT=HAS_DROPOUT, BIAS_NEEDS_GRAD=BIAS_NEEDS_GRAD,
            EXACT_FP32_DOTS=EXACT_FP32_DOTS, UPCAST_DOTS=UPCAST_DOTS, ROW_ALIGN=ROW_ALIGN, SPLIT_D=SPLIT_D,
            BLOCK_D_LO=BLOCK_D_LO, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, MASKED=not lean,
        )
    if whole_end < key_end:  # the last, partial block
        lse_rest = tl.load(stats_ptr + stride_stats + rows, mask=rows < seqlen_q, other=0.0)
        if NARROW_TAIL:
            grad_q, grad_q_lo = _backward_q_tail(
                grad_q, grad_q_lo, q, q_lo, grad_out, grad_out_lo, lse, lse_rest, delta, rows, whole_end, key_end,
                k_ptr, v_ptr, mask_ptr, grad_bias_ptr, k_strides, v_strides, mask_strides,
                head_seed, keep_scale, seqlen_q, seqlen_k, scale_log2e, dropout_p,
                HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, MASK_KIND=MASK_KIND,
                IS_CAUSAL=IS_CAUSAL, HAS_DROPOUT=HAS_DROPOUT, BIAS_NEEDS_GRAD=BIAS_NEEDS_GRAD,
                EXACT_FP32_DOTS=EXACT_FP32_DOTS, UPCAST_DOTS=UPCAST_DOTS, ROW_ALIGN=ROW_ALIGN, SPLIT_D=SPLIT_D,
                BLOCK_D_LO=BLOCK_D_LO, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            )
        else:
            grad_q, grad_q_lo = _backward_q_block(
                grad_q, grad_q_lo, q, q_lo, grad_out, grad_out_lo, lse, lse_rest, delta, rows, whole_end,
                k_ptr, v_ptr, mask_ptr, grad_bias_ptr, k_strides, v_strides, mask_strides,
                head_seed, keep_scale, seqlen_q, seqlen_k, scale_log2e, dropout_p,
                HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, MASK_KIND=MASK_KIND,
                IS_CAUSAL=IS_CAUSAL, HAS_DROPOUT=HAS_DROPOUT, BIAS_NEEDS_GRAD=BIAS_NEEDS_GRAD,
                EXACT_FP32_DOTS=EXACT_FP32_DOTS, UPCAST_DOTS=UPCAST_DOTS, ROW_ALIGN=ROW_ALIGN, SPLIT_D=SPLIT_D,
                BLOCK_D_LO=BLOCK_D_LO, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, MASKED=True,
            )

    _store_rows(
        grad_q_ptr, rows, grad_q_strides, seqlen_q, grad_q * scale, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D,
        ROW_ALIGN=ROW_ALIGN, UPCAST_DOTS=UPCAST_DOTS,
    )
    if SPLIT_D:
        _store_rows(
            grad_q_ptr, rows, grad_q_strides, seqlen_q, grad_q_lo * scale, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D_LO,
            ROW_ALIGN=ROW_ALIGN, UPCAST_DOTS=UPCAST_DOTS, D_START=BLOCK_D,
        )
