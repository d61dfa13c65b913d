"""Fused multi-head attention in Triton: FlashAttention-2, forward and backward.

    out = attention_triton(q, k, v, mask=None, scale=None, dropout_p=0.0, is_causal=False)
    # q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv) -> out (B, H, Nq, Dv)

What it computes is ``kernels.reference.attention_reference``: ``softmax(q k^T * scale + mask) v``
with dropout on the weights, a query row whose every key is masked giving zeros. How:

Forward (one program per block of BLOCK_M query rows of one (batch, head)): walk the keys in
blocks of BLOCK_N keeping a running row maximum ``m``, row sum ``l`` and an fp32 accumulator,
rescaled when the maximum grows (the online softmax). Exponentials are base 2 (``exp2``, the
scale folded into ``scale * log2(e)``), and the row log-sum-exp (base 2, ``m + log2(l)``) is saved
for the backward as its two terms, so that a huge ``m`` (a bias of finfo.min) cannot round
``log2(l)`` away. Backward: a pre-pass ``delta = rowsum(out * grad_out)``, then one kernel over
key blocks for dK and dV and one over query blocks for dQ (and the bias gradient), both
recomputing the probabilities from the saved log-sum-exp: no atomics, no (Nq, Nk) matrix kept.

Inputs and layout
- q, k, v may have any strides (for example views of a fused qkv projection (B, N, 3, H, D)
  permuted to (B, H, N, D)): the kernels take the strides, nothing is made contiguous. The output
  (B, H, Nq, Dv) is allocated with the strides of (B, Nq, H, Dv) memory (not a view: in-place ops
  on it work), the layout the output projection reads as (B, Nq, H * Dv) without a copy.
- Any lengths Nq, Nk >= 1 (cross-attention too): the last blocks are masked in the loads (keys past
  the end get a logit of -inf), nothing is padded in memory. The grid is one axis of
  ``row blocks * B * H`` programs, so batch * heads is not bound by CUDA's 65,535 limit of axes 1-2.
  An empty output (B, H or Nq of 0) launches nothing: the reference returns it.
- Head dims D and Dv: any integer from 16 to 256 (so 80, 96, 160 too), padded in registers to the
  next power of two (BLOCK_D) with masked loads. Others raise ValueError.
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

Block sizes: ``triton.autotune`` picks per (Nq, Nk, D, Dv, mask kind, causal, dropout, dtype,
exact fp32) among the configs of the tables below, pruned per launch to those that compile to
Hopper's wgmma without spilling registers (read off the machine code with ``python -m bench.sass``;
``tests/test_sass.py`` holds it at the ViT shapes). Which ones win is to be measured on a GPU
(``python -m bench.gpu_check``). In Triton's interpreter one config runs.

``torch.compile``: the forward and backward are ``torch.library.triton_op`` custom ops
(``vitriton::attention_forward``, ``vitriton::attention_backward``) with ``register_autograd``, so
``torch.compile(fullgraph=True)`` traces them; the debug keep-mask is launched outside them.
"""

import dataclasses
import math

import torch
import triton
import triton.language as tl

from kernels import reference
from kernels.triton_utils import INTERPRETING, autotune_configs, dot, rounded_to

LOG2E = math.log2(math.e)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
MASK_NONE, MASK_BOOL, MASK_BIAS = 0, 1, 2
# The same, as the kernels read them (a jit function reads module globals only as constexprs).
MASK_BOOL_KIND: tl.constexpr = tl.constexpr(MASK_BOOL)
MASK_BIAS_KIND: tl.constexpr = tl.constexpr(MASK_BIAS)
LOG2E_CONST: tl.constexpr = tl.constexpr(LOG2E)
BIAS_FLOOR: tl.constexpr = tl.constexpr(-2.3e38)  # finite biases below it are raised to it: see _logits_base2

# Autotune configs, pruned per launch by the kind of dot and the head-dim block BLOCK_D (the larger
# of D's and Dv's, a power of two): a config is tried only where its table row lists it. The rows
# are read off Hopper machine code (``python -m bench.sass``; sm_90, ptxas 12.9): for each kind and
# BLOCK_D, the configs that compile to wgmma without spilling registers and fit shared memory; where
# none does (BLOCK_D 256 in dK/dV, exact fp32), the least bad. Tiles under 64 rows per warpgroup fall
# to mma.sync (half of wgmma's rate): only exact fp32 (no tensor cores) and fp32 at 256 keep them.
# A mask, causal or dropout (a heavier loop body) keeps only tiles of at most 16 scores per thread,
# where the others spill. Left out: (128, 128) at BLOCK_D 128, over the shared memory with a mask
# (and (64, 64, 4 warps, 3 stages) there in TF32); 4 stages of (64, 64), the loop of 3 stages.
F16, TF32, FMA = "f16", "tf32", "fma"  # fp16/bf16 tensor cores; fp32 on them as TF32; exact fp32 FMAs
_UP_TO_64, _UP_TO_128, _ALL = (16, 32, 64), (16, 32, 64, 128), (16, 32, 64, 128, 256)
# (BLOCK_M, BLOCK_N, num_warps, num_stages, {dot kind: the BLOCK_D it is tried at})
_FORWARD_TABLE = [
    (32, 32, 4, 2, {TF32: (256,), FMA: _ALL}),
    (64, 32, 4, 3, {F16: _ALL, TF32: _UP_TO_128}),
    (64, 64, 4, 2, {F16: _UP_TO_128, TF32: _UP_TO_128}),
    (64, 64, 4, 3, {F16: _UP_TO_128, TF32: _UP_TO_64}),
    (128, 64, 4, 3, {F16: _UP_TO_64}),
    (128, 64, 8, 3, {F16: _UP_TO_128, TF32: _UP_TO_64}),
    (128, 128, 8, 3, {F16: _UP_TO_64}),
]
# dK/dV: BLOCK_N keys stay in registers while BLOCK_M query rows stream past.
_BACKWARD_KV_TABLE = [
    (32, 32, 4, 1, {FMA: _ALL}),
    (16, 64, 4, 2, {TF32: (128, 256)}),
    (32, 64, 4, 1, {F16: (*_UP_TO_64, 256), TF32: _UP_TO_64}),
    (32, 64, 4, 2, {F16: _UP_TO_64, TF32: _UP_TO_64}),
    (64, 64, 4, 2, {F16: _UP_TO_64}),
    (32, 128, 8, 1, {F16: _ALL, TF32: _UP_TO_64}),
    (64, 128, 8, 2, {F16: _UP_TO_64}),
]
# dQ: BLOCK_M query rows stay in registers while BLOCK_N keys stream past.
_BACKWARD_Q_TABLE = [
    (32, 32, 4, 1, {TF32: (256,), FMA: _ALL}),
    (64, 32, 4, 2, {F16: _UP_TO_128, TF32: _UP_TO_64}),
    (64, 64, 4, 2, {F16: _UP_TO_128, TF32: _UP_TO_64}),
    (128, 64, 8, 2, {F16: _UP_TO_128, TF32: _UP_TO_64}),
    (128, 32, 8, 2, {F16: _ALL, TF32: _UP_TO_128}),
]


