"""Which autotune configs a launch tries (kernels/triton/configs.py ``_pruner``): plain Python, no kernel runs.

The machine-code reasons live beside the tables; tests/machine/test_sass.py holds them on sm_90.
"""

import pytest
import torch

from kernels.triton import configs


def tiles(configs_tried) -> set:
    return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in configs_tried}


def launch(dtype=torch.bfloat16, block_d=64, split=None, mask=configs.MASK_NONE, causal=False, dropout=False):
    """The autotune-key arguments the pruner reads, as a launch passes them."""
    first, second = split if split else (block_d, 16)
    return {
        "q_ptr": torch.empty(0, dtype=dtype), "EXACT_FP32_DOTS": False, "BLOCK_D": first, "BLOCK_DV": first,
        "SPLIT_D": split is not None, "BLOCK_D_LO": second, "MASK_KIND": mask, "IS_CAUSAL": causal,
        "HAS_DROPOUT": dropout,
    }


forward = configs._pruner(configs._FORWARD_TABLE)
dkdv = configs._pruner(configs._BACKWARD_KV_TABLE, split_as_padded=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lean_launches_skip_the_32_wide_tiles(dtype):
    lean_forward = tiles(forward(configs.FORWARD_CONFIGS, launch(dtype)))
    assert (64, 32, 4, 3) not in lean_forward and (128, 128, 8, 3) in lean_forward
    assert tiles(dkdv(configs.BACKWARD_KV_CONFIGS, launch(dtype))) == {(64, 64, 4, 2), (64, 128, 8, 2)}


@pytest.mark.parametrize("masked", [{"mask": configs.MASK_BIAS}, {"causal": True}, {"dropout": True}])
def test_masked_launches_keep_the_light_tiles(masked):
    assert tiles(forward(configs.FORWARD_CONFIGS, launch(**masked))) == {(64, 32, 4, 3)}
    assert tiles(dkdv(configs.BACKWARD_KV_CONFIGS, launch(**masked))) == {(32, 64, 4, 1), (32, 64, 4, 2), (32, 128, 8, 1)}


def test_head_dims_that_only_the_32_wide_tiles_serve_keep_them():
    """BLOCK_D 256 (D = 160-256 unsplit): no other forward tile compiles clean there."""
    assert tiles(forward(configs.FORWARD_CONFIGS, launch(block_d=256))) == {(64, 32, 4, 3)}
    assert tiles(dkdv(configs.BACKWARD_KV_CONFIGS, launch(block_d=128))) == {(32, 128, 8, 1)}


def test_split_head_dims_try_their_own_dkdv_tile():
    """64 + 16 (D = 72, 80): the 2-blocks-per-SM tile; under a mask, or at another split (64 + 32,
    D = 96), the padded width's (where the 64x64 tile spills)."""
    assert tiles(dkdv(configs.BACKWARD_KV_CONFIGS, launch(split=(64, 16)))) == {(64, 64, 4, 1)}
    assert tiles(dkdv(configs.BACKWARD_KV_CONFIGS, launch(split=(64, 16), causal=True))) == {(32, 128, 8, 1)}
    assert tiles(dkdv(configs.BACKWARD_KV_CONFIGS, launch(split=(64, 32)))) == {(32, 128, 8, 1)}


def test_float32_is_pruned_as_before():
    """TF32 rows keep their tiles, 32-wide ones included: the lean-path pruning is fp16/bf16's."""
    assert (64, 32, 4, 3) in tiles(forward(configs.FORWARD_CONFIGS, launch(torch.float32)))


def test_dq_tiles_say_whether_their_last_block_is_narrow():
    by_tile = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages): c.kwargs["NARROW_TAIL"]
               for c in configs.BACKWARD_Q_CONFIGS}
    assert by_tile[(64, 64, 4, 2)] is False
    assert all(by_tile[tile] for tile in by_tile if tile not in configs._BACKWARD_Q_WHOLE_TAIL)


