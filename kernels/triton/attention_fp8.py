"""The FP8 attention forward, for inference: q, k, v in float8 e4m3, FlashAttention-3's FP8 scheme.

    out = attention_fp8_triton(q, k, v, descales, mask=None, scale=None, is_causal=False, out_dtype=torch.bfloat16)

q, k, v are e4m3 (``torch.float8_e4m3fn``) with one float32 descale per (batch, head) each, packed
by the caller as ``descales`` (B, H, 3): the real q is ``q * descales[..., 0]``, k and v likewise.
The same online softmax as ``attention_fwd.py``, with:
- both products on FP8 tensor cores (wgmma ``QGMMA`` on sm_90, tcgen05 ``UTCQMMA`` on sm_100),
  accumulated in fp32; the descales of q and k folded into the logits' scale, v's into the output;
- the probabilities P rounded to e4m3 for the second product (FlashAttention-3 does the same):
  each weight carries a relative error of at most 2**-4, its row sum is taken before rounding;
- V consumed transposed: FP8 wgmma wants both operands K-major, and for P V the K dimension is the
  keys. A V whose keys are contiguous (a (B, H, N, Dv) view of (B, H, Dv, N) memory, as
  ``kernels.quantize_fp8`` makes it) is loaded as it lies; a row-major V makes the compiler
  transpose each tile through shared memory inside the loop (``python -m bench.sass --dtype fp8``).
Packed sequences (``VARLEN``) as the 16-bit kernels take them. No backward, no dropout. Head dims
16 to 256: 72-96 split as 64 + 32 and 160-192 as 128 + 32 or 64 (``_fp8_head_dim_split``: the
second piece at least 32, FP8 MMA's depth), others padded to a power of two of at least 32. The
last, partial block of keys runs 32 wide where it fits (head dims up to 64).
"""

import torch
import triton
import triton.language as tl

from kernels.triton.configs import LOG2E, _block_d_pruner, target_arch
from kernels.triton.tiles import (
    _load_rows,
    _logits_base2,
    _offsets,
    _online_softmax_step,
    _sequence,
    _slice_offset,
)
from kernels.triton.utils import INTERPRETING, autotune_configs, rounded_to

# (BLOCK_M, BLOCK_N, num_warps, num_stages, the BLOCK_D it is tried at: 96 is a head dim split 64 +
# 32), read off the machine code (``python -m bench.sass --dtype fp8``, sm_90 and sm_100, ViT-B/16 to
# SigLIP-So400m): each compiles to FP8 MMA in the loop with no spill there. Left out: 128x64 with 4
# warps at 96 and 128 (spills 24-80 bytes), 128x128 at 128 (padding), and on sm_100 64x64 at 96
# (8 bytes at ViT-H/14).
_FP8_FORWARD_TABLE = [
    (64, 64, 4, 3, (32, 64, 96, 128)),
    (128, 64, 8, 3, (32, 64, 96, 128)),
    (128, 128, 8, 3, (32, 64, 96)),
    (128, 64, 4, 3, (32, 64)),
]
_FP8_FORWARD_CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s, _ in _FP8_FORWARD_TABLE
]
_INTERPRETER_FP8_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=1)


_fp8_pruner = _block_d_pruner(_FP8_FORWARD_TABLE, sm100_left_out_at_split=frozenset({(64, 64, 4, 3)}))


