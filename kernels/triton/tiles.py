"""Tile helpers shared by the attention kernels: logits with every mask kind, dropout, the
per-(batch, head) start-up, row loads and stores. A new mask kind lands in ``_logits_base2``.
"""

import triton
import triton.language as tl

from kernels.triton.configs import LOG2E, MASK_BIAS, MASK_BOOL, MASK_NONE
from kernels.triton.utils import rounded_to

# The same, as the kernels read them (a jit function reads module globals only as constexprs).
MASK_NONE_KIND: tl.constexpr = tl.constexpr(MASK_NONE)
MASK_BOOL_KIND: tl.constexpr = tl.constexpr(MASK_BOOL)
MASK_BIAS_KIND: tl.constexpr = tl.constexpr(MASK_BIAS)
LOG2E_CONST: tl.constexpr = tl.constexpr(LOG2E)
BIAS_FLOOR: tl.constexpr = tl.constexpr(-2.3e38)  # finite biases below it are raised to it: see _logits_base2

# ---------------------------------------------------------------------------------------------
# Triton kernels and their jit helpers.
#
# Each kernel loops over blocks of keys (forward, dQ) or of queries (dK/dV). Without a mask tensor,
# causal mask or exact fp32 dots, every block but the last, partial one is whole and every row may
# attend every key in it: those run the lean body (MASKED=False), with no bounds checks and the
# scale folded into the exponent, one FFMA per score (``exp2(qk * scale_log2e - m)``). The last
# block, and every block otherwise, run the masked body, which sends each logit that may not be
# attended to -inf. (Exact fp32 dots, FMAs rather than tensor cores, spill registers by the
# kilobyte beside a second copy of the body.) Rows past Nq (forward, dQ) and keys past Nk (dK/dV)
# of the program's own block are loaded as zeros; the garbage they compute stays in their own rows
# of the result, never stored, so the lean body needs no mask for them.


@triton.jit
def _logits_base2(
    qk, rows, cols, mask_ptr, mask_strides, seqlen_q, seqlen_k, scale_log2e,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
):
    """The logits of one tile in base-2 units, -inf where a key may not be attended.

    ``rows`` (query indices) and ``cols`` (key indices) broadcast to the tile's shape, so the same
    code serves the (queries, keys) tiles of the forward and dQ and the (keys, queries) tiles of dK/dV.
    ``mask_strides``: the mask's (batch, head, query, key) strides, its pointer at the program's slice.
    """
    stride_mask_m, stride_mask_n = mask_strides[2], mask_strides[3]
    logits = qk * scale_log2e
    allowed = (rows < seqlen_q) & (cols < seqlen_k)
    if IS_CAUSAL:
        allowed = allowed & (cols <= rows)
    if MASK_KIND == MASK_BOOL_KIND:  # True = may attend
        may_attend = tl.load(mask_ptr + rows * stride_mask_m + cols * stride_mask_n, mask=allowed, other=0)
        allowed = allowed & (may_attend != 0)
    if MASK_KIND == MASK_BIAS_KIND:  # added to the scaled logits
        bias = tl.load(mask_ptr + rows * stride_mask_m + cols * stride_mask_n, mask=allowed, other=0.0).to(tl.float32)
        # Times log2(e) a bias of finfo(float32).min (Hugging Face's "masked") would overflow to -inf
        # and zero a row the reference averages uniformly: finite biases stay finite. Written as a
        # comparison, not tl.maximum (which drops a NaN), so a NaN stays NaN and the row reads NaN,
        # as in SDPA; -inf stays -inf.
        bias = tl.where((bias < BIAS_FLOOR) & (bias != float("-inf")), BIAS_FLOOR, bias)
        logits = logits + bias * LOG2E_CONST  # the bias is in natural units
    return tl.where(allowed, logits, float("-inf"))


@triton.jit
def _online_softmax_step(qk, logits, row_max, row_sum, scale_log2e, MASKED: tl.constexpr):
    """One block of keys' step of the online softmax every forward kernel runs: (probs, rescale,
    row_sum, row_max) updated, in base 2.

    MASKED: ``logits`` are the block's base-2 logits, -inf where a key may not be attended
    (``_logits_base2``). Otherwise ``logits`` is unread and ``qk`` holds the raw products of the
    lean body, scaled here (the scale is >= 0 there: the largest logit is the largest product,
    scaled), one FFMA per score. A row with no allowed key so far has a maximum of -inf: it
    subtracts 0 instead (no NaN). ``rescale`` is what the accumulator must be multiplied by.
    """
    if MASKED:
        block_max = tl.max(logits, 1)
    else:
        block_max = tl.max(qk, 1) * scale_log2e
    new_max = tl.maximum(row_max, block_max)
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    rescale = tl.exp2(row_max - shift)
    if MASKED:
        probs = tl.exp2(logits - shift[:, None])
    else:
        probs = tl.exp2(qk * scale_log2e - shift[:, None])
    row_sum = row_sum * rescale + tl.sum(probs, 1)
    return probs, rescale, row_sum, new_max


