"""The patch projection's autotune configs and their pruning, per kernel and per arch (sm_90, sm_100),
read off the machine code (``python -m bench.sass --op patch_embed``; held by
tests/machine/test_patch_embed_sass.py and test_sm100_sass.py). The kernels: ``patch_embed.py``.
"""

import triton

from kernels.triton.configs import is_sm100, target_arch
from kernels.triton.utils import autotune_configs


def _configs(sizes: list[tuple[int, int, int, int, int]], names: tuple[str, str, str]) -> list[triton.Config]:
    """triton.Config per (block, block, block, stages, warps), the three blocks named by ``names``."""
    return [
        triton.Config(dict(zip(names, blocks)), num_stages=stages, num_warps=warps)
        for *blocks, stages, warps in sizes
    ]


# Tile sizes for Ampere and Hopper: the shapes of Triton's matmul tutorial (128x128 and 128x256
# tiles with 32 or 64 deep K steps, 3-4 stages), plus 64-wide tiles for the small problems
# (one image, a 1-channel 8x8 patch). Configs that run out of shared memory for fp32 are skipped
# by the autotuner. The interpreter gets one config: autotuning there would only multiply the
# run time. Each kernel names its blocks by what they tile: rows M = B*N, columns D, depth K.
# Left out, read off the sm_90 machine code (``python -m bench.sass --op patch_embed``, held by
# tests/machine/test_patch_embed_sass.py): 2-warp tiles, under a warpgroup, compile to mma.sync
# (HMMA) instead of wgmma; and in the forward, whose gathered patch addresses take registers
# beside the accumulator, the tiles that spilled at ViT-B/16 or ViT-H/14 in bf16 (128x256 and
# 256x128 with 8 warps, 128x128 with 4, and 64x128 with 4 at patch 14, measured before the weight
# was read K-major there). grad_images prunes more at patch 14: ``_prune_grad_images``.
_TILE_SIZES = [
    (128, 128, 64, 3, 8),
    (128, 256, 64, 3, 8),
    (256, 128, 64, 3, 8),
    (128, 128, 32, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
]
_FORWARD_TILE_SIZES = [(128, 128, 64, 3, 8), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4)]
_INTERPRETER_TILE = [(32, 64, 64, 1, 4)]
_FORWARD_NAMES = ("BLOCK_M", "BLOCK_D", "BLOCK_K")  # output tile (M, D), reduce over K
_GRAD_WEIGHT_NAMES = ("BLOCK_D", "BLOCK_K", "BLOCK_M")  # output tile (D, K), reduce over M
_GRAD_IMAGES_NAMES = ("BLOCK_M", "BLOCK_K", "BLOCK_D")  # output tile (M, K), reduce over D


def _autotuned(names: tuple[str, str, str], sizes=_TILE_SIZES) -> list[triton.Config]:
    return autotune_configs(_configs(sizes, names), _configs(_INTERPRETER_TILE, names)[0])


# grad_images at a patch whose rows are not whole 16-byte vectors (P % 8 != 0: patch 14) stores
# its (BLOCK_M, BLOCK_K) tile by inverse im2col a pixel pair at a time, each with its own 64-bit
# address: with 128 fp32 accumulators per thread (128x256 and 256x128 with 8 warps, 128x128 with 4)
# and the weight pipelined as 128-bit vectors, that epilogue spills 760-2870 bytes at ViT-H/14 and
# SigLIP-So400m (bf16, sm_90; the main loop does not; 220-360 bytes at SigLIP when the weight came
# 16 bits at a time). Those tiles are tried only at patches of whole vectors (16: none spills); at
# patch 14 the 64-accumulator tiles remain (128x128 with 8 warps, 128x64 and 64x128 with 4, 64x64).
_MOST_ACCUMULATORS_AT_RAGGED_PATCH = 64  # per thread


# Tiles that spill on sm_100 (ptxas-blackwell 12.9, ``python -m bench.sass --arch 100``, bf16), by
# kernel and by whether the patch rows are whole 16-byte vectors (patch 16) or not (14): the tile's
# three blocks in the kernel's names order, and its warps. grad_weight at patch 16: 224-368 bytes,
# at 14: 32-48; grad_images at 16: 16. Left out on sm_100 (``configs.target_arch``); sm_90 keeps them.
_SM100_SPILLS = {
    "grad_weight": {True: {(128, 256, 64, 8), (256, 128, 64, 8), (128, 128, 32, 4)}, False: {(64, 128, 64, 4)}},
    "grad_images": {True: {(128, 64, 64, 4)}, False: set()},
}


def _sm100_pruner(kernel: str, names: tuple[str, str, str], then=None):
    """An ``early_config_prune`` leaving out, on sm_100, the tiles of ``_SM100_SPILLS[kernel]``; then ``then``."""

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        arguments = {**named_args, **kwargs}
        if is_sm100(target_arch(arguments["grad_ptr"])):
            spills = _SM100_SPILLS[kernel][arguments["PATCH"] % 8 == 0]
            configs = [c for c in configs if (*(c.kwargs[n] for n in names), c.num_warps) not in spills] or configs
        return configs if then is None else then(configs, named_args, **kwargs)

    return prune


def _prune_grad_images(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """grad_images' ``early_config_prune``: at P % 8 != 0, the tiles of at most 64 accumulators per thread.

    A pure function of PATCH (an autotune key), plain Python: Triton's autotuner calls it, and so do
    torch.compile's tracing and bench/sass.py. If nothing would be left, every config is kept.
    """
    if {**named_args, **kwargs}["PATCH"] % 8 == 0:
        return configs
    kept = [
        config for config in configs
        if config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_K"] <= _MOST_ACCUMULATORS_AT_RAGGED_PATCH * 32 * config.num_warps
    ]
    return kept or configs
