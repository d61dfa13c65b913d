"""The warp-specialised attention forward for Blackwell (sm_100): TMA loads, partitions by role.

The same online softmax as ``attention_fwd.py`` and the same outputs (out, and the two-part base-2
log-sum-exp the backward reads), written for what Triton does on sm_100 and not on sm_90 (Triton 3.8):
``tl.range(..., warp_specialize=True)`` splits the key loop into partitions, a loader warp issuing
TMA copies (``UTMALDG``) of k and v, one warp issuing tcgen05 MMAs into tensor memory, and the
softmax and correction warpgroups (TTGIR ``ttg.warp_specialize``, registers re-split by
``USETMAXREG``). Loads are TMA tensor descriptors made in the kernel over each (batch, head) slice,
so views of a fused qkv (row strides of 3 H D) load as they lie; TMA fills rows past the sequence
and head-dim columns past D with zeros, so no load is masked.

Taken by ``launch._launch_forward`` on sm_100 for fp16/bf16 inputs without dropout, dense or packed,
whose strides and slices TMA can address (16-byte aligned; ``ws_forward_takes``); everything else
(dropout, fp32, odd strides) runs ``attention_fwd.py``. A packed sequence's descriptors end where it
ends (they are made per program), so a TMA box never reads the next sequence.
Head dims are padded to a power of two (no split of 72-96). The whole blocks of keys run the lean
body in the warp-specialised loop; the last, partial block (and every block under a mask or causal)
the masked body. Machine code: ``tests/machine/test_sm100_sass.py``.
"""

import torch
import triton
import triton.language as tl

from kernels.triton.configs import _AUTOTUNE_KEY, LOG2E, MASK_NONE, _block_d_pruner
from kernels.triton.tiles import (
    _logits_base2,
    _offsets,
    _online_softmax_step,
    _sequence,
    _store_log_sum_exp,
)
from kernels.triton.utils import INTERPRETING, autotune_configs, dot, rounded_to

# (BLOCK_M, BLOCK_N, num_warps, num_stages, the BLOCK_D it is tried at), read clean on sm_100
# (ptxas-blackwell 12.9, bf16, ``tests/machine/test_sm100_sass.py``). Left out: 128x128 (spills 200
# bytes at 64), 128x64 with 4 warps at 128 (428-440 bytes: ViT-H/14 and SigLIP, padded) and 128x32 (328).
_WS_FORWARD_TABLE = [(128, 64, 4, 2, (16, 32, 64)), (64, 64, 4, 2, (16, 32, 64, 128)), (128, 64, 8, 2, (16, 32, 64, 128))]
_WS_FORWARD_CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s, _ in _WS_FORWARD_TABLE
]
_INTERPRETER_WS_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=1)


_ws_pruner = _block_d_pruner(_WS_FORWARD_TABLE)


@triton.jit
def _ws_block(
    acc, row_sum, row_max, q, rows, start_n, k_desc, v_desc, v_ptr, mask_ptr, mask_strides, seqlen_q, seqlen_k,
    scale_log2e, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, UPCAST_DOTS: tl.constexpr,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
):
    """The online softmax over the keys start_n + [0, BLOCK_N) (``attention_fwd._forward_block``);
    ``v_ptr`` only says the dtype P is rounded to."""
    k = k_desc.load([start_n, 0])  # (BLOCK_N, BLOCK_D), zeros past the keys and the head dim
    qk = dot(q, k.T, tl.zeros([q.shape[0], BLOCK_N], tl.float32), False, UPCAST_DOTS)
    logits = qk  # unread by the lean body
    if MASKED:
        cols = start_n + tl.arange(0, BLOCK_N)
        logits = _logits_base2(
            qk, rows[:, None], cols[None, :], mask_ptr, mask_strides, seqlen_q, seqlen_k, scale_log2e,
            MASK_KIND=MASK_KIND, IS_CAUSAL=IS_CAUSAL,
        )
    probs, rescale, row_sum, new_max = _online_softmax_step(qk, logits, row_max, row_sum, scale_log2e, MASKED=MASKED)
    v = v_desc.load([start_n, 0])  # (BLOCK_N, BLOCK_DV)
    acc = dot(rounded_to(probs, v_ptr, UPCAST_DOTS), v, acc * rescale[:, None], False, UPCAST_DOTS)
    return acc, row_sum, new_max


