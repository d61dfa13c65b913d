"""The one-kernel attention backward (FlashAttention-2's): one program per block of keys walks the
query blocks, recomputes the probabilities once per tile from the saved base-2 statistics, keeps
dK and dV in registers and adds each tile's dQ into a zero-initialised fp32 buffer with atomic adds;
the launcher turns that buffer into dQ (times the scale, in q's dtype) afterwards. Five GEMMs per
tile (q k^T, dO v^T, P^T dO, dS^T q, dS k) where the pair of ``attention_bwd.py`` does seven, at
the price of fp32 dQ traffic and of determinism: the order of the atomic adds varies from run to
run. So ``launch.py`` picks it only for long sequences, never under
``torch.use_deterministic_algorithms(True)``, and only for tensors whose head dim is contiguous (its
strides are three per tensor: the head dim's is 1). The delta pre-pass is the pair's. Tiles are
(keys, queries), as in the pair's dK/dV kernel, whose structure this follows.
"""

import triton
import triton.language as tl

from kernels.triton.configs import _AUTOTUNE_KEY, F16, FMA, TF32, _configs, _pruner
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

# Autotune configs, as the tables of configs.py: (BLOCK_M, BLOCK_N, num_warps, num_stages, {dot kind:
# the BLOCK_D it is tried at}), BLOCK_D the padded head dim, or 128 when it is split (64 + 16 at
# D = 72 or 80). Read off sm_90 machine code (ptxas 12.9; held by tests/machine/test_fused_backward_sass.py):
# BLOCK_M (the dQ product's rows) and BLOCK_N (the others') are 64 per warpgroup, so every product is
# a wgmma; 2 stages up to BLOCK_D 64 (13.1-13.8 instructions per score at D = 64, no spills); split,
# 64 x 128 at 1 stage only (16.9 at D = 80, 17.1 at D = 72): 2 stages spill 16-56 bytes, and 64 x 64
# spills 144 bytes at D = 72 (the second piece's dQ adds masked past 72). The fp32 row is off
# ``launch.py``'s path (fp32 takes the pair): it is there so that a forced fp32 launch compiles.
_ALL = (16, 32, 64, 128, 256)
_BACKWARD_FUSED_TABLE = [
    (32, 32, 4, 1, {FMA: _ALL, TF32: _ALL}),
    (64, 64, 4, 2, {F16: (16, 32, 64)}),
    (64, 128, 8, 2, {F16: (16, 32, 64)}),
    (64, 128, 8, 1, {F16: (128, 256)}),
]
BACKWARD_FUSED_CONFIGS = _configs(_BACKWARD_FUSED_TABLE)
_INTERPRETER_BACKWARD_FUSED_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=1)


@triton.jit
def _add_rows(
    ptr, index, strides, length, tile, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_LENGTH: tl.constexpr,
    D_START: tl.constexpr = 0,
):
    """Atomically add the (len(index), BLOCK_D) fp32 ``tile`` to rows ``index`` (below ``length`` when
    CHECK_LENGTH), head-dim columns D_START + [0, BLOCK_D) (below HEAD_DIM), of an fp32 slice with
    (batch, head, row, head dim) ``strides``. Relaxed: the adds need no order, only atomicity."""
    offs_d = D_START + tl.arange(0, BLOCK_D)
    ptrs = ptr + index[:, None] * strides[2] + offs_d[None, :] * strides[3]
    in_length, in_head = index[:, None] < length, offs_d[None, :] < HEAD_DIM
    if CHECK_LENGTH:
        tl.atomic_add(ptrs, tile, mask=in_length & in_head, sem="relaxed")
    elif D_START + BLOCK_D > HEAD_DIM:
        tl.atomic_add(ptrs, tile, mask=in_head, sem="relaxed")
    else:
        tl.atomic_add(ptrs, tile, sem="relaxed")