def _configs(table) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
        for block_m, block_n, warps, stages, _ in table
    ]


def _pruner(table, split_as_padded=False):
    """An ``early_config_prune`` keeping the configs ``table`` lists for the launch's dot kind and
    BLOCK_D, and under a mask, causal or dropout those of at most 16 scores per thread (if any).
    With the head dim split (SPLIT_D), BLOCK_D is its first piece; ``split_as_padded`` looks the
    configs up at the padded width instead (dK/dV, whose four accumulators and tiles per piece
    spill at 64 x 64 with a second piece at D = 72).

    A pure function of autotune-key arguments (q's dtype, HEAD_DIM, HEAD_DIM_V, MASK_KIND,
    IS_CAUSAL, HAS_DROPOUT, EXACT_FP32_DOTS), cheap, and plain Python: Triton's autotuner calls it,
    and so does torch.compile's tracing of the custom ops. A config the table does not name (a
    test's own) is kept; if nothing is left, every config is.
    """
    tried_at = {(block_m, block_n, warps, stages): kinds for block_m, block_n, warps, stages, kinds in table}

    def prune(configs, named_args, **kwargs):
        arguments = {**named_args, **kwargs}
        if arguments["EXACT_FP32_DOTS"]:
            kind = FMA
        else:
            kind = TF32 if arguments["q_ptr"].dtype == torch.float32 else F16
        block_d = max(arguments["BLOCK_D"], arguments["BLOCK_DV"])
        if split_as_padded and arguments.get("SPLIT_D"):
            block_d = triton.next_power_of_2(block_d + arguments["BLOCK_D_LO"])

        def tried(config):
            kinds = tried_at.get((config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages))
            return kinds is None or block_d in kinds.get(kind, ())

        kept = [config for config in configs if tried(config)] or configs
        if arguments["MASK_KIND"] != MASK_NONE or arguments["IS_CAUSAL"] or arguments["HAS_DROPOUT"]:
            light = [c for c in kept if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 16 * 32 * c.num_warps]
            kept = light or kept
        return kept

    return prune


FORWARD_CONFIGS = _configs(_FORWARD_TABLE)
BACKWARD_KV_CONFIGS = _configs(_BACKWARD_KV_TABLE)
BACKWARD_Q_CONFIGS = _configs(_BACKWARD_Q_TABLE)
# The interpreter's one config: unequal blocks, so the tests walk several blocks of each kind.
_INTERPRETER_FORWARD_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=1)
_INTERPRETER_BACKWARD_KV_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=1)
_INTERPRETER_BACKWARD_Q_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=1)
_AUTOTUNE_KEY = [
    "seqlen_q", "seqlen_k", "HEAD_DIM", "HEAD_DIM_V", "MASK_KIND", "IS_CAUSAL", "HAS_DROPOUT", "EXACT_FP32_DOTS",
    "VARLEN",
]
_PREPASS_BLOCK_M = 32
_KEEP_MASK_BLOCK_M, _KEEP_MASK_BLOCK_N = 32, 64


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
    qk, rows, cols, mask_ptr, stride_mask_m, stride_mask_n, seqlen_q, seqlen_k, scale_log2e,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
):
    """The logits of one tile in base-2 units, -inf where a key may not be attended.

    ``rows`` (query indices) and ``cols`` (key indices) broadcast to the tile's shape, so the same
    code serves the (queries, keys) tiles of the forward and dQ and the (keys, queries) tiles of dK/dV.
    """
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
def _slice_offset(batch, head, stride_b, stride_h, ROW_ALIGN: tl.constexpr):
    """The int64 offset of one (batch, head) slice of a tensor, a multiple of ROW_ALIGN elements."""
    return _offsets(batch, stride_b, ROW_ALIGN) + _offsets(head, stride_h, ROW_ALIGN)


@triton.jit
def _sequence(cu_seqlens_ptr, index):
    """(first row (int64), length) of packed sequence ``index``, read from its cu_seqlens."""
    start = tl.load(cu_seqlens_ptr + index)
    return start.to(tl.int64), tl.load(cu_seqlens_ptr + index + 1) - start


