"""Autotune tables of the attention kernels and the constants every attention file shares.

The tables are read off Hopper machine code (``python -m bench.sass``; sm_90, ptxas 12.9) and
held there by ``tests/machine/test_sass.py``; which config wins is measured on a GPU
(``python -m bench.gpu_check``). In Triton's interpreter one config runs.
"""

import math

import torch
import triton

LOG2E = math.log2(math.e)
MASK_NONE, MASK_BOOL, MASK_BIAS = 0, 1, 2

# Autotune configs, pruned per launch by the kind of dot and the head-dim block BLOCK_D (the larger
# of D's and Dv's, a power of two): a config is tried only where its table row lists it. The rows
# are read off Hopper machine code (``python -m bench.sass``; sm_90, ptxas 12.9): for each kind and
# BLOCK_D, the configs that compile to wgmma without spilling registers and fit shared memory; where
# none does (BLOCK_D 256 in dK/dV, exact fp32), the least bad. Tiles under 64 rows per warpgroup fall
# to mma.sync (half of wgmma's rate): only exact fp32 (no tensor cores) and fp32 at 256 keep them.
# A mask, causal or dropout (a heavier loop body) keeps only tiles of at most 16 scores per thread,
# where the others spill. Left out: (128, 128) at BLOCK_D 128, over the shared memory with a mask
# (and (64, 64, 4 warps, 3 stages) there in TF32); 4 stages of (64, 64), the loop of 3 stages.
#
# Tiles that cannot win on the lean path (no mask, causal or dropout), issue 21: a 32-wide tile's
# loop costs 13.4-15.7 instructions per score in the forward (64x32) and 12.6-14 in dK/dV (32 query
# rows), every other tile 7.2-11.3; they stay for masked launches, where they are the light ones
# (F16_MASKED), and where no other tile compiles clean (BLOCK_D 256). dK/dV at a head dim split
# 64 + 16 (72, 80: F16_SPLIT, by the two pieces) was left one tile at 1 block per SM, 15.3-15.5 per
# score (32x128, 8 warps); 64x64 with 4 warps and 1 stage gives 2 blocks per SM at 13.2-13.3, no
# spill (2 stages spill 72 bytes at 72). Nothing we compiled at the split head dims reaches 11.5:
# 64x128 (8 warps) 12.8-13.2 at 1 block, unsplit 128 wide 14-16.8 and spilling.
F16, TF32, FMA = "f16", "tf32", "fma"  # fp16/bf16 tensor cores; fp32 on them as TF32; exact fp32 FMAs
F16_MASKED = "f16 masked"  # fp16/bf16, only under a mask, causal or dropout
F16_SPLIT = "f16 split"  # fp16/bf16 without a mask, causal or dropout, at a split head dim: (first, second) piece
# fp16/bf16 under a mask, causal or dropout on sm_100, in place of F16 and F16_MASKED where a row lists the
# launch's BLOCK_D: the sm_90 light tiles spill there (ptxas-blackwell 12.9, bf16: the forward's 64x32 with 3
# stages 120-348 bytes with a bias or bool mask at ViT-B/16 to SigLIP; dQ's 64x32 and 128x32 with 2 stages
# 16-40 bytes with a bias gradient at 72). One stage fewer is clean under every mask, causal and dropout
# at the four shapes (tests/machine/test_sm100_sass.py); dQ's 64x32 with 1 stage still spills with dropout.
F16_MASKED_SM100 = "f16 masked sm100"
# TF32 (fp32 inputs, allow_tf32) under a mask, causal or dropout, on sm_90 and sm_100, in place of TF32 where a
# row lists the launch's BLOCK_D: dQ's light tiles (64x32 and 128x32, 2 stages) spill there (ptxas 12.9 and
# ptxas-blackwell 12.9): with a bias gradient at ViT-B/16 and SigLIP (sm_90 72-448 bytes, sm_100 284-1012),
# and at SigLIP under a bias, a bool mask or causal too (sm_90 64x32 56-136, sm_100 128x32 168-428). 64x16
# with 2 stages is clean under a bias with and without its gradient, a bool mask, causal and dropout at both
# shapes on both (96-209 registers).
TF32_MASKED = "tf32 masked"
# And the forward's, on sm_100 only (in place of TF32_MASKED there where a row lists it): its 64x32 tile
# (2 and 3 stages) spills 96-576 bytes under a bool mask with causal at ViT-B/16 and SigLIP; 64x16 with
# 2 stages is clean under a bias, a bool mask with causal, and dropout with causal (118-174 registers).
# sm_90's 64x32 is clean there.
TF32_MASKED_SM100 = "tf32 masked sm100"
_UP_TO_64, _UP_TO_128, _ALL = (16, 32, 64), (16, 32, 64, 128), (16, 32, 64, 128, 256)
# (BLOCK_M, BLOCK_N, num_warps, num_stages, {dot kind: the BLOCK_D it is tried at})
_FORWARD_TABLE = [
    (32, 32, 4, 2, {TF32: (256,), FMA: _ALL}),
    (64, 32, 4, 3, {F16: (256,), F16_MASKED: _UP_TO_128, TF32: _UP_TO_128}),
    (64, 64, 4, 2, {F16: _UP_TO_128, TF32: _UP_TO_128}),
    (64, 64, 4, 3, {F16: _UP_TO_128, TF32: _UP_TO_64}),
    (128, 64, 4, 3, {F16: _UP_TO_64}),
    (128, 64, 8, 3, {F16: _UP_TO_128, TF32: _UP_TO_64}),
    (128, 128, 8, 3, {F16: _UP_TO_64}),
    (64, 32, 4, 1, {F16_MASKED_SM100: _UP_TO_64}),
    (64, 16, 4, 2, {TF32_MASKED_SM100: _UP_TO_64}),
]
# dK/dV: BLOCK_N keys stay in registers while BLOCK_M query rows stream past.
_BACKWARD_KV_TABLE = [
    (32, 32, 4, 1, {FMA: _ALL}),
    (16, 64, 4, 2, {TF32: (128, 256)}),
    (32, 64, 4, 1, {F16: (256,), F16_MASKED: _UP_TO_64, TF32: _UP_TO_64}),
    (32, 64, 4, 2, {F16_MASKED: _UP_TO_64, TF32: _UP_TO_64}),
    (64, 64, 4, 1, {F16_SPLIT: ((64, 16),)}),
    (64, 64, 4, 2, {F16: _UP_TO_64}),
    (32, 128, 8, 1, {F16: (128, 256), F16_MASKED: _UP_TO_64, TF32: _UP_TO_64}),
    (64, 128, 8, 2, {F16: _UP_TO_64}),
]
# dQ: BLOCK_M query rows stay in registers while BLOCK_N keys stream past.
_BACKWARD_Q_TABLE = [
    (32, 32, 4, 1, {TF32: (256,), FMA: _ALL}),
    (64, 32, 4, 2, {F16: _UP_TO_128, TF32: _UP_TO_64}),
    (64, 64, 4, 2, {F16: _UP_TO_128, TF32: _UP_TO_64}),
    (128, 64, 8, 2, {F16: _UP_TO_128, TF32: _UP_TO_64}),
    (128, 32, 8, 2, {F16: _ALL, TF32: _UP_TO_128}),
    (128, 32, 8, 1, {F16_MASKED_SM100: _UP_TO_64}),
    (64, 16, 4, 2, {TF32_MASKED: _UP_TO_64}),
]