@triton.jit
def _backward_fused_block(
    grad_k, grad_v, grad_k_lo, grad_v_lo, k, v, k_lo, v_lo, cols, start_m,
    q_ptr, grad_out_ptr, stats_ptr, delta_ptr, mask_ptr, grad_q_ptr, grad_bias_ptr,
    q_strides, grad_out_strides, mask_strides, grad_q_strides, stride_stats,
    head_seed, keep_scale, seqlen_q, seqlen_k, scale_log2e, dropout_p,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, BIAS_NEEDS_GRAD: tl.constexpr,
    EXACT_FP32_DOTS: tl.constexpr, UPCAST_DOTS: tl.constexpr, ROW_ALIGN: tl.constexpr,
    SPLIT_D: tl.constexpr, BLOCK_D_LO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
):
    """``_backward_kv_block`` (dK, dV of the program's keys over the query rows start_m + [0, BLOCK_M),
    updated and returned), plus those rows' dQ over the program's keys, added to ``grad_q_ptr``, and
    their bias gradient, stored. SPLIT_D: the second head-dim piece in the *_lo tiles."""
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
    if MASKED:
        row_max = tl.load(stats_ptr + rows, mask=rows < seqlen_q, other=0.0)
        log2_row_sum = tl.load(stats_ptr + stride_stats + rows, mask=rows < seqlen_q, other=0.0)
        delta = tl.load(delta_ptr + rows, mask=rows < seqlen_q, other=0.0)
    else:
        row_max = tl.load(stats_ptr + rows)
        log2_row_sum = tl.load(stats_ptr + stride_stats + rows)
        delta = tl.load(delta_ptr + rows)
    qk_t = dot(k, q_t, tl.zeros([BLOCK_N, BLOCK_M], tl.float32), EXACT_FP32_DOTS, UPCAST_DOTS)
    if SPLIT_D:
        qk_t = dot(k_lo, q_lo_t, qk_t, EXACT_FP32_DOTS, UPCAST_DOTS)
    if MASKED:
        logits_t = _logits_base2(
            qk_t, rows[None, :], cols[:, None], mask_ptr, mask_strides, seqlen_q, seqlen_k, scale_log2e,
            MASK_KIND=MASK_KIND, IS_CAUSAL=IS_CAUSAL,
        )  # (BLOCK_N, BLOCK_M)
        probs_t = tl.exp2(logits_t - row_max[None, :] - log2_row_sum[None, :])
    else:
        probs_t = tl.exp2(qk_t * scale_log2e - row_max[None, :] - log2_row_sum[None, :])
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
    # This tile's share of dQ: dS^T k, (BLOCK_M, BLOCK_D), added to the rows' fp32 sums. The narrow
    # last block (16 rows, ``_backward_fused_tail``) computes its transpose k^T dS, BLOCK_D rows: a
    # wgmma needs 64 rows per warpgroup, and 16 would make it an mma.sync.
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
        grad_q_lo = dot(grad_logits, k_lo, tl.zeros([BLOCK_M, BLOCK_D_LO], tl.float32), EXACT_FP32_DOTS, UPCAST_DOTS)
        _add_rows(
            grad_q_ptr, rows, grad_q_strides, seqlen_q, grad_q_lo, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D_LO,
            CHECK_LENGTH=MASKED, D_START=BLOCK_D,
        )
    return grad_k, grad_v, grad_k_lo, grad_v_lo