@triton.jit
def _load_rows(
    ptr, index, stride, length, stride_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROW_ALIGN: tl.constexpr,
    CHECK_LENGTH: tl.constexpr, TRANSPOSED: tl.constexpr, D_START: tl.constexpr = 0,
):
    """Rows ``index`` of a (length, HEAD_DIM) slice, head-dim columns D_START + [0, BLOCK_D): a
    (len(index), BLOCK_D) tile, or its transpose (BLOCK_D, len(index)) when TRANSPOSED, zero past
    HEAD_DIM and, when CHECK_LENGTH, past ``length``. Without CHECK_LENGTH every index must be
    below ``length``: nothing is checked."""
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
    ptr, index, stride, length, stride_d, tile, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    ROW_ALIGN: tl.constexpr, UPCAST_DOTS: tl.constexpr, D_START: tl.constexpr = 0,
):
    """Store a (len(index), BLOCK_D) fp32 ``tile`` into rows ``index`` (below ``length``), head-dim
    columns D_START + [0, BLOCK_D) (below HEAD_DIM), of a (length, HEAD_DIM) slice, in its dtype."""
    offs_d = D_START + tl.arange(0, BLOCK_D)
    tl.store(
        ptr + _offsets(index, stride, ROW_ALIGN)[:, None] + offs_d[None, :] * stride_d,
        rounded_to(tile, ptr, UPCAST_DOTS),
        mask=(index[:, None] < length) & (offs_d[None, :] < HEAD_DIM),
    )


@triton.jit
def _forward_block(
    acc, acc_lo, row_sum, row_max, q, q_lo, rows, start_n, k_ptr, v_ptr, mask_ptr, head_seed,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_maskm, stride_maskn,
    seqlen_q, seqlen_k, scale_log2e, dropout_p,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    EXACT_FP32_DOTS: tl.constexpr, UPCAST_DOTS: tl.constexpr, ROW_ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, SPLIT_D: tl.constexpr,
    BLOCK_D_LO: tl.constexpr,
):
    """The online softmax over the keys start_n + [0, BLOCK_N): (acc, acc_lo, row_sum, row_max) updated.

    SPLIT_D (see ``_head_dim_split``): the head dim in two pieces, BLOCK_D then BLOCK_D_LO columns;
    q and q_lo, acc and acc_lo hold them, and each dot is two. Otherwise q_lo and acc_lo pass through.
    """
    cols = start_n + tl.arange(0, BLOCK_N)
    k_t = _load_rows(
        k_ptr, cols, stride_kn, seqlen_k, stride_kd, HEAD_DIM, BLOCK_D, ROW_ALIGN, MASKED, True
    )  # (BLOCK_D, BLOCK_N)
    qk = dot(q, k_t, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), EXACT_FP32_DOTS, UPCAST_DOTS)
    if SPLIT_D:
        k_lo_t = _load_rows(
            k_ptr, cols, stride_kn, seqlen_k, stride_kd, HEAD_DIM, BLOCK_D_LO, ROW_ALIGN, MASKED, True, BLOCK_D
        )  # (BLOCK_D_LO, BLOCK_N)
        qk = dot(q_lo, k_lo_t, qk, EXACT_FP32_DOTS, UPCAST_DOTS)
    if MASKED:
        logits = _logits_base2(
            qk, rows[:, None], cols[None, :], mask_ptr, stride_maskm, stride_maskn,
            seqlen_q, seqlen_k, scale_log2e, MASK_KIND, IS_CAUSAL,
        )  # (BLOCK_M, BLOCK_N)
        block_max = tl.max(logits, 1)
    else:  # the scale is >= 0 here: the largest logit is the largest product, scaled
        block_max = tl.max(qk, 1) * scale_log2e
    new_max = tl.maximum(row_max, block_max)
    # A row with no allowed key so far has a maximum of -inf: subtract 0 instead (no NaN).
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    rescale = tl.exp2(row_max - shift)
    if MASKED:
        probs = tl.exp2(logits - shift[:, None])
    else:
        probs = tl.exp2(qk * scale_log2e - shift[:, None])  # one FFMA per score
    row_sum = row_sum * rescale + tl.sum(probs, 1)
    if HAS_DROPOUT:
        probs = tl.where(_dropout_keep(head_seed, rows[:, None], cols[None, :], seqlen_k, dropout_p), probs, 0.0)
    v = _load_rows(
        v_ptr, cols, stride_vn, seqlen_k, stride_vd, HEAD_DIM_V, BLOCK_DV, ROW_ALIGN, MASKED, False
    )  # (BLOCK_N, BLOCK_DV)
    probs = rounded_to(probs, v_ptr, UPCAST_DOTS)
    acc = dot(probs, v, acc * rescale[:, None], EXACT_FP32_DOTS, UPCAST_DOTS)
    if SPLIT_D:
        v_lo = _load_rows(
            v_ptr, cols, stride_vn, seqlen_k, stride_vd, HEAD_DIM_V, BLOCK_D_LO, ROW_ALIGN, MASKED, False, BLOCK_DV
        )  # (BLOCK_N, BLOCK_D_LO)
        acc_lo = dot(probs, v_lo, acc_lo * rescale[:, None], EXACT_FP32_DOTS, UPCAST_DOTS)
    return acc, acc_lo, row_sum, new_max


