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