@triton.autotune(
    configs=autotune_configs(_WS_FORWARD_CONFIGS, _INTERPRETER_WS_CONFIG),
    key=_AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _ws_pruner},
)
@triton.jit
def _attention_forward_ws_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, stats_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_maskb, stride_maskh, stride_maskm, stride_maskn,
    stride_ob, stride_oh, stride_om, stride_stats, stride_stats_b, stride_stats_h,
    n_heads, seqlen_q, seqlen_k, scale_log2e,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, LEAN: tl.constexpr, UPCAST_DOTS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, EXACT_FP32_DOTS: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out and statistics of BLOCK_M query rows of one (batch, head), as ``_attention_forward_kernel``.
    q, k, v, out: head dim contiguous (stride 1), every other stride and each slice 16-byte aligned.
    VARLEN: a "batch" is a packed sequence; its descriptors start at its first row and end at its
    last, so TMA fills what lies past it with zeros, never the next sequence's rows.
    HAS_DROPOUT and EXACT_FP32_DOTS are always off here: they complete the autotune key."""
    mask_strides = (stride_maskb, stride_maskh, stride_maskm, stride_maskn)
    n_row_blocks = tl.cdiv(seqlen_q, BLOCK_M)
    pid = tl.program_id(0)
    row_block = n_row_blocks - 1 - pid % n_row_blocks
    batch_head = pid // n_row_blocks
    batch = (batch_head // n_heads).to(tl.int64)
    head = (batch_head % n_heads).to(tl.int64)
    q_ptr += batch * stride_qb + head * stride_qh
    k_ptr += batch * stride_kb + head * stride_kh
    v_ptr += batch * stride_vb + head * stride_vh
    mask_ptr += batch * stride_maskb + head * stride_maskh
    out_ptr += batch * stride_ob + head * stride_oh
    stats_ptr += batch * stride_stats_b + head * stride_stats_h
    if VARLEN:
        start_q, seqlen_q = _sequence(cu_seqlens_q_ptr, batch)
        start_k, seqlen_k = _sequence(cu_seqlens_k_ptr, batch)
        if row_block * BLOCK_M >= seqlen_q:  # past this sequence's end (the grid fits the longest)
            return
        q_ptr += start_q * stride_qm
        out_ptr += start_q * stride_om
        stats_ptr += start_q
        k_ptr += start_k * stride_kn
        v_ptr += start_k * stride_vn
    q_desc = tl.make_tensor_descriptor(
        q_ptr, shape=[seqlen_q, HEAD_DIM], strides=[stride_qm, 1],
        block_shape=[BLOCK_M, BLOCK_D],
    )
    k_desc = tl.make_tensor_descriptor(
        k_ptr, shape=[seqlen_k, HEAD_DIM], strides=[stride_kn, 1],
        block_shape=[BLOCK_N, BLOCK_D],
    )
    v_desc = tl.make_tensor_descriptor(
        v_ptr, shape=[seqlen_k, HEAD_DIM_V], strides=[stride_vn, 1],
        block_shape=[BLOCK_N, BLOCK_DV],
    )

    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    q = q_desc.load([row_block * BLOCK_M, 0])
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    key_end = seqlen_k
    if IS_CAUSAL:
        key_end = tl.minimum(seqlen_k, (row_block + 1) * BLOCK_M)
    whole_end = key_end // BLOCK_N * BLOCK_N
    for start_n in tl.range(0, whole_end, BLOCK_N, warp_specialize=True):
        acc, row_sum, row_max = _ws_block(
            acc, row_sum, row_max, q, rows, start_n, k_desc, v_desc, v_ptr, mask_ptr, mask_strides, seqlen_q, seqlen_k,
            scale_log2e, MASK_KIND=MASK_KIND, IS_CAUSAL=IS_CAUSAL, UPCAST_DOTS=UPCAST_DOTS, BLOCK_N=BLOCK_N,
            MASKED=not LEAN,
        )
    if whole_end < key_end:
        acc, row_sum, row_max = _ws_block(
            acc, row_sum, row_max, q, rows, whole_end, k_desc, v_desc, v_ptr, mask_ptr, mask_strides, seqlen_q, seqlen_k,
            scale_log2e, MASK_KIND=MASK_KIND, IS_CAUSAL=IS_CAUSAL, UPCAST_DOTS=UPCAST_DOTS, BLOCK_N=BLOCK_N,
            MASKED=True,
        )
    row_sum = tl.where(row_sum == 0.0, 1.0, row_sum)
    acc = acc / row_sum[:, None]
    in_rows = rows < seqlen_q
    # Before the output here (after it in attention_fwd.py): the other way round, the 128x64 8-warp
    # tile spills 36-572 bytes on sm_100 at the head dims padded to 128 (ViT-H/14, SigLIP).
    _store_log_sum_exp(stats_ptr, stride_stats, rows, in_rows, row_max, row_sum)
    offs_dv = tl.arange(0, BLOCK_DV)
    tl.store(
        out_ptr + _offsets(rows, stride_om, 1)[:, None] + offs_dv[None, :], rounded_to(acc, out_ptr, UPCAST_DOTS),
        mask=in_rows[:, None] & (offs_dv[None, :] < HEAD_DIM_V),
    )


def ws_forward_takes(q, k, v, out, dropout_p: float) -> bool:
    """Whether the warp-specialised kernel can take this forward (dense or packed):
    fp16/bf16, no dropout, and every tensor's head dim contiguous with its other strides and its
    data 16-byte aligned (what a TMA descriptor needs)."""
    if dropout_p > 0.0 or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    for t in (q, k, v, out):
        if t.stride(-1) != 1 or any(s * t.element_size() % 16 for s in t.stride()[:-1]):
            return False
        if t.device.type == "cuda" and t.data_ptr() % 16:
            return False
    return True


_allocator_set = []


def ensure_allocator() -> None:
    """Tensor descriptors made inside a kernel need global scratch memory from Triton's allocator:
    a torch allocation on the kernel's device, set once (Triton's own tutorials do the same)."""
    if not _allocator_set and not INTERPRETING:

        def allocate(size: int, alignment: int, stream):
            return torch.empty(size, device="cuda", dtype=torch.int8)

        triton.set_allocator(allocate)
        _allocator_set.append(True)


def launch_ws_forward(layout, q, k, v, mask, scale, is_causal, out, stats, mask_arguments, grid):
    """Fill ``out`` and ``stats`` with the warp-specialised kernel (checked by ``ws_forward_takes``)."""
    mask_ptr, mask_strides, mask_kind = mask_arguments
    ensure_allocator()
    head_dim, head_dim_v = q.shape[-1], v.shape[-1]
    torch.library.wrap_triton(_attention_forward_ws_kernel)[grid](
        q, k, v, mask_ptr, out, stats, *layout.cu_seqlens(stats),
        *(stride for t in (q, k, v) for stride in layout.strides(t)[:3]), *mask_strides, *layout.strides(out)[:3],
        *layout.stats_strides(stats), layout.heads, layout.seqlen_q, layout.seqlen_k, scale * LOG2E,
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_DV=max(16, triton.next_power_of_2(head_dim_v)),
        MASK_KIND=mask_kind, IS_CAUSAL=is_causal, LEAN=mask_kind == MASK_NONE and not is_causal and scale >= 0,
        UPCAST_DOTS=INTERPRETING and q.dtype == torch.bfloat16, HAS_DROPOUT=False, EXACT_FP32_DOTS=False,
        VARLEN=layout.varlen,
    )
