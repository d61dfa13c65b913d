"""Triton patch projection: images (B, C, H, W) to tokens (B, [T+]N, D) in one GEMM launch.

A ViT's patch embedding is a stride-P Conv2d, which is a GEMM once the image is cut into patches:

    tokens[b, n, d] = sum_k patches[b * N + n, k] * weight[d, k]      M = B*N rows, K = C*P*P, D columns

The forward kernel never builds ``patches``: its A-tile loads compute each element's image
address from the flattened row (image b, patch n = (patch row, patch column) in row-major order)
and the flattened column k = (c, s1, s2), reading the image through its strides. Patches do not
overlap, so this "im2col in the load" reads each pixel once per column tile of D. The epilogue
adds the bias and the position embedding and stores row n at token row 1 + n; the class-token
row 0 of image b is written by the programs that hold image b's first patch, so one launch
produces the whole (B, 1 + N, D) output.

The order of k is free (it is summed over): for NCHW images we take k = (c, s1, s2), so a K tile
reads whole patch rows, runs of P contiguous pixels (s2 has stride 1); for channels_last images
k = (s1, s2, c), runs of P*C contiguous values. The weight is read through its four strides in
the same order, so vit's Linear-form weight (D, P*P*C) with columns in (s1 s2 c) order works as
the view ``weight.view(D, P, P, C).permute(0, 3, 1, 2)``, with no copy of the image. Where the
weight's runs match the image's and are whole 16-byte vectors (a Conv2d weight with NCHW images,
the Linear-form weight with channels_last images, at patch 16) it is read in place and both
operands load as vectors and pipeline. Elsewhere (patch 14, whose runs of 14 would come 16 bits at
a time; an NCHW image with the Linear-form weight, element by element) the launchers pass a
K-major copy, (K, D) in memory, read as 128-bit vectors (``_weight_for_kernels``: a few MB at most).

Backward, two more GEMMs with the same addressing (and torch sums for the small reductions):
  grad_weight (D, K) = grad_rows^T (D, M) @ patches (M, K)        patches read from the image again
  grad_images        = grad_rows (M, D) @ weight (D, K)           stored by inverse im2col: no overlap,
                                                                  so every pixel is written once
Each is a ``torch.library.triton_op``, so ``torch.compile(fullgraph=True)`` traces through them.
"""

import torch
import triton
import triton.language as tl

from kernels import reference
from kernels.triton.patch_embed_configs import (  # noqa: F401  (the tables: tests and bench.sass read them here)
    _FORWARD_NAMES,
    _FORWARD_TILE_SIZES,
    _GRAD_IMAGES_NAMES,
    _GRAD_WEIGHT_NAMES,
    _SM100_SPILLS,
    _TILE_SIZES,
    _autotuned,
    _configs,
    _prune_grad_images,
    _sm100_pruner,
)
from kernels.triton.utils import INTERPRETING, dot, rounded_to

# ---------------------------------------------------------------------------------------------
# Jit kernels.