@triton.jit
def _store_log_sum_exp(stats_ptr, stride_stats, rows, in_rows, row_max, row_sum):
    """Save each row's log2(sum exp2(logits)) for the backward as two floats whose exact sum it is:
    ``lse`` = row_max + log2(row_sum) rounded, at ``stats_ptr``, and ``lse_rest``, what the rounding
    lost (Knuth's TwoSum), ``stride_stats`` further on. The backward's lean body reads ``lse`` only,
    one FFMA per score (``exp2(qk * scale_log2e - lse)``); its masked body subtracts both, because a
    row of finfo(float32).min biases (Hugging Face's "masked") has row_max near -3.3e38, where the
    sum's log2 is far below half an ulp: lost in ``lse``, kept whole in ``lse_rest``. A row with no
    key to attend (row_max -inf, row_sum 1 after the forward's fix-up) saves (0, 0)."""
    shift = tl.where(row_max == float("-inf"), 0.0, row_max)
    log2_row_sum = tl.log2(row_sum)
    lse = shift + log2_row_sum
    log2_row_sum_part = lse - shift
    shift_part = lse - log2_row_sum_part
    lse_rest = (shift - shift_part) + (log2_row_sum - log2_row_sum_part)
    tl.store(stats_ptr + rows, lse, mask=in_rows)
    tl.store(stats_ptr + stride_stats + rows, lse_rest, mask=in_rows)


@triton.jit
def _dropout_keep(head_seed, rows, cols, seqlen_k, dropout_p):
    """Philox keep decisions (True = keep) for the tile at ``rows`` x ``cols`` of one (batch, head)."""
    return tl.rand(head_seed, rows * seqlen_k + cols) >= dropout_p


@triton.jit
def _head_seed(seed_ptr, batch_head):
    # The (batch, head) index becomes Philox's upper key word: counters stay row * Nk + col, which
    # fit int32 per head where a count over B * H * Nq * Nk would overflow.
    return tl.load(seed_ptr) + (batch_head.to(tl.int64) << 32)


@triton.jit
def _offsets(index, stride, ROW_ALIGN: tl.constexpr):
    """``index * stride``, with Triton told it is a multiple of ROW_ALIGN elements.

    A launch marks an int argument divisible by 16 only when it is: a per-head stride of 72 (D = 72
    in a fused qkv) gets no mark, and then every q/k/v access is a scalar 16-bit load. ROW_ALIGN,
    from the host (``_row_align``), is 16 bytes in elements when every stride but the head dim's is
    a multiple of it, else 1 (no hint). The hint sits on the product made here: Triton ignores
    ``tl.multiple_of`` on a function's argument. Whether the pointers themselves are 16-byte
    aligned is Triton's own launch check.
    """
    offsets = index * stride
    if ROW_ALIGN > 1:
        offsets = tl.multiple_of(offsets, ROW_ALIGN)
    return offsets


@triton.jit
def _slice_offset(batch, head, strides, ROW_ALIGN: tl.constexpr):
    """The int64 offset of one (batch, head) slice of a tensor with (batch, head, row, head dim)
    ``strides``, a multiple of ROW_ALIGN elements."""
    return _offsets(batch, strides[0], ROW_ALIGN) + _offsets(head, strides[1], ROW_ALIGN)


@triton.jit
def _sequence(cu_seqlens_ptr, index):
    """(first row (int64), length) of packed sequence ``index``, read from its cu_seqlens."""
    start = tl.load(cu_seqlens_ptr + index)
    return start.to(tl.int64), tl.load(cu_seqlens_ptr + index + 1) - start


@triton.jit
def _load_rows(
    ptr, index, strides, length, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROW_ALIGN: tl.constexpr,
    CHECK_LENGTH: tl.constexpr, TRANSPOSED: tl.constexpr, D_START: tl.constexpr = 0,
):
    """Rows ``index`` of a (length, HEAD_DIM) slice, head-dim columns D_START + [0, BLOCK_D): a
    (len(index), BLOCK_D) tile, or its transpose (BLOCK_D, len(index)) when TRANSPOSED, zero past
    HEAD_DIM and, when CHECK_LENGTH, past ``length``. Without CHECK_LENGTH every index must be
    below ``length``: nothing is checked. ``strides``: the tensor's (batch, head, row, head dim)."""
    stride, stride_d = strides[2], strides[3]
    offs_d = D_START + tl.arange(0, BLOCK_D)
    if TRANSPOSED:
        ptrs = ptr + _offsets(index, stride, ROW_ALIGN)[None, :] + offs_d[:, None] * stride_d
        in_length, in_head = index[None, :] < length, offs_d[:, None] < HEAD_DIM
    else:
        ptrs = ptr + _offsets(index, stride, ROW_ALIGN)[:, None] + offs_d[None, :] * stride_d
        in_length, in_head = index[:, None] < length, offs_d[None, :] < HEAD_DIM
    if CHECK_LENGTH:
        tile = tl.load(ptrs, mask=in_length & in_head, other=0.0)
    elif D_START + BLOCK_D > HEAD_DIM:
        tile = tl.load(ptrs, mask=in_head, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _store_rows(
    ptr, index, strides, length, tile, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    ROW_ALIGN: tl.constexpr, UPCAST_DOTS: tl.constexpr, D_START: tl.constexpr = 0,
):
    """Store a (len(index), BLOCK_D) fp32 ``tile`` into rows ``index`` (below ``length``), head-dim
    columns D_START + [0, BLOCK_D) (below HEAD_DIM), of a (length, HEAD_DIM) slice, in its dtype.
    ``strides``: the tensor's (batch, head, row, head dim)."""
    stride, stride_d = strides[2], strides[3]
    offs_d = D_START + tl.arange(0, BLOCK_D)
    tl.store(
        ptr + _offsets(index, stride, ROW_ALIGN)[:, None] + offs_d[None, :] * stride_d,
        rounded_to(tile, ptr, UPCAST_DOTS),
        mask=(index[:, None] < length) & (offs_d[None, :] < HEAD_DIM),
    )


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