# dQ tiles that run their last, partial block of keys whole (NARROW_TAIL off): the narrow copy
# (``_backward_q_tail``) costs them a block per SM on sm_90 (ptxas 12.9): 64x64, 4 warps, 128 -> 134
# registers at ViT-B/16 (4 -> 3 blocks) and 168 -> 170 at ViT-H/14 (3 -> 2); 64x32, 4 warps, at
# SigLIP (127 -> 132, 4 -> 3) since the lean body reads one log-sum-exp (its narrow block would
# save 16 of 32 columns once per row block). Every other tile of every kernel keeps its registers'
# blocks per SM and its main loop with the narrow block.
_BACKWARD_Q_WHOLE_TAIL = {(64, 64, 4, 2), (64, 32, 4, 2)}


# The compute capability the pruners assume for tensors on no GPU: bench.sass's meta tensors (it sets
# this to its --arch) and the interpreter's CPU tensors (which run one config, not the tables).
AHEAD_OF_TIME_ARCH = 90


def target_arch(tensor: torch.Tensor) -> int:
    """The compute capability (major * 10 + minor) the kernels compile for with ``tensor``: its GPU's,
    or AHEAD_OF_TIME_ARCH for a tensor on no GPU."""
    if tensor.device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(tensor.device)
        return major * 10 + minor
    return AHEAD_OF_TIME_ARCH