@triton.jit
def _patch_offsets(k, stride_c, stride_h, stride_w, CHANNELS: tl.constexpr, PATCH: tl.constexpr,
                   CHANNELS_INNER: tl.constexpr, FUSED_RUNS: tl.constexpr):
    """Offsets of the flattened patch elements k, through a tensor's (c, h, w) strides.

    k = (c, s1, s2) with s2 fastest (NCHW images), or (s1, s2, c) with c fastest when
    CHANNELS_INNER (channels_last images). FUSED_RUNS, only with CHANNELS_INNER, is set by the
    host where stride_w == C * stride_c (channels_last images, vit's Linear-form weight): a patch
    row's (s2, c) values are then one run of P*C with stride stride_c, written as such so that
    Triton's alignment analysis sees the runs and vectorizes (and pipelines) the loads.
    """
    if CHANNELS_INNER:
        s1 = k // (PATCH * CHANNELS)
        run = k % (PATCH * CHANNELS)  # s2 * C + c
        if FUSED_RUNS:
            offsets = s1 * stride_h + run * stride_c
        else:
            offsets = s1 * stride_h + (run // CHANNELS) * stride_w + (run % CHANNELS) * stride_c
    else:
        offsets = (k // (PATCH * PATCH)) * stride_c + (k // PATCH % PATCH) * stride_h + (k % PATCH) * stride_w
    return offsets


@triton.jit
def _patch_origin(rows, n_patches, patches_per_row, stride_b, stride_h, stride_w, PATCH: tl.constexpr):
    """For flattened rows b * N + n: image b, patch n, and the offset of the patch's top-left pixel."""
    image = rows // n_patches
    patch = rows % n_patches
    top = (patch // patches_per_row) * PATCH
    left = (patch % patches_per_row) * PATCH
    # int64 for the batch term: B*C*H*W passes 2**31 at a few thousand 224x224 images.
    origin = image.to(tl.int64) * stride_b + top * stride_h + left * stride_w
    return image, patch, origin


@triton.autotune(configs=_autotuned(_FORWARD_NAMES, _FORWARD_TILE_SIZES), key=["n_rows", "dim", "CHANNELS", "PATCH"])
@triton.jit
def _patch_embed_forward_kernel(
    images_ptr, weight_ptr, bias_ptr, cls_ptr, pos_ptr, tokens_ptr,
    n_rows, dim, n_patches, patches_per_row,
    stride_ib, stride_ic, stride_ih, stride_iw,
    stride_wd, stride_wc, stride_wh, stride_ww,
    stride_pos_n, stride_pos_d,
    CHANNELS: tl.constexpr, PATCH: tl.constexpr, CHANNELS_INNER: tl.constexpr, WEIGHT_RUNS: tl.constexpr,
    HAS_BIAS: tl.constexpr, N_PREFIX: tl.constexpr, HAS_POS: tl.constexpr,
    IEEE_FP32: tl.constexpr, INTERPRETING: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """tokens[b, T + n, :] = patches[b*N + n] @ weight^T + bias + pos_embed[T + n]; and rows t < T, the
    N_PREFIX = T prefix tokens (class, registers, distillation), = cls[t] + pos_embed[t].

    bias (D,), cls (1, T, D) and tokens (B, T + N, D) are contiguous (the launcher's own tokens, and
    a copy of bias or cls only where they are not, a few KB), so their strides are derived here.
    """
    K = CHANNELS * PATCH * PATCH
    stride_tn = dim  # tokens (B, T + N, D), contiguous
    stride_tb = (N_PREFIX + n_patches) * dim
    # Consecutive programs share a row tile (its image pixels stay in L2 across the D tiles).
    n_dim_tiles = tl.cdiv(dim, BLOCK_D)
    row_tile = tl.program_id(0) // n_dim_tiles
    dim_tile = tl.program_id(0) % n_dim_tiles

    rows = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) flattened b * N + n
    cols = dim_tile * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    row_ok = rows < n_rows
    col_ok = cols < dim
    image, patch, origin = _patch_origin(rows, n_patches, patches_per_row, stride_ib, stride_ih, stride_iw, PATCH)

    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)  # (BLOCK_K,); K = C*196 for P = 14, hence the mask
        k_ok = ks < K
        pixel = _patch_offsets(ks, stride_ic, stride_ih, stride_iw, CHANNELS, PATCH, CHANNELS_INNER, CHANNELS_INNER)
        weight_col = _patch_offsets(ks, stride_wc, stride_wh, stride_ww, CHANNELS, PATCH, CHANNELS_INNER, WEIGHT_RUNS)
        patches = tl.load(  # (BLOCK_M, BLOCK_K): the im2col, straight from the image
            images_ptr + origin[:, None] + pixel[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )
        weight = tl.load(  # (BLOCK_K, BLOCK_D): weight[d, c, s1, s2] through its strides
            weight_ptr + weight_col[:, None] + cols[None, :] * stride_wd,
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        acc = dot(patches, weight, acc, IEEE_FP32, INTERPRETING)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    token_row = patch + N_PREFIX  # (BLOCK_M,) row of the output (and of pos_embed) that patch n goes to
    if HAS_POS:
        acc += tl.load(
            pos_ptr + token_row[:, None] * stride_pos_n + cols[None, :] * stride_pos_d,
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        ).to(tl.float32)
    image_base = image.to(tl.int64) * stride_tb
    tl.store(
        tokens_ptr + image_base[:, None] + token_row[:, None] * stride_tn + cols[None, :],
        rounded_to(acc, tokens_ptr, INTERPRETING),
        mask=row_ok[:, None] & col_ok[None, :],
    )

    # Rows 0 .. T-1 of image b: written by the one program per D tile whose rows hold b's first
    # patch (n == 0), as masked stores of the same tile shape: no extra launch.
    first_patch = row_ok & (patch == 0)
    for t in tl.static_range(N_PREFIX):
        prefix = tl.load(cls_ptr + t * dim + cols, mask=col_ok, other=0.0).to(tl.float32)
        if HAS_POS:
            prefix += tl.load(pos_ptr + t * stride_pos_n + cols * stride_pos_d, mask=col_ok, other=0.0).to(tl.float32)
        prefix_rows = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32) + prefix[None, :]
        tl.store(
            tokens_ptr + image_base[:, None] + t * stride_tn + cols[None, :],
            rounded_to(prefix_rows, tokens_ptr, INTERPRETING),
            mask=first_patch[:, None] & col_ok[None, :],
        )


@triton.autotune(
    configs=_autotuned(_GRAD_WEIGHT_NAMES), key=["n_rows", "dim", "CHANNELS", "PATCH"],
    prune_configs_by={"early_config_prune": _sm100_pruner("grad_weight", _GRAD_WEIGHT_NAMES)},
)
@triton.jit
def _patch_embed_grad_weight_kernel(
    grad_ptr, images_ptr, out_ptr,
    n_rows, dim, n_patches, patches_per_row, rows_per_split,
    stride_gb, stride_gn, stride_gd,
    stride_ib, stride_ic, stride_ih, stride_iw,
    stride_os, stride_od, stride_oc, stride_oh, stride_ow,
    CHANNELS: tl.constexpr, PATCH: tl.constexpr, CHANNELS_INNER: tl.constexpr, OUT_RUNS: tl.constexpr,
    IEEE_FP32: tl.constexpr, INTERPRETING: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """out[split, d, c, s1, s2] = sum over this split's rows m of grad[m, d] * patches[m, (c, s1, s2)]."""
    K = CHANNELS * PATCH * PATCH
    n_k_tiles = (K + BLOCK_K - 1) // BLOCK_K
    dim_tile = tl.program_id(0) // n_k_tiles
    k_tile = tl.program_id(0) % n_k_tiles
    split = tl.program_id(1)

    dims = dim_tile * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    ks = k_tile * BLOCK_K + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
    dim_ok = dims < dim
    k_ok = ks < K
    pixel = _patch_offsets(ks, stride_ic, stride_ih, stride_iw, CHANNELS, PATCH, CHANNELS_INNER, CHANNELS_INNER)

    acc = tl.zeros((BLOCK_D, BLOCK_K), dtype=tl.float32)
    row_end = tl.minimum(n_rows, (split + 1) * rows_per_split)
    for row_start in range(split * rows_per_split, row_end, BLOCK_M):
        rows = row_start + tl.arange(0, BLOCK_M)  # (BLOCK_M,) flattened b * N + n
        row_ok = rows < row_end
        image, patch, origin = _patch_origin(rows, n_patches, patches_per_row, stride_ib, stride_ih, stride_iw, PATCH)
        grad_row = image.to(tl.int64) * stride_gb + patch * stride_gn
        grad_t = tl.load(  # (BLOCK_D, BLOCK_M): grad rows, transposed by the addressing
            grad_ptr + dims[:, None] * stride_gd + grad_row[None, :], mask=dim_ok[:, None] & row_ok[None, :], other=0.0
        )
        patches = tl.load(  # (BLOCK_M, BLOCK_K)
            images_ptr + origin[:, None] + pixel[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )
        acc = dot(grad_t, patches, acc, IEEE_FP32, INTERPRETING)

    out = out_ptr + split * stride_os + dims[:, None] * stride_od
    out += _patch_offsets(ks, stride_oc, stride_oh, stride_ow, CHANNELS, PATCH, CHANNELS_INNER, OUT_RUNS)[None, :]
    tl.store(out, rounded_to(acc, out_ptr, INTERPRETING), mask=dim_ok[:, None] & k_ok[None, :])


@triton.autotune(
    configs=_autotuned(_GRAD_IMAGES_NAMES), key=["n_rows", "dim", "CHANNELS", "PATCH"],
    prune_configs_by={"early_config_prune": _sm100_pruner("grad_images", _GRAD_IMAGES_NAMES, _prune_grad_images)},
)
@triton.jit
def _patch_embed_grad_images_kernel(
    grad_ptr, weight_ptr, grad_images_ptr,
    n_rows, dim, n_patches, patches_per_row,
    stride_gb, stride_gn, stride_gd,
    stride_wd, stride_wc, stride_wh, stride_ww,
    stride_ib, stride_ic, stride_ih, stride_iw,
    CHANNELS: tl.constexpr, PATCH: tl.constexpr, CHANNELS_INNER: tl.constexpr, WEIGHT_RUNS: tl.constexpr,
    IEEE_FP32: tl.constexpr, INTERPRETING: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """grad_images at patch m, element k = sum_d grad[m, d] * weight[d, k]: the im2col run backwards."""
    K = CHANNELS * PATCH * PATCH
    # Consecutive programs share a row tile, so its grad rows are read from L2 by the K tiles.
    n_k_tiles = (K + BLOCK_K - 1) // BLOCK_K
    row_tile = tl.program_id(0) // n_k_tiles
    k_tile = tl.program_id(0) % n_k_tiles

    rows = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) flattened b * N + n
    ks = k_tile * BLOCK_K + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
    row_ok = rows < n_rows
    k_ok = ks < K
    image, patch, origin = _patch_origin(rows, n_patches, patches_per_row, stride_ib, stride_ih, stride_iw, PATCH)
    grad_row = image.to(tl.int64) * stride_gb + patch * stride_gn
    weight_col = _patch_offsets(ks, stride_wc, stride_wh, stride_ww, CHANNELS, PATCH, CHANNELS_INNER, WEIGHT_RUNS)

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for d_start in range(0, dim, BLOCK_D):
        dims = d_start + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
        dim_ok = dims < dim
        grad = tl.load(  # (BLOCK_M, BLOCK_D)
            grad_ptr + grad_row[:, None] + dims[None, :] * stride_gd, mask=row_ok[:, None] & dim_ok[None, :], other=0.0
        )
        weight = tl.load(  # (BLOCK_D, BLOCK_K)
            weight_ptr + dims[:, None] * stride_wd + weight_col[None, :], mask=dim_ok[:, None] & k_ok[None, :], other=0.0
        )
        acc = dot(grad, weight, acc, IEEE_FP32, INTERPRETING)

    # Patches do not overlap: each pixel belongs to exactly one (row, k), so plain stores, no atomics.
    pixel = _patch_offsets(ks, stride_ic, stride_ih, stride_iw, CHANNELS, PATCH, CHANNELS_INNER, CHANNELS_INNER)
    tl.store(
        grad_images_ptr + origin[:, None] + pixel[None, :],
        rounded_to(acc, grad_images_ptr, INTERPRETING),
        mask=row_ok[:, None] & k_ok[None, :],
    )


# ---------------------------------------------------------------------------------------------
# Launchers and the custom ops.


def _ieee_fp32(dtype: torch.dtype) -> bool:
    """fp32 dots in full precision unless PyTorch's own matmuls may use TF32 (16-bit dots: no choice)."""
    return dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32


def _fused_runs(t: torch.Tensor) -> bool:
    """Whether t (..., C, h, w) holds each patch row's (s2, c) values as one strided run (channels_last-like)."""
    return t.shape[-3] > 1 and t.stride(-1) == t.shape[-3] * t.stride(-3)


def _channels_inner(images: torch.Tensor) -> bool:
    """Iterate K as (s1, s2, c) for channels_last images, (c, s1, s2) otherwise: the image's runs stay whole."""
    return _fused_runs(images)


def _weight_for_kernels(weight: torch.Tensor, channels_inner: bool) -> torch.Tensor:
    """The weight (D, C, P, P) as the forward and grad_images kernels read it: itself, or a K-major copy.

    In place where its k-runs are the image's and come in whole 16-byte vectors: a Conv2d weight
    (stride 1 along s2) with NCHW images at P a multiple of 8, or the Linear-form weight (its
    (s2, c) one run) with channels_last images at P*C a multiple of 8, every other stride a
    multiple of 8 elements. Otherwise (patch 14: runs of 14 or 42 elements, gathered 16 bits at a
    time; mismatched layouts, gathered element by element) one copy per call whose memory is
    (K, D), k in the kernels' order and D contiguous, seen as (D, C, P, P): a weight tile is then
    BLOCK_K rows of BLOCK_D contiguous values, at offsets that are multiples of D, read as 128-bit
    cp.async where D is a multiple of 8 (ViT-H/14: registers 168 -> 90 at 64x64x64). The copy is
    D*C*P*P elements, 1.4 MB for SigLIP-So400m in bf16 (against 57 MB of images at batch 64), once in
    the forward and once in grad_images.
    """
    _, channels, patch, _ = weight.shape
    if channels_inner:  # k = (s1, s2, c): runs of P*C along (s2, c) with stride stride_c
        run, run_stride, others = patch * channels, weight.stride(1), (weight.stride(0), weight.stride(2))
        matches = _fused_runs(weight)
    else:  # k = (c, s1, s2): runs of P along s2
        run, run_stride, others = patch, weight.stride(3), (weight.stride(0), weight.stride(1), weight.stride(2))
        matches = True
    if matches and run_stride == 1 and run % 8 == 0 and all(stride % 8 == 0 for stride in others):
        return weight
    order = (2, 3, 1, 0) if channels_inner else (1, 2, 3, 0)  # (P, P, C, D) or (C, P, P, D)
    k_major = weight.permute(order).contiguous()  # (K, D) in memory
    return k_major.permute(sorted(range(4), key=order.__getitem__))  # back to (D, C, P, P), strides (1, ...)


def _sizes(images: torch.Tensor, weight: torch.Tensor):
    """(batch, channels, patch, patches per row, patches per image N, rows B*N, dim D)."""
    batch, channels, height, width = images.shape
    dim, _, patch, _ = weight.shape
    per_row = width // patch
    n_patches = (height // patch) * per_row
    return batch, channels, patch, per_row, n_patches, batch * n_patches, dim


@torch.library.triton_op("vitriton::patch_embed_forward", mutates_args={})
def patch_embed_forward(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cls_token: torch.Tensor | None,
    pos_embed: torch.Tensor | None,
) -> torch.Tensor:
    """Images (B, C, H, W), weight (D, C, P, P) -> tokens (B, [T+]N, D): see patch_embed_triton."""
    batch, channels, patch, per_row, n_patches, n_rows, dim = _sizes(images, weight)
    if n_rows * dim == 0:  # an empty batch, an image with no patch or D = 0: nothing to project, no launch
        return reference.patch_embed_reference(images, weight, bias, cls_token, pos_embed)
    n_prefix = 0 if cls_token is None else cls_token.shape[1]
    tokens = images.new_empty((batch, n_prefix + n_patches, dim))  # (B, T + N, D), contiguous
    channels_inner = _channels_inner(images)
    weight = _weight_for_kernels(weight, channels_inner)
    # Absent optional tensors: any pointer will do, their constexpr flag keeps it from being read.
    # bias (D,) and cls (1, T, D) are read contiguous: a copy of a few KB where they are not.
    bias_ptr = bias.contiguous() if bias is not None else tokens
    cls_ptr = cls_token.contiguous() if cls_token is not None else tokens
    pos_ptr = pos_embed if pos_embed is not None else tokens

    def grid(meta):
        return (triton.cdiv(n_rows, meta["BLOCK_M"]) * triton.cdiv(dim, meta["BLOCK_D"]),)

    torch.library.wrap_triton(_patch_embed_forward_kernel)[grid](
        images, weight, bias_ptr, cls_ptr, pos_ptr, tokens,
        n_rows, dim, n_patches, per_row,
        *images.stride(),
        *weight.stride(),
        pos_embed.stride(1) if pos_embed is not None else 0,
        pos_embed.stride(2) if pos_embed is not None else 0,
        CHANNELS=channels, PATCH=patch, CHANNELS_INNER=channels_inner, WEIGHT_RUNS=_fused_runs(weight),
        HAS_BIAS=bias is not None, N_PREFIX=n_prefix, HAS_POS=pos_embed is not None,
        IEEE_FP32=_ieee_fp32(images.dtype), INTERPRETING=INTERPRETING,
    )
    return tokens


_SPLIT_ROWS_MULTIPLE = 256  # every BLOCK_M divides it, so only the last chunk has a ragged tile
_sm_counts: dict[int, int] = {}


def _grad_weight_splits(n_rows: int, dim: int, k: int, device: torch.device) -> int:
    """Row chunks for the grad_weight reduction: enough programs for two waves of the GPU.

    grad_weight has only (D/128)*(K/128) output tiles (36 for ViT-B/16) but reduces over all
    B*N rows, so a large batch leaves most SMs idle unless the rows are split; each chunk keeps
    at least 1024 rows so the fp32 partial sums stay small next to the work.
    """
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    tiles = triton.cdiv(dim, 128) * triton.cdiv(k, 128)
    return max(1, min(triton.cdiv(n_rows, 1024), triton.cdiv(2 * _sm_counts[index], tiles)))


def _grad_weight(patch_grads: torch.Tensor, images: torch.Tensor, weight: torch.Tensor, splits: int) -> torch.Tensor:
    """grad_weight (D, C, P, P) with weight's strides, from patch_grads (B, N, D), the rows cut into ``splits``."""
    _, channels, patch, per_row, n_patches, n_rows, dim = _sizes(images, weight)
    rows_per_split = triton.cdiv(triton.cdiv(max(n_rows, 1), splits), _SPLIT_ROWS_MULTIPLE) * _SPLIT_ROWS_MULTIPLE
    splits = triton.cdiv(max(n_rows, 1), rows_per_split)
    grad_weight = torch.empty_like(weight)  # keeps a permuted view's strides: autograd's layout
    # One chunk stores straight into grad_weight; several store fp32 partial sums, added here.
    out = grad_weight if splits == 1 else weight.new_empty((splits, *weight.shape), dtype=torch.float32)
    out_strides = (0, *out.stride()) if splits == 1 else out.stride()

    def grid(meta):
        return (triton.cdiv(dim, meta["BLOCK_D"]) * triton.cdiv(channels * patch * patch, meta["BLOCK_K"]), splits)

    torch.library.wrap_triton(_patch_embed_grad_weight_kernel)[grid](
        patch_grads, images, out,
        n_rows, dim, n_patches, per_row, rows_per_split,
        *patch_grads.stride(),
        *images.stride(),
        *out_strides,
        CHANNELS=channels, PATCH=patch, CHANNELS_INNER=_channels_inner(images), OUT_RUNS=_fused_runs(out),
        IEEE_FP32=_ieee_fp32(images.dtype), INTERPRETING=INTERPRETING,
    )
    if splits > 1:
        grad_weight.copy_(out.sum(0))
    return grad_weight


@torch.library.triton_op("vitriton::patch_embed_grad_weight", mutates_args={})
def patch_embed_grad_weight(patch_grads: torch.Tensor, images: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """grad_weight (D, C, P, P), strided like weight, = patches^T @ patch_grads (B, N, D)."""
    _, channels, patch, _, _, n_rows, dim = _sizes(images, weight)
    if n_rows * dim == 0:  # no patch or no output column: the gradient is 0, nothing to launch
        return torch.zeros_like(weight)
    splits = _grad_weight_splits(n_rows, dim, channels * patch * patch, images.device)
    return _grad_weight(patch_grads, images, weight, splits)


@torch.library.triton_op("vitriton::patch_embed_grad_images", mutates_args={})
def patch_embed_grad_images(patch_grads: torch.Tensor, images: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """grad_images, shaped and strided like images, = patch_grads (B, N, D) @ weight, un-cut into patches.

    ``images`` is only read for its shape and layout.
    """
    _, channels, patch, per_row, n_patches, n_rows, dim = _sizes(images, weight)
    if n_rows * dim == 0:  # no patch or no output column: the gradient is 0, nothing to launch
        return torch.zeros_like(images)
    grad_images = torch.empty_like(images)
    channels_inner = _channels_inner(grad_images)
    weight = _weight_for_kernels(weight, channels_inner)

    def grid(meta):
        return (triton.cdiv(n_rows, meta["BLOCK_M"]) * triton.cdiv(channels * patch * patch, meta["BLOCK_K"]),)

    torch.library.wrap_triton(_patch_embed_grad_images_kernel)[grid](
        patch_grads, weight, grad_images,
        n_rows, dim, n_patches, per_row,
        *patch_grads.stride(),
        *weight.stride(),
        *grad_images.stride(),
        CHANNELS=channels, PATCH=patch, CHANNELS_INNER=channels_inner, WEIGHT_RUNS=_fused_runs(weight),
        IEEE_FP32=_ieee_fp32(images.dtype), INTERPRETING=INTERPRETING,
    )
    return grad_images


def _setup_context(ctx, inputs, output):
    images, weight, _, cls_token, _ = inputs
    ctx.save_for_backward(images, weight)
    ctx.n_prefix = 0 if cls_token is None else cls_token.shape[1]


def _backward(ctx, grad_tokens):
    """Each input's gradient, computed only when autograd asks for it. grad_tokens (B, [T+]N, D)."""
    images, weight = ctx.saved_tensors
    needs_images, needs_weight, needs_bias, needs_cls, needs_pos = ctx.needs_input_grad
    patch_grads = grad_tokens[:, ctx.n_prefix:]  # (B, N, D), a view
    grad_images = grad_weight = grad_bias = grad_cls = grad_pos = None
    if needs_images:
        grad_images = patch_embed_grad_images(patch_grads, images, weight)
    if needs_weight:
        grad_weight = patch_embed_grad_weight(patch_grads, images, weight)
    # The small reductions over the batch are torch sums, accumulated in fp32.
    if needs_bias:
        grad_bias = patch_grads.sum(dim=(0, 1), dtype=torch.float32).to(grad_tokens.dtype)  # (D,)
    if needs_cls:
        grad_cls = grad_tokens[:, :ctx.n_prefix].sum(dim=0, keepdim=True, dtype=torch.float32).to(grad_tokens.dtype)  # (1, T, D)
    if needs_pos:
        grad_pos = grad_tokens.sum(dim=0, keepdim=True, dtype=torch.float32).to(grad_tokens.dtype)  # (1, [T+]N, D)
    return grad_images, grad_weight, grad_bias, grad_cls, grad_pos


patch_embed_forward.register_autograd(_backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(
        "patch_embed: the Triton kernels' backward has no derivative of its own (double backward); "
        "run the forward with backend='einsum'"
    )


for _backward_op in (patch_embed_grad_weight, patch_embed_grad_images):
    _backward_op.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


# ---------------------------------------------------------------------------------------------
# The public function.


def patch_embed_triton(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    cls_token: torch.Tensor | None = None,
    pos_embed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Images (B, C, H, W) to tokens (B, [T+]N, D), equal to ``reference.patch_embed_reference``.

    ``weight`` (D, C, P, P) in Conv2d layout with any strides (vit's Linear weight (D, P*P*C)
    passes ``weight.view(D, P, P, C).permute(0, 3, 1, 2)``); ``bias`` (D,), ``cls_token``
    (1, T, D) and ``pos_embed`` (1, [T+]N, D) optional. Patches in row-major (h w) order.
    Inputs are checked by ``kernels.dispatch.patch_embed``, which calls this.
    """
    return patch_embed_forward(images, weight, bias, cls_token, pos_embed)


# DTensor sharding rules of the three ops (kernels/triton/sharding.py).
from kernels.triton import sharding

sharding.register("patch_embed_forward", "patch_embed_grad_weight", "patch_embed_grad_images")