@triton.autotune(
    configs=autotune_configs(FORWARD_CONFIGS, _INTERPRETER_FORWARD_CONFIG),
    key=_AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _pruner(_FORWARD_TABLE)},
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
    SPLIT_D: BLOCK_D and BLOCK_DV are the head dim's first piece, BLOCK_D_LO its second."""
    n_row_blocks = tl.cdiv(seqlen_q, BLOCK_M)
    pid = tl.program_id(0)
    # Last row blocks first: under a causal mask they have the most keys, so they start earliest.
    row_block = n_row_blocks - 1 - pid % n_row_blocks
    batch_head = pid // n_row_blocks
    batch = (batch_head // n_heads).to(tl.int64)
    head = (batch_head % n_heads).to(tl.int64)
    q_ptr += _slice_offset(batch, head, stride_qb, stride_qh, ROW_ALIGN)
    k_ptr += _slice_offset(batch, head, stride_kb, stride_kh, ROW_ALIGN)
    v_ptr += _slice_offset(batch, head, stride_vb, stride_vh, ROW_ALIGN)
    mask_ptr += batch * stride_maskb + head * stride_maskh
    out_ptr += _slice_offset(batch, head, stride_ob, stride_oh, ROW_ALIGN)
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
    q = _load_rows(q_ptr, rows, stride_qm, seqlen_q, stride_qd, HEAD_DIM, BLOCK_D, ROW_ALIGN, True, False)
    head_seed = 0
    if HAS_DROPOUT:
        head_seed = _head_seed(seed_ptr, batch_head)

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    q_lo, acc_lo = q, acc  # passed through unless SPLIT_D
    if SPLIT_D:
        q_lo = _load_rows(q_ptr, rows, stride_qm, seqlen_q, stride_qd, HEAD_DIM, BLOCK_D_LO, ROW_ALIGN, True, False, BLOCK_D)
        acc_lo = tl.zeros([BLOCK_M, BLOCK_D_LO], tl.float32)
    # The lean body (see above); a negative scale (rare) takes the masked one: its largest logit is
    # the smallest product, where the lean body scales the largest.
    if MASK_KIND == 0 and not IS_CAUSAL and not EXACT_FP32_DOTS and not NEGATIVE_SCALE:
        lean_end = seqlen_k // BLOCK_N * BLOCK_N  # the whole blocks
        for start_n in range(0, lean_end, BLOCK_N):
            acc, acc_lo, row_sum, row_max = _forward_block(
                acc, acc_lo, row_sum, row_max, q, q_lo, rows, start_n, k_ptr, v_ptr, mask_ptr, head_seed,
                stride_kn, stride_kd, stride_vn, stride_vd, stride_maskm, stride_maskn,
                seqlen_q, seqlen_k, scale_log2e, dropout_p,
                HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, MASK_KIND, IS_CAUSAL, HAS_DROPOUT,
                EXACT_FP32_DOTS, UPCAST_DOTS, ROW_ALIGN, BLOCK_M, BLOCK_N, False, SPLIT_D, BLOCK_D_LO,
            )
        if lean_end < seqlen_k:  # the last, partial block
            acc, acc_lo, row_sum, row_max = _forward_block(
                acc, acc_lo, row_sum, row_max, q, q_lo, rows, lean_end, k_ptr, v_ptr, mask_ptr, head_seed,
                stride_kn, stride_kd, stride_vn, stride_vd, stride_maskm, stride_maskn,
                seqlen_q, seqlen_k, scale_log2e, dropout_p,
                HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, MASK_KIND, IS_CAUSAL, HAS_DROPOUT,
                EXACT_FP32_DOTS, UPCAST_DOTS, ROW_ALIGN, BLOCK_M, BLOCK_N, True, SPLIT_D, BLOCK_D_LO,
            )
    else:
        key_end = seqlen_k
        if IS_CAUSAL:
            key_end = tl.minimum(seqlen_k, (row_block + 1) * BLOCK_M)  # keys past the last row: all masked
        for start_n in range(0, key_end, BLOCK_N):
            acc, acc_lo, row_sum, row_max = _forward_block(
                acc, acc_lo, row_sum, row_max, q, q_lo, rows, start_n, k_ptr, v_ptr, mask_ptr, head_seed,
                stride_kn, stride_kd, stride_vn, stride_vd, stride_maskm, stride_maskn,
                seqlen_q, seqlen_k, scale_log2e, dropout_p,
                HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, MASK_KIND, IS_CAUSAL, HAS_DROPOUT,
                EXACT_FP32_DOTS, UPCAST_DOTS, ROW_ALIGN, BLOCK_M, BLOCK_N, True, SPLIT_D, BLOCK_D_LO,
            )

    # A row with every key masked has row_sum 0: divide by 1, output 0, and save a maximum of 0 and
    # a sum of 1 so the backward's exp2(-inf - 0) gives it zero probabilities, hence zero gradients.
    row_sum = tl.where(row_sum == 0.0, 1.0, row_sum)
    if HAS_DROPOUT:
        acc = acc * (1.0 / (1.0 - dropout_p))
    acc = acc / row_sum[:, None]
    tl.store(stats_ptr + rows, tl.where(row_max == float("-inf"), 0.0, row_max), mask=rows < seqlen_q)
    tl.store(stats_ptr + stride_stats + rows, tl.log2(row_sum), mask=rows < seqlen_q)
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


@triton.jit
def _attention_backward_delta_kernel(
    out_ptr, grad_out_ptr, delta_ptr,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_gb, stride_gh, stride_gm, stride_gd,
    n_heads, seqlen_q,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, ROW_ALIGN: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta = rowsum(out * grad_out): the softmax backward's row term, dropout included."""
    n_row_blocks = tl.cdiv(seqlen_q, BLOCK_M)
    pid = tl.program_id(0)
    row_block = pid % n_row_blocks
    batch_head = pid // n_row_blocks
    batch = (batch_head // n_heads).to(tl.int64)
    head = (batch_head % n_heads).to(tl.int64)
    out_ptr += _slice_offset(batch, head, stride_ob, stride_oh, ROW_ALIGN)
    grad_out_ptr += _slice_offset(batch, head, stride_gb, stride_gh, ROW_ALIGN)
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    out = _load_rows(out_ptr, rows, stride_om, seqlen_q, stride_od, HEAD_DIM_V, BLOCK_DV, ROW_ALIGN, True, False)
    grad_out = _load_rows(
        grad_out_ptr, rows, stride_gm, seqlen_q, stride_gd, HEAD_DIM_V, BLOCK_DV, ROW_ALIGN, True, False
    )  # (BLOCK_M, BLOCK_DV)
    delta = tl.sum(out.to(tl.float32) * grad_out.to(tl.float32), 1)
    tl.store(delta_ptr + batch_head.to(tl.int64) * seqlen_q + rows, delta, mask=rows < seqlen_q)


@triton.jit
def _backward_kv_block(
    grad_k, grad_v, grad_k_lo, grad_v_lo, k, v, k_lo, v_lo, cols, start_m, q_ptr, grad_out_ptr, stats_ptr, delta_ptr,
    mask_ptr, head_seed, keep_scale,
    stride_qm, stride_qd, stride_gm, stride_gd, stride_maskm, stride_maskn, stride_stats,
    seqlen_q, seqlen_k, scale_log2e, dropout_p,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    EXACT_FP32_DOTS: tl.constexpr, UPCAST_DOTS: tl.constexpr, ROW_ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, SPLIT_D: tl.constexpr,
    BLOCK_D_LO: tl.constexpr,
):
    """dK and dV of the program's keys, summed over the query rows start_m + [0, BLOCK_M): updated.
    SPLIT_D: the head dim's second piece in k_lo, v_lo, grad_k_lo, grad_v_lo (else passed through)."""
    rows = start_m + tl.arange(0, BLOCK_M)
    q_t = _load_rows(
        q_ptr, rows, stride_qm, seqlen_q, stride_qd, HEAD_DIM, BLOCK_D, ROW_ALIGN, MASKED, True
    )  # (BLOCK_D, BLOCK_M)
    grad_out = _load_rows(
        grad_out_ptr, rows, stride_gm, seqlen_q, stride_gd, HEAD_DIM_V, BLOCK_DV, ROW_ALIGN, MASKED, False
    )  # (BLOCK_M, BLOCK_DV)
    q_lo_t, grad_out_lo = q_t, grad_out
    if SPLIT_D:
        q_lo_t = _load_rows(
            q_ptr, rows, stride_qm, seqlen_q, stride_qd, HEAD_DIM, BLOCK_D_LO, ROW_ALIGN, MASKED, True, BLOCK_D
        )  # (BLOCK_D_LO, BLOCK_M)
        grad_out_lo = _load_rows(
            grad_out_ptr, rows, stride_gm, seqlen_q, stride_gd, HEAD_DIM_V, BLOCK_D_LO, ROW_ALIGN, MASKED, False,
            BLOCK_DV,
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
            qk_t, rows[None, :], cols[:, None], mask_ptr, stride_maskm, stride_maskn,
            seqlen_q, seqlen_k, scale_log2e, MASK_KIND, IS_CAUSAL,
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
    grad_logits_t = rounded_to(probs_t * (grad_probs_t - delta[None, :]), q_ptr, UPCAST_DOTS)
    grad_k = dot(grad_logits_t, tl.trans(q_t), grad_k, EXACT_FP32_DOTS, UPCAST_DOTS)
    if SPLIT_D:
        grad_v_lo = dot(kept_probs_t, grad_out_lo, grad_v_lo, EXACT_FP32_DOTS, UPCAST_DOTS)
        grad_k_lo = dot(grad_logits_t, tl.trans(q_lo_t), grad_k_lo, EXACT_FP32_DOTS, UPCAST_DOTS)
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
    The delta and statistics share one layout (``stride_stats_b``, ``stride_stats_h``)."""
    n_col_blocks = tl.cdiv(seqlen_k, BLOCK_N)
    pid = tl.program_id(0)
    col_block = pid % n_col_blocks
    batch_head = pid // n_col_blocks
    batch = (batch_head // n_heads).to(tl.int64)
    head = (batch_head % n_heads).to(tl.int64)
    q_ptr += _slice_offset(batch, head, stride_qb, stride_qh, ROW_ALIGN)
    k_ptr += _slice_offset(batch, head, stride_kb, stride_kh, ROW_ALIGN)
    v_ptr += _slice_offset(batch, head, stride_vb, stride_vh, ROW_ALIGN)
    mask_ptr += batch * stride_maskb + head * stride_maskh
    grad_out_ptr += _slice_offset(batch, head, stride_gb, stride_gh, ROW_ALIGN)
    grad_k_ptr += _slice_offset(batch, head, stride_dkb, stride_dkh, ROW_ALIGN)
    grad_v_ptr += _slice_offset(batch, head, stride_dvb, stride_dvh, ROW_ALIGN)
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
    k = _load_rows(k_ptr, cols, stride_kn, seqlen_k, stride_kd, HEAD_DIM, BLOCK_D, ROW_ALIGN, True, False)
    v = _load_rows(v_ptr, cols, stride_vn, seqlen_k, stride_vd, HEAD_DIM_V, BLOCK_DV, ROW_ALIGN, True, False)
    head_seed = 0
    keep_scale = 1.0
    if HAS_DROPOUT:
        head_seed = _head_seed(seed_ptr, batch_head)
        keep_scale = 1.0 / (1.0 - dropout_p)

    grad_k = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    grad_v = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    k_lo, v_lo, grad_k_lo, grad_v_lo = k, v, grad_k, grad_v  # passed through unless SPLIT_D
    if SPLIT_D:
        k_lo = _load_rows(k_ptr, cols, stride_kn, seqlen_k, stride_kd, HEAD_DIM, BLOCK_D_LO, ROW_ALIGN, True, False, BLOCK_D)
        v_lo = _load_rows(
            v_ptr, cols, stride_vn, seqlen_k, stride_vd, HEAD_DIM_V, BLOCK_D_LO, ROW_ALIGN, True, False, BLOCK_DV
        )
        grad_k_lo = tl.zeros([BLOCK_N, BLOCK_D_LO], tl.float32)
        grad_v_lo = tl.zeros([BLOCK_N, BLOCK_D_LO], tl.float32)
    if MASK_KIND == 0 and not IS_CAUSAL and not EXACT_FP32_DOTS:  # the lean body (see above)
        lean_end = seqlen_q // BLOCK_M * BLOCK_M  # the whole row blocks
        for start_m in range(0, lean_end, BLOCK_M):
            grad_k, grad_v, grad_k_lo, grad_v_lo = _backward_kv_block(
                grad_k, grad_v, grad_k_lo, grad_v_lo, k, v, k_lo, v_lo, cols, start_m, q_ptr, grad_out_ptr, stats_ptr, delta_ptr, mask_ptr,
                head_seed, keep_scale, stride_qm, stride_qd, stride_gm, stride_gd, stride_maskm, stride_maskn,
                stride_stats, seqlen_q, seqlen_k, scale_log2e, dropout_p,
                HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, MASK_KIND, IS_CAUSAL, HAS_DROPOUT,
                EXACT_FP32_DOTS, UPCAST_DOTS, ROW_ALIGN, BLOCK_M, BLOCK_N, False, SPLIT_D, BLOCK_D_LO,
            )
        if lean_end < seqlen_q:  # the last, partial row block
            grad_k, grad_v, grad_k_lo, grad_v_lo = _backward_kv_block(
                grad_k, grad_v, grad_k_lo, grad_v_lo, k, v, k_lo, v_lo, cols, lean_end, q_ptr, grad_out_ptr, stats_ptr, delta_ptr, mask_ptr,
                head_seed, keep_scale, stride_qm, stride_qd, stride_gm, stride_gd, stride_maskm, stride_maskn,
                stride_stats, seqlen_q, seqlen_k, scale_log2e, dropout_p,
                HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, MASK_KIND, IS_CAUSAL, HAS_DROPOUT,
                EXACT_FP32_DOTS, UPCAST_DOTS, ROW_ALIGN, BLOCK_M, BLOCK_N, True, SPLIT_D, BLOCK_D_LO,
            )
    else:
        row_start = 0
        if IS_CAUSAL:
            row_start = (col_block * BLOCK_N // BLOCK_M) * BLOCK_M  # rows above the block's first key see none of it
        for start_m in range(row_start, seqlen_q, BLOCK_M):
            grad_k, grad_v, grad_k_lo, grad_v_lo = _backward_kv_block(
                grad_k, grad_v, grad_k_lo, grad_v_lo, k, v, k_lo, v_lo, cols, start_m, q_ptr, grad_out_ptr, stats_ptr, delta_ptr, mask_ptr,
                head_seed, keep_scale, stride_qm, stride_qd, stride_gm, stride_gd, stride_maskm, stride_maskn,
                stride_stats, seqlen_q, seqlen_k, scale_log2e, dropout_p,
                HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, MASK_KIND, IS_CAUSAL, HAS_DROPOUT,
                EXACT_FP32_DOTS, UPCAST_DOTS, ROW_ALIGN, BLOCK_M, BLOCK_N, True, SPLIT_D, BLOCK_D_LO,
            )

    _store_rows(grad_k_ptr, cols, stride_dkn, seqlen_k, stride_dkd, grad_k * scale, HEAD_DIM, BLOCK_D, ROW_ALIGN, UPCAST_DOTS)
    _store_rows(grad_v_ptr, cols, stride_dvn, seqlen_k, stride_dvd, grad_v, HEAD_DIM_V, BLOCK_DV, ROW_ALIGN, UPCAST_DOTS)
    if SPLIT_D:
        _store_rows(
            grad_k_ptr, cols, stride_dkn, seqlen_k, stride_dkd, grad_k_lo * scale, HEAD_DIM, BLOCK_D_LO, ROW_ALIGN,
            UPCAST_DOTS, BLOCK_D,
        )
        _store_rows(
            grad_v_ptr, cols, stride_dvn, seqlen_k, stride_dvd, grad_v_lo, HEAD_DIM_V, BLOCK_D_LO, ROW_ALIGN,
            UPCAST_DOTS, BLOCK_DV,
        )


@triton.jit
def _backward_q_block(
    grad_q, grad_q_lo, q, q_lo, grad_out, grad_out_lo, row_max, log2_row_sum, delta, rows, start_n, k_ptr, v_ptr, mask_ptr, grad_bias_ptr,
    head_seed, keep_scale, stride_kn, stride_kd, stride_vn, stride_vd, stride_maskm, stride_maskn,
    seqlen_q, seqlen_k, scale_log2e, dropout_p,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, BIAS_NEEDS_GRAD: tl.constexpr,
    EXACT_FP32_DOTS: tl.constexpr, UPCAST_DOTS: tl.constexpr, ROW_ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, SPLIT_D: tl.constexpr,
    BLOCK_D_LO: tl.constexpr,
):
    """dQ of the program's query rows over the keys start_n + [0, BLOCK_N), and their bias gradient.
    SPLIT_D: the head dim's second piece in q_lo, grad_out_lo, grad_q_lo (else passed through)."""
    cols = start_n + tl.arange(0, BLOCK_N)
    k_t = _load_rows(
        k_ptr, cols, stride_kn, seqlen_k, stride_kd, HEAD_DIM, BLOCK_D, ROW_ALIGN, MASKED, True
    )  # (BLOCK_D, BLOCK_N)
    v_t = _load_rows(
        v_ptr, cols, stride_vn, seqlen_k, stride_vd, HEAD_DIM_V, BLOCK_DV, ROW_ALIGN, MASKED, True
    )  # (BLOCK_DV, BLOCK_N)
    qk = dot(q, k_t, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), EXACT_FP32_DOTS, UPCAST_DOTS)
    k_lo_t = k_t
    if SPLIT_D:
        k_lo_t = _load_rows(
            k_ptr, cols, stride_kn, seqlen_k, stride_kd, HEAD_DIM, BLOCK_D_LO, ROW_ALIGN, MASKED, True, BLOCK_D
        )  # (BLOCK_D_LO, BLOCK_N)
        v_lo_t = _load_rows(
            v_ptr, cols, stride_vn, seqlen_k, stride_vd, HEAD_DIM_V, BLOCK_D_LO, ROW_ALIGN, MASKED, True, BLOCK_DV
        )  # (BLOCK_D_LO, BLOCK_N)
        qk = dot(q_lo, k_lo_t, qk, EXACT_FP32_DOTS, UPCAST_DOTS)
    if MASKED:
        logits = _logits_base2(
            qk, rows[:, None], cols[None, :], mask_ptr, stride_maskm, stride_maskn,
            seqlen_q, seqlen_k, scale_log2e, MASK_KIND, IS_CAUSAL,
        )  # (BLOCK_M, BLOCK_N)
        probs = tl.exp2(logits - row_max[:, None] - log2_row_sum[:, None])
    else:
        probs = tl.exp2(qk * scale_log2e - row_max[:, None] - log2_row_sum[:, None])
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


@triton.autotune(
    configs=autotune_configs(BACKWARD_Q_CONFIGS, _INTERPRETER_BACKWARD_Q_CONFIG),
    key=_AUTOTUNE_KEY + ["BIAS_NEEDS_GRAD"],
    prune_configs_by={"early_config_prune": _pruner(_BACKWARD_Q_TABLE)},
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
):
    """dQ of one block of BLOCK_M query rows, and the bias gradient d(logits) of those rows."""
    n_row_blocks = tl.cdiv(seqlen_q, BLOCK_M)
    pid = tl.program_id(0)
    row_block = n_row_blocks - 1 - pid % n_row_blocks  # heaviest causal blocks first, as in the forward
    batch_head = pid // n_row_blocks
    batch = (batch_head // n_heads).to(tl.int64)
    head = (batch_head % n_heads).to(tl.int64)
    q_ptr += _slice_offset(batch, head, stride_qb, stride_qh, ROW_ALIGN)
    k_ptr += _slice_offset(batch, head, stride_kb, stride_kh, ROW_ALIGN)
    v_ptr += _slice_offset(batch, head, stride_vb, stride_vh, ROW_ALIGN)
    mask_ptr += batch * stride_maskb + head * stride_maskh
    grad_out_ptr += _slice_offset(batch, head, stride_gb, stride_gh, ROW_ALIGN)
    grad_q_ptr += _slice_offset(batch, head, stride_dqb, stride_dqh, ROW_ALIGN)
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
    q = _load_rows(q_ptr, rows, stride_qm, seqlen_q, stride_qd, HEAD_DIM, BLOCK_D, ROW_ALIGN, True, False)
    grad_out = _load_rows(
        grad_out_ptr, rows, stride_gm, seqlen_q, stride_gd, HEAD_DIM_V, BLOCK_DV, ROW_ALIGN, True, False
    )  # (BLOCK_M, BLOCK_DV)
    row_max = tl.load(stats_ptr + rows, mask=rows < seqlen_q, other=0.0)
    log2_row_sum = tl.load(stats_ptr + stride_stats + rows, mask=rows < seqlen_q, other=0.0)
    delta = tl.load(delta_ptr + rows, mask=rows < seqlen_q, other=0.0)
    head_seed = 0
    keep_scale = 1.0
    if HAS_DROPOUT:
        head_seed = _head_seed(seed_ptr, batch_head)
        keep_scale = 1.0 / (1.0 - dropout_p)

    grad_q = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    q_lo, grad_out_lo, grad_q_lo = q, grad_out, grad_q  # passed through unless SPLIT_D
    if SPLIT_D:
        q_lo = _load_rows(q_ptr, rows, stride_qm, seqlen_q, stride_qd, HEAD_DIM, BLOCK_D_LO, ROW_ALIGN, True, False, BLOCK_D)
        grad_out_lo = _load_rows(
            grad_out_ptr, rows, stride_gm, seqlen_q, stride_gd, HEAD_DIM_V, BLOCK_D_LO, ROW_ALIGN, True, False, BLOCK_DV
        )
        grad_q_lo = tl.zeros([BLOCK_M, BLOCK_D_LO], tl.float32)
    if MASK_KIND == 0 and not IS_CAUSAL and not EXACT_FP32_DOTS:  # the lean body (see above)
        lean_end = seqlen_k // BLOCK_N * BLOCK_N  # the whole blocks
        for start_n in range(0, lean_end, BLOCK_N):
            grad_q, grad_q_lo = _backward_q_block(
                grad_q, grad_q_lo, q, q_lo, grad_out, grad_out_lo, row_max, log2_row_sum, delta, rows, start_n, k_ptr, v_ptr, mask_ptr,
                grad_bias_ptr, head_seed, keep_scale, stride_kn, stride_kd, stride_vn, stride_vd,
                stride_maskm, stride_maskn, seqlen_q, seqlen_k, scale_log2e, dropout_p,
                HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, MASK_KIND, IS_CAUSAL, HAS_DROPOUT, BIAS_NEEDS_GRAD,
                EXACT_FP32_DOTS, UPCAST_DOTS, ROW_ALIGN, BLOCK_M, BLOCK_N, False, SPLIT_D, BLOCK_D_LO,
            )
        if lean_end < seqlen_k:  # the last, partial block
            grad_q, grad_q_lo = _backward_q_block(
                grad_q, grad_q_lo, q, q_lo, grad_out, grad_out_lo, row_max, log2_row_sum, delta, rows, lean_end, k_ptr, v_ptr, mask_ptr,
                grad_bias_ptr, head_seed, keep_scale, stride_kn, stride_kd, stride_vn, stride_vd,
                stride_maskm, stride_maskn, seqlen_q, seqlen_k, scale_log2e, dropout_p,
                HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, MASK_KIND, IS_CAUSAL, HAS_DROPOUT, BIAS_NEEDS_GRAD,
                EXACT_FP32_DOTS, UPCAST_DOTS, ROW_ALIGN, BLOCK_M, BLOCK_N, True, SPLIT_D, BLOCK_D_LO,
            )
    else:
        key_end = seqlen_k
        if IS_CAUSAL:
            key_end = tl.minimum(seqlen_k, (row_block + 1) * BLOCK_M)
        for start_n in range(0, key_end, BLOCK_N):
            grad_q, grad_q_lo = _backward_q_block(
                grad_q, grad_q_lo, q, q_lo, grad_out, grad_out_lo, row_max, log2_row_sum, delta, rows, start_n, k_ptr, v_ptr, mask_ptr,
                grad_bias_ptr, head_seed, keep_scale, stride_kn, stride_kd, stride_vn, stride_vd,
                stride_maskm, stride_maskn, seqlen_q, seqlen_k, scale_log2e, dropout_p,
                HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, MASK_KIND, IS_CAUSAL, HAS_DROPOUT, BIAS_NEEDS_GRAD,
                EXACT_FP32_DOTS, UPCAST_DOTS, ROW_ALIGN, BLOCK_M, BLOCK_N, True, SPLIT_D, BLOCK_D_LO,
            )

    _store_rows(grad_q_ptr, rows, stride_dqm, seqlen_q, stride_dqd, grad_q * scale, HEAD_DIM, BLOCK_D, ROW_ALIGN, UPCAST_DOTS)
    if SPLIT_D:
        _store_rows(
            grad_q_ptr, rows, stride_dqm, seqlen_q, stride_dqd, grad_q_lo * scale, HEAD_DIM, BLOCK_D_LO, ROW_ALIGN,
            UPCAST_DOTS, BLOCK_D,
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


# ---------------------------------------------------------------------------------------------
# Launch helpers, the custom ops and their autograd.


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


def _launch_forward(layout, q, k, v, mask, dropout_seed, scale, dropout_p, is_causal, allow_tf32, out, stats):
    """Fill ``out`` and ``stats`` with the forward kernel."""
    mask_ptr, mask_strides, mask_kind = _mask_arguments(q, k, mask)
    seed = dropout_seed if dropout_seed is not None else stats  # unread without dropout
    stride_stats, stride_stats_b, stride_stats_h = layout.stats_strides(stats)

    def grid(meta):
        return attention_grid(layout.seqlen_q, layout.batch * layout.heads, meta["BLOCK_M"])

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


def _launch_backward(
    layout, grad_out, q, k, v, out, stats, mask, dropout_seed, scale, dropout_p, is_causal, allow_tf32,
    bias_needs_grad, grad_q, grad_k, grad_v, delta, grad_bias,
):
    """Fill ``delta``, ``grad_q``, ``grad_k``, ``grad_v`` (and ``grad_bias``) with the backward kernels."""
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
        out, grad_out, delta, *layout.strides(out), *layout.strides(grad_out), layout.heads, delta_rows,
        HEAD_DIM_V=v.shape[-1], BLOCK_DV=padded_dv, ROW_ALIGN=constants["ROW_ALIGN"],
        BLOCK_M=_PREPASS_BLOCK_M,
    )

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

    The statistics are each row's log-sum-exp in base 2, kept in two parts: [0] the row maximum of
    the logits, [1] log2 of the row sum of exp2(logits - maximum). The backward subtracts them one
    after the other, so a huge maximum (a finfo.min bias) cannot round the sum's logarithm away.
    """
    batch, heads, seqlen_q, _ = q.shape
    head_dim_v = v.shape[3]
    # (B, H, Nq, Dv) in (B, Nq, H, Dv) memory, what the output projection reads. Allocated with
    # those strides rather than permuted, so it is no view and in-place ops on it are allowed.
    out = torch.empty_strided(
        (batch, heads, seqlen_q, head_dim_v), (seqlen_q * heads * head_dim_v, head_dim_v, heads * head_dim_v, 1),
        device=q.device, dtype=q.dtype,
    )
    stats = torch.empty(2, batch, heads, seqlen_q, device=q.device, dtype=torch.float32)
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
    delta = torch.empty(batch, heads, seqlen_q, device=q.device, dtype=torch.float32)
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


def _varlen_layout(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> _Layout:
    return _Layout(cu_seqlens_q.shape[0] - 1, q.shape[1], max_seqlen_q, max_seqlen_k, cu_seqlens_q, cu_seqlens_k)


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
    for what, dim in (("head dim", q.shape[-1]), ("value head dim", v.shape[-1])):
        if not MIN_HEAD_DIM <= dim <= MAX_HEAD_DIM:
            return f"{what} {dim} is outside the Triton kernels' range, {MIN_HEAD_DIM} to {MAX_HEAD_DIM}"
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
    for what, dim in (("head dim", q.shape[-1]), ("value head dim", v.shape[-1])):
        if not MIN_HEAD_DIM <= dim <= MAX_HEAD_DIM:
            return f"{what} {dim} is outside the Triton kernels' range, {MIN_HEAD_DIM} to {MAX_HEAD_DIM}"
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