def test_sm_100_leaves_out_what_spills_there(monkeypatch):
    """On sm_100 (here: ahead of time, as bench.sass --arch 100 sets it) the split head dims drop the
    forward's 128x64/4-warp and dQ's 128x64/8-warp tiles, and the fused backward; sm_90 keeps them."""
    from kernels.triton.launch import _fused_backward_fits

    dq = configs._pruner(configs._BACKWARD_Q_TABLE, sm100_spills_at_split=configs.SM100_SPILLS_AT_SPLIT["dq"])
    forward_100 = configs._pruner(configs._FORWARD_TABLE, sm100_spills_at_split=configs.SM100_SPILLS_AT_SPLIT["forward"])
    split = launch(split=(64, 16))
    assert configs.target_arch(split["q_ptr"]) == 90
    assert (128, 64, 4, 3) in tiles(forward_100(configs.FORWARD_CONFIGS, split))
    assert (128, 64, 8, 2) in tiles(dq(configs.BACKWARD_Q_CONFIGS, split))
    monkeypatch.setattr(configs, "AHEAD_OF_TIME_ARCH", 100)
    assert configs.target_arch(split["q_ptr"]) == 100
    assert (128, 64, 4, 3) not in tiles(forward_100(configs.FORWARD_CONFIGS, split))
    assert (128, 64, 8, 2) not in tiles(dq(configs.BACKWARD_Q_CONFIGS, split))
    assert (128, 64, 4, 3) in tiles(forward_100(configs.FORWARD_CONFIGS, launch()))  # D = 64: all kept
    assert _fused_backward_fits(80, (64, 16), torch.bfloat16, False, False, arch=90)
    assert not _fused_backward_fits(80, (64, 16), torch.bfloat16, False, False, arch=100)
    assert _fused_backward_fits(64, None, torch.bfloat16, False, False, arch=100)


@pytest.mark.parametrize("arch", [90, 100])
@pytest.mark.parametrize("masked", [{"mask": configs.MASK_BIAS}, {"mask": configs.MASK_BOOL, "causal": True}, {"dropout": True}])
def test_masked_tf32_dq_and_sm_100_forward_try_their_own_tile(monkeypatch, arch, masked):
    """TF32 dQ under a mask, causal or dropout at BLOCK_D <= 64 (the split 64 + 16 included) tries 64x16
    with 2 stages only, on sm_90 and sm_100 alike (the light tiles spill there: configs.TF32_MASKED);
    lean TF32, fp16/bf16 and BLOCK_D 128 keep their tiles."""
    monkeypatch.setattr(configs, "AHEAD_OF_TIME_ARCH", arch)
    dq = configs._pruner(configs._BACKWARD_Q_TABLE, sm100_spills_at_split=configs.SM100_SPILLS_AT_SPLIT["dq"])
    for shape in ({"block_d": 64}, {"split": (64, 16)}, {"block_d": 32}):
        tf32 = launch(torch.float32, **shape, **masked)
        for bias_needs_grad in (False, True):
            assert tiles(dq(configs.BACKWARD_Q_CONFIGS, {**tf32, "BIAS_NEEDS_GRAD": bias_needs_grad})) == {(64, 16, 4, 2)}
    assert (64, 16, 4, 2) not in tiles(dq(configs.BACKWARD_Q_CONFIGS, launch(torch.float32)))
    assert (64, 16, 4, 2) not in tiles(dq(configs.BACKWARD_Q_CONFIGS, launch(torch.float32, block_d=128, **masked)))
    assert (64, 16, 4, 2) not in tiles(dq(configs.BACKWARD_Q_CONFIGS, launch(**masked)))
    # The forward: its own tile on sm_100 only (configs.TF32_MASKED_SM100), the light 64x32 on sm_90.
    forward_tf32 = tiles(forward(configs.FORWARD_CONFIGS, launch(torch.float32, **masked)))
    assert forward_tf32 == ({(64, 16, 4, 2)} if arch == 100 else {(64, 32, 4, 3)})