@triton.jit
def _backward_fused_tail(
    grad_k, grad_v, grad_k_lo, grad_v_lo, k, v, k_lo, v_lo, cols, start, end,
    q_ptr, grad_out_ptr, stats_ptr, delta_ptr, mask_ptr, grad_q_ptr, grad_bias_ptr,
    q_strides, grad_out_strides, mask_strides, grad_q_strides, stride_stats,
    head_seed, keep_scale, seqlen_q, seqlen_k, scale_log2e, dropout_p,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, BIAS_NEEDS_GRAD: tl.constexpr,
    EXACT_FP32_DOTS: tl.constexpr, UPCAST_DOTS: tl.constexpr, ROW_ALIGN: tl.constexpr,
    SPLIT_D: tl.constexpr, BLOCK_D_LO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The query rows [start, end), fewer than BLOCK_M, as one masked block 16 rows wide where they
    fit, else BLOCK_M (``_forward_tail``'s construction; N = 577 ends in 1 row). Not with the head dim
    split: the second piece's dQ would be a 16 x 16 product, an mma.sync either way round."""
    tail = end - start
    if BLOCK_M > 16 and not SPLIT_D:  # noqa: SIM102 (a compile-time choice around a run-time one)
        if tail <= 16:
            grad_k, grad_v, grad_k_lo, grad_v_lo = _backward_fused_block(
                grad_k, grad_v, grad_k_lo, grad_v_lo, k, v, k_lo, v_lo, cols, start,
                q_ptr, grad_out_ptr, stats_ptr, delta_ptr, mask_ptr, grad_q_ptr, grad_bias_ptr,
                q_strides, grad_out_strides, mask_strides, grad_q_strides, stride_stats,
                head_seed, keep_scale, seqlen_q, seqlen_k, scale_log2e, dropout_p,
                HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, MASK_KIND=MASK_KIND,
                IS_CAUSAL=IS_CAUSAL, HAS_DROPOUT=HAS_DROPOUT, BIAS_NEEDS_GRAD=BIAS_NEEDS_GRAD,
                EXACT_FP32_DOTS=EXACT_FP32_DOTS, UPCAST_DOTS=UPCAST_DOTS, ROW_ALIGN=ROW_ALIGN, SPLIT_D=SPLIT_D,
                BLOCK_D_LO=BLOCK_D_LO, BLOCK_M=16, BLOCK_N=BLOCK_N, MASKED=True,
            )
    if (tail > 16) | (BLOCK_M == 16) | SPLIT_D:
        grad_k, grad_v, grad_k_lo, grad_v_lo = _backward_fused_block(
            grad_k, grad_v, grad_k_lo, grad_v_lo, k, v, k_lo, v_lo, cols, start,
            q_ptr, grad_out_ptr, stats_ptr, delta_ptr, mask_ptr, grad_q_ptr, grad_bias_ptr,
            q_strides, grad_out_strides, mask_strides, grad_q_strides, stride_stats,
            head_seed, keep_scale, seqlen_q, seqlen_k, scale_log2e, dropout_p,
            HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, MASK_KIND=MASK_KIND,
            IS_CAUSAL=IS_CAUSAL, HAS_DROPOUT=HAS_DROPOUT, BIAS_NEEDS_GRAD=BIAS_NEEDS_GRAD,
            EXACT_FP32_DOTS=EXACT_FP32_DOTS, UPCAST_DOTS=UPCAST_DOTS, ROW_ALIGN=ROW_ALIGN, SPLIT_D=SPLIT_D,
            BLOCK_D_LO=BLOCK_D_LO, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, MASKED=True,
        )
    return grad_k, grad_v, grad_k_lo, grad_v_lo


@triton.autotune(
    configs=autotune_configs(BACKWARD_FUSED_CONFIGS, _INTERPRETER_BACKWARD_FUSED_CONFIG),
    key=_AUTOTUNE_KEY + ["BIAS_NEEDS_GRAD"],
    prune_configs_by={"early_config_prune": _pruner(_BACKWARD_FUSED_TABLE, split_as_padded=True)},
    reset_to_zero=["grad_q_ptr"],  # the autotuner's timing runs add into it too: zeroed after them
)
@triton.jit
def _attention_backward_fused_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, seed_ptr, grad_out_ptr, stats_ptr, delta_ptr,
    grad_q_ptr, grad_k_ptr, grad_v_ptr, grad_bias_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_maskb, stride_maskh, stride_maskm, stride_maskn,
    stride_gb, stride_gh, stride_gm,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_stats, stride_stats_b, stride_stats_h, n_heads, seqlen_q, seqlen_k, scale, scale_log2e, dropout_p,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, BIAS_NEEDS_GRAD: tl.constexpr,
    EXACT_FP32_DOTS: tl.constexpr, UPCAST_DOTS: tl.constexpr, ROW_ALIGN: tl.constexpr, VARLEN: tl.constexpr,
    SPLIT_D: tl.constexpr, BLOCK_D_LO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK and dV of one block of BLOCK_N keys, summed over every query row, and those keys' share of
    dQ, added into ``grad_q_ptr``: an fp32 buffer of zeros, (B, H, Nq, HEAD_DIM) contiguous, or
    (total_q, H, HEAD_DIM) packed, unscaled. The bias gradient d(logits) as the dQ kernel writes it.

    Every tensor's head dim is contiguous (the launcher's condition), so each takes three strides
    (batch, head, row): the parameters stay within the pair's. The rest as ``_attention_backward_kv_kernel``."""
    q_strides = (stride_qb, stride_qh, stride_qm, 1)
    k_strides = (stride_kb, stride_kh, stride_kn, 1)
    v_strides = (stride_vb, stride_vh, stride_vn, 1)
    mask_strides = (stride_maskb, stride_maskh, stride_maskm, stride_maskn)
    grad_out_strides = (stride_gb, stride_gh, stride_gm, 1)
    grad_k_strides = (stride_dkb, stride_dkh, stride_dkn, 1)
    grad_v_strides = (stride_dvb, stride_dvh, stride_dvn, 1)
    if VARLEN:
        grad_q_strides = (0, HEAD_DIM, n_heads * HEAD_DIM, 1)
    else:
        grad_q_strides = (n_heads * seqlen_q * HEAD_DIM, seqlen_q * HEAD_DIM, HEAD_DIM, 1)
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
    grad_q_ptr += _slice_offset(batch, head, grad_q_strides, 1)
    grad_k_ptr += _slice_offset(batch, head, grad_k_strides, ROW_ALIGN)
    grad_v_ptr += _slice_offset(batch, head, grad_v_strides, ROW_ALIGN)
    grad_bias_ptr += batch_head.to(tl.int64) * seqlen_q * seqlen_k  # a contiguous (B, H, Nq, Nk) tensor
    stats_ptr += batch * stride_stats_b + head * stride_stats_h
    delta_ptr += batch * stride_stats_b + head * stride_stats_h
    if VARLEN:  # no bias: grad_bias_ptr is not used
        start_q, seqlen_q = _sequence(cu_seqlens_q_ptr, batch)
        start_k, seqlen_k = _sequence(cu_seqlens_k_ptr, batch)
        if col_block * BLOCK_N >= seqlen_k:  # a block past this sequence's end
            return
        q_ptr += _offsets(start_q, stride_qm, ROW_ALIGN)
        grad_out_ptr += _offsets(start_q, stride_gm, ROW_ALIGN)
        grad_q_ptr += _offsets(start_q, grad_q_strides[2], 1)
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
    # The lean body (see tiles.py) for the whole row blocks, the masked one for the last, partial
    # block and for every block under a mask, causal or exact fp32 dots; the calls differ in where
    # they start and in MASKED only.
    if MASK_KIND == MASK_NONE_KIND and not IS_CAUSAL and not EXACT_FP32_DOTS:
        row_start = 0
        whole_end = seqlen_q // BLOCK_M * BLOCK_M
        for start_m in range(0, whole_end, BLOCK_M):
            grad_k, grad_v, grad_k_lo, grad_v_lo = _backward_fused_block(
                grad_k, grad_v, grad_k_lo, grad_v_lo, k, v, k_lo, v_lo, cols, start_m,
                q_ptr, grad_out_ptr, stats_ptr, delta_ptr, mask_ptr, grad_q_ptr, grad_bias_ptr,
                q_strides, grad_out_strides, mask_strides, grad_q_strides, stride_stats,
                head_seed, keep_scale, seqlen_q, seqlen_k, scale_log2e, dropout_p,
                HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, MASK_KIND=MASK_KIND,
                IS_CAUSAL=IS_CAUSAL, HAS_DROPOUT=HAS_DROPOUT, BIAS_NEEDS_GRAD=BIAS_NEEDS_GRAD,
                EXACT_FP32_DOTS=EXACT_FP32_DOTS, UPCAST_DOTS=UPCAST_DOTS, ROW_ALIGN=ROW_ALIGN, SPLIT_D=SPLIT_D,
                BLOCK_D_LO=BLOCK_D_LO, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, MASKED=False,
            )
    else:
        row_start = 0
        if IS_CAUSAL:
            row_start = (col_block * BLOCK_N // BLOCK_M) * BLOCK_M  # rows above the block's first key see none of it
        whole_end = seqlen_q // BLOCK_M * BLOCK_M
        for start_m in range(row_start, whole_end, BLOCK_M):
            grad_k, grad_v, grad_k_lo, grad_v_lo = _backward_fused_block(
                grad_k, grad_v, grad_k_lo, grad_v_lo, k, v, k_lo, v_lo, cols, start_m,
                q_ptr, grad_out_ptr, stats_ptr, delta_ptr, mask_ptr, grad_q_ptr, grad_bias_ptr,
                q_strides, grad_out_strides, mask_strides, grad_q_strides, stride_stats,
                head_seed, keep_scale, seqlen_q, seqlen_k, scale_log2e, dropout_p,
                HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, MASK_KIND=MASK_KIND,
                IS_CAUSAL=IS_CAUSAL, HAS_DROPOUT=HAS_DROPOUT, BIAS_NEEDS_GRAD=BIAS_NEEDS_GRAD,
                EXACT_FP32_DOTS=EXACT_FP32_DOTS, UPCAST_DOTS=UPCAST_DOTS, ROW_ALIGN=ROW_ALIGN, SPLIT_D=SPLIT_D,
                BLOCK_D_LO=BLOCK_D_LO, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, MASKED=True,
            )
    if (whole_end < seqlen_q) & (row_start <= whole_end):  # the last, partial row block, narrowed
        grad_k, grad_v, grad_k_lo, grad_v_lo = _backward_fused_tail(
            grad_k, grad_v, grad_k_lo, grad_v_lo, k, v, k_lo, v_lo, cols, whole_end, seqlen_q,
            q_ptr, grad_out_ptr, stats_ptr, delta_ptr, mask_ptr, grad_q_ptr, grad_bias_ptr,
            q_strides, grad_out_strides, mask_strides, grad_q_strides, stride_stats,
            head_seed, keep_scale, seqlen_q, seqlen_k, scale_log2e, dropout_p,
            HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, MASK_KIND=MASK_KIND,
            IS_CAUSAL=IS_CAUSAL, HAS_DROPOUT=HAS_DROPOUT, BIAS_NEEDS_GRAD=BIAS_NEEDS_GRAD,
            EXACT_FP32_DOTS=EXACT_FP32_DOTS, UPCAST_DOTS=UPCAST_DOTS, ROW_ALIGN=ROW_ALIGN, SPLIT_D=SPLIT_D,
            BLOCK_D_LO=BLOCK_D_LO, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
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