def is_sm100(arch: int) -> bool:
    """Data-centre Blackwell (sm_100, sm_103: tcgen05 MMA), whose ptxas allocates registers differently
    from Hopper's: some tiles clean on sm_90 spill there."""
    return 100 <= arch < 110


# Tiles the sm_90 rows try that spill on sm_100 at a split head dim (72, 80: ptxas-blackwell 12.9,
# ``python -m bench.sass --arch 100`` at ViT-H/14 and SigLIP, bf16): the forward's 128x64 with 4
# warps (168-172 bytes), dQ's 128x64 with 8 (8-16 bytes). Left out there.
SM100_SPILLS_AT_SPLIT = {
    "forward": frozenset({(128, 64, 4, 3)}),
    "dq": frozenset({(128, 64, 8, 2)}),
}


def _configs(table, whole_tail=None) -> list[triton.Config]:
    """The table's configs; with ``whole_tail`` (a set of its rows' tiles) each says NARROW_TAIL."""
    return [
        triton.Config(
            {"BLOCK_M": block_m, "BLOCK_N": block_n}
            | ({} if whole_tail is None else {"NARROW_TAIL": (block_m, block_n, warps, stages) not in whole_tail}),
            num_warps=warps, num_stages=stages,
        )
        for block_m, block_n, warps, stages, _ in table
    ]