@triton.jit
def round_to_e4m3(x):
    """fp32 ``x`` rounded to the nearest float8 e4m3 value, ties to even, as fp32: what
    ``torch.Tensor.to(torch.float8_e4m3fn)`` and a GPU's ``cvt.rn.satfinite`` give. Beyond +-448
    (infinities too) it saturates to +-448; NaN stays NaN.

    For the interpreter, whose fp32 -> e4m3 cast is wrong (0.496 becomes 0.25, issue 23) while it
    casts values already on the e4m3 grid exactly. Normal values (|x| >= 2**-6) keep 3 mantissa
    bits, rounded on the bits; subnormal ones are multiples of 2**-9, rounded by adding and taking
    away 2**14 (whose fp32 ulp is 2**-9).
    """
    bits = x.to(tl.uint32, bitcast=True)
    sign = bits & 0x80000000
    magnitude_bits = bits & 0x7FFFFFFF
    magnitude = magnitude_bits.to(tl.float32, bitcast=True)
    normal = ((magnitude_bits + 0x7FFFF + ((magnitude_bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
    subnormal = (magnitude + 16384.0) - 16384.0
    rounded = tl.where(magnitude < 0.015625, subnormal, tl.minimum(normal, 448.0))
    signed = (rounded.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    return tl.where(x != x, x, signed)  # noqa: PLR0124 (NaN is the one value unequal to itself)


@triton.jit
def _to_e4m3(x, INTERPRETING: tl.constexpr):
    """fp32 ``x`` as a dot operand in e4m3 (round to nearest even, saturating): the GPU's cast; in
    the interpreter, ``round_to_e4m3``'s fp32 values (see ``_e4m3_operand``)."""
    if INTERPRETING:
        return round_to_e4m3(x)
    return x.to(tl.float8e4nv)


@triton.jit
def _e4m3_operand(x, INTERPRETING: tl.constexpr):
    """A loaded e4m3 tile as a dot operand: itself on a GPU. The interpreter reads e4m3's NaN
    (0x7F, 0xFF) as +-480 in its fp8 dots and casts alike (Triton 3.8), hiding a NaN the GPU's FP8
    MMA propagates: there the tile is widened to fp32 (exact for every e4m3 value; products of two
    are exact in fp32 too, as on the tensor cores) with the NaN put back."""
    if INTERPRETING:
        is_nan = (x.to(tl.uint8, bitcast=True) & 0x7F) == 0x7F
        return tl.where(is_nan, float("nan"), x.to(tl.float32))
    return x


@triton.jit
def _fp8_block(
    acc, acc_lo, row_sum, row_max, q, q_lo, rows, start_n, k_ptr, v_ptr, mask_ptr, k_strides, v_strides,
    mask_strides, seqlen_q, seqlen_k, scale_log2e,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, INTERPRETING: tl.constexpr, ROW_ALIGN: tl.constexpr,
    V_ALIGN: tl.constexpr, SPLIT_D: tl.constexpr, BLOCK_D_LO: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
):
    """The online softmax over the keys start_n + [0, BLOCK_N), as ``attention_fwd._forward_block``
    with e4m3 products: (acc, acc_lo, row_sum, row_max) updated. ``scale_log2e`` holds q's and k's
    descales. SPLIT_D: the head dim's second piece (columns BLOCK_D on, BLOCK_D_LO wide) in q_lo and
    acc_lo, each product two; otherwise they pass through."""
    cols = start_n + tl.arange(0, BLOCK_N)
    k_t = _load_rows(
        k_ptr, cols, k_strides, seqlen_k, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, ROW_ALIGN=ROW_ALIGN,
        CHECK_LENGTH=MASKED, TRANSPOSED=True,
    )  # (BLOCK_D, BLOCK_N) e4m3
    qk = tl.dot(q, _e4m3_operand(k_t, INTERPRETING))  # fp32
    if SPLIT_D:
        k_lo_t = _load_rows(
            k_ptr, cols, k_strides, seqlen_k, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D_LO, ROW_ALIGN=ROW_ALIGN,
            CHECK_LENGTH=MASKED, TRANSPOSED=True, D_START=BLOCK_D,
        )
        qk = tl.dot(q_lo, _e4m3_operand(k_lo_t, INTERPRETING), qk)
    logits = qk  # unread by the lean body
    if MASKED:
        logits = _logits_base2(
            qk, rows[:, None], cols[None, :], mask_ptr, mask_strides, seqlen_q, seqlen_k, scale_log2e,
            MASK_KIND=MASK_KIND, IS_CAUSAL=IS_CAUSAL,
        )
    probs, rescale, row_sum, new_max = _online_softmax_step(qk, logits, row_max, row_sum, scale_log2e, MASKED=MASKED)
    v = _load_rows(
        v_ptr, cols, v_strides, seqlen_k, HEAD_DIM=HEAD_DIM_V, BLOCK_D=BLOCK_DV, ROW_ALIGN=V_ALIGN,
        CHECK_LENGTH=MASKED, TRANSPOSED=False,
    )  # (BLOCK_N, BLOCK_DV) e4m3
    probs = _to_e4m3(probs, INTERPRETING)
    acc = tl.dot(probs, _e4m3_operand(v, INTERPRETING), acc * rescale[:, None])
    if SPLIT_D:
        v_lo = _load_rows(
            v_ptr, cols, v_strides, seqlen_k, HEAD_DIM=HEAD_DIM_V, BLOCK_D=BLOCK_D_LO, ROW_ALIGN=V_ALIGN,
            CHECK_LENGTH=MASKED, TRANSPOSED=False, D_START=BLOCK_DV,
        )
        acc_lo = tl.dot(probs, _e4m3_operand(v_lo, INTERPRETING), acc_lo * rescale[:, None])
    return acc, acc_lo, row_sum, new_max


@triton.autotune(
    configs=autotune_configs(_FP8_FORWARD_CONFIGS, _INTERPRETER_FP8_CONFIG),
    key=["seqlen_q", "seqlen_k", "HEAD_DIM", "HEAD_DIM_V", "MASK_KIND", "IS_CAUSAL", "VARLEN"],
    prune_configs_by={"early_config_prune": _fp8_pruner},
)
@triton.jit
def _attention_fp8_forward_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, descale_ptr, out_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_maskb, stride_maskh, stride_maskm, stride_maskn,
    stride_ob, stride_oh, stride_om, stride_od,
    n_heads, seqlen_q, seqlen_k, scale_log2e,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, LEAN: tl.constexpr,
    INTERPRETING: tl.constexpr, ROW_ALIGN: tl.constexpr, V_ALIGN: tl.constexpr, OUT_ALIGN: tl.constexpr,
    VARLEN: tl.constexpr, SPLIT_D: tl.constexpr, BLOCK_D_LO: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The output of one block of BLOCK_M query rows of one (batch, head), in out_ptr's dtype.

    LEAN: no mask, not causal and a scale >= 0: every whole block runs the lean body (its largest
    logit is its largest product, scaled), the last, partial one the masked body; otherwise every
    block is masked. ROW_ALIGN: q's and k's row alignment hint (``tiles._offsets``), V_ALIGN v's
    (1 when its keys are contiguous), OUT_ALIGN the output's. VARLEN: a "batch" is a packed sequence
    (``launch._Layout``), seqlen_q and seqlen_k the longest. SPLIT_D: the head dim in two pieces,
    BLOCK_D (= BLOCK_DV) then BLOCK_D_LO (``_fp8_head_dim_split``)."""
    q_strides = (stride_qb, stride_qh, stride_qm, stride_qd)
    k_strides = (stride_kb, stride_kh, stride_kn, stride_kd)
    v_strides = (stride_vb, stride_vh, stride_vn, stride_vd)
    mask_strides = (stride_maskb, stride_maskh, stride_maskm, stride_maskn)
    out_strides = (stride_ob, stride_oh, stride_om, stride_od)
    n_row_blocks = tl.cdiv(seqlen_q, BLOCK_M)
    pid = tl.program_id(0)
    row_block = n_row_blocks - 1 - pid % n_row_blocks  # causal: the longest rows start first
    batch_head = pid // n_row_blocks
    batch = (batch_head // n_heads).to(tl.int64)
    head = (batch_head % n_heads).to(tl.int64)
    q_ptr += _slice_offset(batch, head, q_strides, ROW_ALIGN)
    k_ptr += _slice_offset(batch, head, k_strides, ROW_ALIGN)
    v_ptr += _slice_offset(batch, head, v_strides, V_ALIGN)
    mask_ptr += batch * stride_maskb + head * stride_maskh
    out_ptr += _slice_offset(batch, head, out_strides, OUT_ALIGN)
    q_descale = tl.load(descale_ptr + batch_head * 3)
    k_descale = tl.load(descale_ptr + batch_head * 3 + 1)
    v_descale = tl.load(descale_ptr + batch_head * 3 + 2)
    scale_log2e = scale_log2e * q_descale * k_descale
    if VARLEN:
        start_q, seqlen_q = _sequence(cu_seqlens_q_ptr, batch)
        start_k, seqlen_k = _sequence(cu_seqlens_k_ptr, batch)
        if row_block * BLOCK_M >= seqlen_q:  # past this sequence's end (the grid fits the longest)
            return
        q_ptr += _offsets(start_q, stride_qm, ROW_ALIGN)
        out_ptr += _offsets(start_q, stride_om, OUT_ALIGN)
        k_ptr += _offsets(start_k, stride_kn, ROW_ALIGN)
        v_ptr += start_k * stride_vn

    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    q = _load_rows(
        q_ptr, rows, q_strides, seqlen_q, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, ROW_ALIGN=ROW_ALIGN,
        CHECK_LENGTH=True, TRANSPOSED=False,
    )
    q = _e4m3_operand(q, INTERPRETING)
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    q_lo, acc_lo = q, acc  # passed through unless SPLIT_D
    if SPLIT_D:
        q_lo = _load_rows(
            q_ptr, rows, q_strides, seqlen_q, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D_LO, ROW_ALIGN=ROW_ALIGN,
            CHECK_LENGTH=True, TRANSPOSED=False, D_START=BLOCK_D,
        )
        q_lo = _e4m3_operand(q_lo, INTERPRETING)
        acc_lo = tl.zeros([BLOCK_M, BLOCK_D_LO], tl.float32)
    key_end = seqlen_k
    if IS_CAUSAL:
        key_end = tl.minimum(seqlen_k, (row_block + 1) * BLOCK_M)  # keys past the last row: all masked
    whole_end = key_end // BLOCK_N * BLOCK_N
    for start_n in range(0, whole_end, BLOCK_N):
        acc, acc_lo, row_sum, row_max = _fp8_block(
            acc, acc_lo, row_sum, row_max, q, q_lo, rows, start_n, k_ptr, v_ptr, mask_ptr, k_strides, v_strides, mask_strides,
            seqlen_q, seqlen_k, scale_log2e, HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, BLOCK_D=BLOCK_D,
            BLOCK_DV=BLOCK_DV, MASK_KIND=MASK_KIND, IS_CAUSAL=IS_CAUSAL, INTERPRETING=INTERPRETING,
            ROW_ALIGN=ROW_ALIGN, V_ALIGN=V_ALIGN, SPLIT_D=SPLIT_D, BLOCK_D_LO=BLOCK_D_LO, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, MASKED=not LEAN,
        )
    # The last, partial block: 32 keys wide (FP8 MMA's depth) where they fit, as attention_fwd's
    # _forward_tail, at head dims up to 64. Padded to 128 (72-96) the narrow copy costs registers:
    # ViT-H/14's 64x64 on sm_100 168 -> 184, 3 -> 2 blocks per SM; left out there.
    tail = key_end - whole_end
    narrow = BLOCK_N > 32 and not SPLIT_D and max(BLOCK_D, BLOCK_DV) <= 64  # compile time; the width: run time
    if narrow and tail > 0 and tail <= 32:
        acc, acc_lo, row_sum, row_max = _fp8_block(
            acc, acc_lo, row_sum, row_max, q, q_lo, rows, whole_end, k_ptr, v_ptr, mask_ptr, k_strides, v_strides, mask_strides,
            seqlen_q, seqlen_k, scale_log2e, HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, BLOCK_D=BLOCK_D,
            BLOCK_DV=BLOCK_DV, MASK_KIND=MASK_KIND, IS_CAUSAL=IS_CAUSAL, INTERPRETING=INTERPRETING,
            ROW_ALIGN=ROW_ALIGN, V_ALIGN=V_ALIGN, SPLIT_D=SPLIT_D, BLOCK_D_LO=BLOCK_D_LO, BLOCK_M=BLOCK_M, BLOCK_N=32, MASKED=True,
        )
    elif tail > 0:
        acc, acc_lo, row_sum, row_max = _fp8_block(
            acc, acc_lo, row_sum, row_max, q, q_lo, rows, whole_end, k_ptr, v_ptr, mask_ptr, k_strides, v_strides, mask_strides,
            seqlen_q, seqlen_k, scale_log2e, HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, BLOCK_D=BLOCK_D,
            BLOCK_DV=BLOCK_DV, MASK_KIND=MASK_KIND, IS_CAUSAL=IS_CAUSAL, INTERPRETING=INTERPRETING,
            ROW_ALIGN=ROW_ALIGN, V_ALIGN=V_ALIGN, SPLIT_D=SPLIT_D, BLOCK_D_LO=BLOCK_D_LO, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, MASKED=True,
        )
    # A row with every key masked has row_sum 0: divide by 1, output 0.
    row_sum = tl.where(row_sum == 0.0, 1.0, row_sum)
    out_scale = (v_descale / row_sum)[:, None]
    offs_dv = tl.arange(0, BLOCK_DV)
    out_rows = out_ptr + _offsets(rows, stride_om, OUT_ALIGN)[:, None]
    tl.store(
        out_rows + offs_dv[None, :] * stride_od, rounded_to(acc * out_scale, out_ptr, INTERPRETING),
        mask=(rows[:, None] < seqlen_q) & (offs_dv[None, :] < HEAD_DIM_V),
    )
    if SPLIT_D:
        offs_lo = BLOCK_DV + tl.arange(0, BLOCK_D_LO)
        tl.store(
            out_rows + offs_lo[None, :] * stride_od, rounded_to(acc_lo * out_scale, out_ptr, INTERPRETING),
            mask=(rows[:, None] < seqlen_q) & (offs_lo[None, :] < HEAD_DIM_V),
        )


# ---------------------------------------------------------------------------------------------
# The host side.


def _alignment(t: torch.Tensor) -> int:
    """The largest power of two, up to 16 bytes in elements, that divides every stride of ``t`` but
    the head dim's: the rows' alignment hint. An e4m3 head dim of 72 in a fused qkv (SigLIP) puts
    heads 72 bytes apart: 8, hence 64-bit loads, where a hint of 1 would leave byte loads and a
    transpose through shared memory in the loop."""
    alignment = 16 // t.element_size()
    while alignment > 1 and any(s % alignment for s in t.stride()[:-1]):
        alignment //= 2
    return alignment


def _fp8_head_dim_split(head_dim: int, head_dim_v: int) -> tuple[int, int] | None:
    """The 16-bit kernels' split of the head dim (``launch._head_dim_split``) with a second piece of
    at least 32, FP8 MMA's depth: 72-96 as 64 + 32 (96 columns of each product where padding makes
    128), 160-192 as 128 + 32 or 64; None where that saves nothing (40-48: 32 + 32 is the padding)."""
    from kernels.triton.launch import _head_dim_split

    split = _head_dim_split(head_dim, head_dim_v, False)
    if split is None:
        return None
    first, second = split[0], max(32, split[1])
    return (first, second) if first + second < triton.next_power_of_2(head_dim) else None


def _launch_fp8(layout, q, k, v, descales, mask, scale, is_causal, out) -> None:
    """Fill ``out`` with the FP8 kernel: dense (B, H, N, D) or packed (``layout.varlen``) inputs."""
    from kernels.triton.launch import _mask_arguments, attention_grid

    mask_ptr, mask_strides, mask_kind = _mask_arguments(q, k, mask)
    v_keys_contiguous = layout.strides(v)[2] == 1 and v.shape[-1] > 1

    def grid(meta):
        return attention_grid(layout.seqlen_q, layout.batch * layout.heads, meta["BLOCK_M"])

    head_dim, head_dim_v = q.shape[-1], v.shape[-1]
    split = _fp8_head_dim_split(head_dim, head_dim_v)
    block_d = max(32, triton.next_power_of_2(head_dim)) if split is None else split[0]
    block_dv = max(16, triton.next_power_of_2(head_dim_v)) if split is None else split[0]
    torch.library.wrap_triton(_attention_fp8_forward_kernel)[grid](
        q, k, v, mask_ptr, descales, out, *layout.cu_seqlens(descales),
        *layout.strides(q), *layout.strides(k), *layout.strides(v), *mask_strides, *layout.strides(out),
        layout.heads, layout.seqlen_q, layout.seqlen_k, scale * LOG2E,
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v,
        BLOCK_D=block_d, BLOCK_DV=block_dv, SPLIT_D=split is not None, BLOCK_D_LO=split[1] if split else 32,
        MASK_KIND=mask_kind, IS_CAUSAL=is_causal, LEAN=mask is None and not is_causal and scale >= 0,
        INTERPRETING=INTERPRETING,
        ROW_ALIGN=min(_alignment(q), _alignment(k)), V_ALIGN=1 if v_keys_contiguous else _alignment(v),
        OUT_ALIGN=_alignment(out), VARLEN=layout.varlen,
    )


@torch.library.triton_op("vitriton::attention_fp8_forward", mutates_args={})
def attention_fp8_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    descales: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    is_causal: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """out (B, H, Nq, Dv) in ``out_dtype`` (in (B, Nq, H, Dv) memory, as the 16-bit forward's) of
    checked e4m3 inputs; ``descales`` (B, H, 3) float32 contiguous."""
    from kernels.triton.launch import _dense_layout, _dense_output

    out = _dense_output(q, v, out_dtype)
    _launch_fp8(_dense_layout(q, k), q, k, v, descales, mask, scale, is_causal, out)
    return out


@torch.library.triton_op("vitriton::attention_fp8_varlen_forward", mutates_args={})
def attention_fp8_varlen_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    descales: torch.Tensor,
    scale: float,
    is_causal: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """out (total_q, H, Dv) in ``out_dtype`` of checked packed e4m3 inputs; ``descales`` (n, H, 3)
    float32 contiguous, one row per packed sequence."""
    from kernels.triton.launch import _varlen_layout

    out = torch.empty(*q.shape[:2], v.shape[2], device=q.device, dtype=out_dtype)
    layout = _varlen_layout(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if layout.batch and max_seqlen_q:  # else no query rows: nothing to launch
        _launch_fp8(layout, q, k, v, descales, None, scale, is_causal, out)
    return out


def _no_backward(ctx, *grads):
    raise NotImplementedError("attention: the FP8 forward is for inference and has no backward")


attention_fp8_forward.register_autograd(_no_backward, setup_context=lambda ctx, inputs, output: None)
attention_fp8_varlen_forward.register_autograd(_no_backward, setup_context=lambda ctx, inputs, output: None)


def attention_fp8_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    descales: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    is_causal: bool = False,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """FP8 attention of inputs checked by ``kernels.dispatch.attention``: e4m3 q (B, H, Nq, D),
    k (B, H, Nk, D), v (B, H, Nk, Dv), ``descales`` (B, H, 3) float32 -> (B, H, Nq, Dv) ``out_dtype``."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if q.shape[0] * q.shape[1] * q.shape[2] == 0:
        return torch.empty(*q.shape[:3], v.shape[3], device=q.device, dtype=out_dtype)
    return attention_fp8_forward(q, k, v, descales.contiguous(), mask, scale, bool(is_causal), out_dtype)


def attention_fp8_varlen_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    descales: torch.Tensor,
    scale: float | None = None,
    *,
    is_causal: bool = False,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """FP8 attention within each packed sequence, inputs checked by ``kernels.dispatch.attention_varlen``:
    e4m3 q (total_q, H, D), k (total_k, H, D), v (total_k, H, Dv), ``descales`` (n, H, 3) float32."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return attention_fp8_varlen_forward(
        q, k, v, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), int(max_seqlen_q), int(max_seqlen_k),
        descales.contiguous(), scale, bool(is_causal), out_dtype,
    )


def fp8_target(tensor: torch.Tensor) -> str | None:
    """Why the FP8 kernel cannot run on this tensor's GPU (FP8 tensor cores are sm_89 and up), or None."""
    arch = target_arch(tensor)
    return None if arch >= 89 else f"FP8 tensor cores need compute capability 8.9 or higher, got {arch // 10}.{arch % 10}"


# DTensor sharding rule (kernels/triton/sharding.py).
from kernels.triton import sharding

sharding.register("attention_fp8_forward", "attention_fp8_varlen_forward")
