"""The one-kernel attention backward (FlashAttention-2's): one program per block of keys walks the
query blocks, recomputes the probabilities once per tile from the saved base-2 statistics, keeps
dK and dV in registers and adds each tile's dQ into a zero-initialised fp32 buffer with atomic adds;
the launcher turns that buffer into dQ (times the scale, in q's dtype) afterwards. Five GEMMs per
tile (q k^T, dO v^T, P^T dO, dS^T q, dS k) where the pair of ``attention_bwd.py`` does seven, at
the price of fp32 dQ traffic and of determinism: the order of the atomic adds varies from run to
run. So ``launch.py`` picks it only for long sequences, never under
``torch.use_deterministic_algorithms(True)``, and only for tensors whose head dim is contiguous (its
strides are three per tensor: the head dim's is 1). The delta pre-pass is the pair's, and so is the
block: ``_backward_kv_block`` (and its narrow tail) with ADD_GRAD_Q, which adds the dQ product and the
bias gradient to the dK/dV kernel's. Tiles are (keys, queries).
"""

import triton
import triton.language as tl

from kernels.triton.attention_bwd import _backward_kv_block, _backward_kv_tail
from kernels.triton.configs import _AUTOTUNE_KEY, F16, FMA, TF32, _configs, _pruner
from kernels.triton.tiles import (
    MASK_NONE_KIND,
    _head_seed,
    _load_rows,
    _offsets,
    _sequence,
    _slice_offset,
    _store_rows,
)
from kernels.triton.utils import autotune_configs

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
    # block and for every block under a mask, causal or exact fp32 dots.
    lean: tl.constexpr = MASK_KIND == MASK_NONE_KIND and not IS_CAUSAL and not EXACT_FP32_DOTS
    row_start = 0
    if IS_CAUSAL:
        row_start = (col_block * BLOCK_N // BLOCK_M) * BLOCK_M  # rows above the block's first key see none of it
    whole_end = seqlen_q // BLOCK_M * BLOCK_M
    for start_m in range(row_start, whole_end, BLOCK_M):
        grad_k, grad_v, grad_k_lo, grad_v_lo = _backward_kv_block(
            grad_k, grad_v, grad_k_lo, grad_v_lo, k, v, k_lo, v_lo, cols, start_m,
            q_ptr, grad_out_ptr, stats_ptr, delta_ptr, mask_ptr,
            q_strides, grad_out_strides, mask_strides, stride_stats,
            head_seed, keep_scale, seqlen_q, seqlen_k, scale_log2e, dropout_p,
            HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, MASK_KIND=MASK_KIND,
            IS_CAUSAL=IS_CAUSAL, HAS_DROPOUT=HAS_DROPOUT,
            EXACT_FP32_DOTS=EXACT_FP32_DOTS, UPCAST_DOTS=UPCAST_DOTS, ROW_ALIGN=ROW_ALIGN, SPLIT_D=SPLIT_D,
            BLOCK_D_LO=BLOCK_D_LO, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, MASKED=not lean,
            grad_q_ptr=grad_q_ptr, grad_bias_ptr=grad_bias_ptr, grad_q_strides=grad_q_strides, ADD_GRAD_Q=True,
            BIAS_NEEDS_GRAD=BIAS_NEEDS_GRAD,
        )
    if (whole_end < seqlen_q) & (row_start <= whole_end):  # the last, partial row block, narrowed
        grad_k, grad_v, grad_k_lo, grad_v_lo = _backward_kv_tail(
            grad_k, grad_v, grad_k_lo, grad_v_lo, k, v, k_lo, v_lo, cols, whole_end, seqlen_q,
            q_ptr, grad_out_ptr, stats_ptr, delta_ptr, mask_ptr,
            q_strides, grad_out_strides, mask_strides, stride_stats,
            head_seed, keep_scale, seqlen_q, seqlen_k, scale_log2e, dropout_p,
            HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, MASK_KIND=MASK_KIND,
            IS_CAUSAL=IS_CAUSAL, HAS_DROPOUT=HAS_DROPOUT,
            EXACT_FP32_DOTS=EXACT_FP32_DOTS, UPCAST_DOTS=UPCAST_DOTS, ROW_ALIGN=ROW_ALIGN, SPLIT_D=SPLIT_D,
            BLOCK_D_LO=BLOCK_D_LO, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            grad_q_ptr=grad_q_ptr, grad_bias_ptr=grad_bias_ptr, grad_q_strides=grad_q_strides, ADD_GRAD_Q=True,
            BIAS_NEEDS_GRAD=BIAS_NEEDS_GRAD,
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