def _pruner(table, split_as_padded=False, sm100_spills_at_split=frozenset()):
    """An ``early_config_prune`` keeping the configs ``table`` lists for the launch's dot kind and
    BLOCK_D (F16_MASKED rows too under a mask, causal or dropout, and then those of at most 16
    scores per thread, if any). With the head dim split (SPLIT_D), BLOCK_D is its first piece;
    ``split_as_padded`` looks the configs up at the padded width instead (dK/dV, whose four
    accumulators and tiles per piece spill at 64 x 64 with 2 stages at D = 72), but for the lean
    fp16/bf16 launches whose two pieces a row lists as F16_SPLIT: those rows.

    A pure function of autotune-key arguments (q's dtype, HEAD_DIM, HEAD_DIM_V, MASK_KIND,
    IS_CAUSAL, HAS_DROPOUT, EXACT_FP32_DOTS), cheap, and plain Python: Triton's autotuner calls it,
    and so does torch.compile's tracing of the custom ops. On sm_100 (``target_arch`` of q) the
    tiles of ``sm100_spills_at_split`` are left out at a split head dim, and masked fp16/bf16
    launches take the table's F16_MASKED_SM100 rows where one lists their BLOCK_D; on every arch,
    masked TF32 launches its TF32_MASKED rows likewise (TF32_MASKED_SM100 first on sm_100). A config the
    table does not name (a test's own) is kept; if nothing is left, every config is.
    """
    tried_at = {(block_m, block_n, warps, stages): kinds for block_m, block_n, warps, stages, kinds in table}
    split_rows = {piece for kinds in tried_at.values() for piece in kinds.get(F16_SPLIT, ())}

    def prune(configs, named_args, **kwargs):
        arguments = {**named_args, **kwargs}
        if arguments["EXACT_FP32_DOTS"]:
            kind = FMA
        else:
            kind = TF32 if arguments["q_ptr"].dtype == torch.float32 else F16
        masked = arguments["MASK_KIND"] != MASK_NONE or arguments["IS_CAUSAL"] or arguments["HAS_DROPOUT"]
        kinds_tried = (kind, F16_MASKED) if masked and kind == F16 else (kind,)
        block_d = max(arguments["BLOCK_D"], arguments["BLOCK_DV"])
        # Masked launches whose light tiles spill take rows of their own, the first of these kinds a row
        # lists the BLOCK_D at.
        if is_sm100(target_arch(arguments["q_ptr"])):
            own_kinds = {F16: (F16_MASKED_SM100,), TF32: (TF32_MASKED_SM100, TF32_MASKED)}
        else:
            own_kinds = {TF32: (TF32_MASKED,)}
        own_kind = next(
            (k for k in own_kinds.get(kind, ()) if any(block_d in kinds.get(k, ()) for kinds in tried_at.values())), None
        )
        own_rows = masked and own_kind is not None
        if own_rows:
            kinds_tried = (own_kind,)
        if split_as_padded and arguments.get("SPLIT_D"):
            pieces = (block_d, arguments["BLOCK_D_LO"])
            if kind == F16 and not masked and pieces in split_rows:
                kinds_tried, block_d = (F16_SPLIT,), pieces
            else:
                block_d = triton.next_power_of_2(block_d + arguments["BLOCK_D_LO"])

        def tried(config):
            kinds = tried_at.get((config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages))
            return kinds is None or any(block_d in kinds.get(k, ()) for k in kinds_tried)

        kept = [config for config in configs if tried(config)] or configs
        if arguments.get("SPLIT_D") and is_sm100(target_arch(arguments["q_ptr"])):
            kept = [
                c for c in kept if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                not in sm100_spills_at_split
            ] or kept
        if masked and not own_rows:
            light = [c for c in kept if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 16 * 32 * c.num_warps]
            kept = light or kept
        return kept

    return prune


def _block_d_pruner(table, sm100_left_out_at_split=frozenset()):
    """An ``early_config_prune`` for a table of (BLOCK_M, BLOCK_N, num_warps, num_stages, the BLOCK_D
    it is tried at): the configs listed at the launch's BLOCK_D (the larger of BLOCK_D and BLOCK_DV,
    plus BLOCK_D_LO where the head dim is split);
    a config the table does not name (a test's own) is kept; if none is left, all of them. The
    FP8 and warp-specialised forwards' tables, which have no dot kinds. On sm_100 (``target_arch`` of
    q) the tiles of ``sm100_left_out_at_split`` are left out where the head dim is split."""
    listed = {(block_m, block_n, warps, stages): dims for block_m, block_n, warps, stages, dims in table}

    def prune(configs, named_args, **kwargs):
        arguments = {**named_args, **kwargs}
        block_d = max(arguments["BLOCK_D"], arguments["BLOCK_DV"])
        if arguments.get("SPLIT_D"):  # a head dim split in two pieces: their sum
            block_d += arguments["BLOCK_D_LO"]

        def tried(config):
            dims = listed.get((config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages))
            return dims is None or block_d in dims

        kept = [c for c in configs if tried(c)] or configs
        if arguments.get("SPLIT_D") and is_sm100(target_arch(arguments["q_ptr"])):
            kept = [c for c in kept if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                    not in sm100_left_out_at_split] or kept
        return kept

    return prune


FORWARD_CONFIGS = _configs(_FORWARD_TABLE)
BACKWARD_KV_CONFIGS = _configs(_BACKWARD_KV_TABLE)
BACKWARD_Q_CONFIGS = _configs(_BACKWARD_Q_TABLE, _BACKWARD_Q_WHOLE_TAIL)
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
