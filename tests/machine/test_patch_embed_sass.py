"""The patch projection's Hopper machine code: vector loads, no spill, wgmma, checked without a GPU.

``bench/sass.py`` compiles the three GEMMs a forward and backward make (forward, grad_weight,
grad_images) for sm_90 with Triton's compiler and bundled ptxas, once per config the autotuner may
try at that launch (after ``early_config_prune``), and reads the SASS. At ViT-B/16 (patch 16),
ViT-H/14 and SigLIP-So400m (patch 14; NCHW images, Conv2d weight), in bf16 and fp16, every config
of every kernel must:
- load no 16-bit or 8-bit element at a time (``LDG.E.U16``, 16-bit ``LDGSTS``): at patch 14 the
  weight's runs of 14 came as 16-bit loads until the launchers passed a K-major copy of it;
- spill no register (ptxas's count, and no ``LDL``/``STL`` in the SASS): grad_images at patch 14
  keeps only its tiles of at most 64 accumulators per thread;
- use wgmma (``HGMMA``) and no mma.sync (``HMMA``) wherever the tile allows it (a warpgroup
  multiple of warps and at least 64 rows of the dot's result per block: every config today).
Two bench.sass runs (one per dtype) go two at a time, about 90 s on 2 cores; where the pinned
toolchain cannot compile, the tests fail (tests/machine/toolchain.py). Two quick tests (not slow)
hold the kernels' parameter count and the pruning's keeping a config.
"""

import importlib
import json

import pytest

from bench import sass
from tests.machine.test_sass import run_bench_sass
from tests.machine.toolchain import Progress, cannot_compile, import_triton

SHAPES = ("vit_b16", "vit_h14", "siglip_so400m")
DTYPES = ("bf16", "fp16")
# Each kernel's block that is the rows of its dot's result: wgmma needs 64 of them per block.
RESULT_ROWS = {
    "_patch_embed_forward_kernel": "BLOCK_M",
    "_patch_embed_grad_weight_kernel": "BLOCK_D",
    "_patch_embed_grad_images_kernel": "BLOCK_M",
}
MOST_PARAMETERS = 35  # issue 20: no kernel takes more (tuples cannot be passed: Inductor rejects them)


@pytest.fixture(scope="module")
def compiled(request, tmp_path_factory) -> list[dict]:
    """bench.sass report entries of the patch projection at SHAPES, in DTYPES: one run per dtype."""
    import_triton()
    out = tmp_path_factory.mktemp("sass_patch_embed")
    progress = Progress(request.config, "tests/machine/test_patch_embed_sass.py, sm_90:")
    progress(f"compiling the patch projection at {len(SHAPES)} shapes in {len(DTYPES)} dtypes, two runs at once")
    finished = run_bench_sass([(out / dtype, "patch_embed", SHAPES, (dtype,)) for dtype in DTYPES], progress)
    entries = []
    for run_out, returncode, stderr in finished:
        if returncode == sass.EXIT_CANNOT_COMPILE:
            cannot_compile(stderr.strip().splitlines()[-1])
        report = run_out / "report.json"
        assert report.exists(), f"bench.sass --op patch_embed ({run_out.name}) exited {returncode}:\n{stderr[-4000:]}"
        entries += json.loads(report.read_text())
    return entries


def _described(entry) -> str:
    return f"{entry['shape']} {entry['dtype']} {entry['kernel']} {entry['config']}"


@pytest.mark.slow
@pytest.mark.subprocess
def test_every_kernel_compiles_at_every_shape_and_dtype(compiled):
    seen = {(e["shape"], e["dtype"], e["kernel"]) for e in compiled}
    assert seen == {(shape, dtype, kernel) for shape in SHAPES for dtype in DTYPES for kernel in RESULT_ROWS}
    failed = [f"{_described(e)}: {e['error']}" for e in compiled if "error" in e]
    assert not failed, "\n".join(failed)


@pytest.mark.slow
@pytest.mark.subprocess
def test_no_16_bit_global_loads(compiled):
    """Every load is of 32 bits or more; the 16-bit operands come (at least in part) as 128-bit vectors."""
    scalar = [
        f"{_described(e)}: loads by width {e['global_loads']}"
        for e in compiled
        if "error" not in e and (set(e["global_loads"]) & {"16", "8"} or e["global_loads"].get("128", 0) == 0)
    ]
    assert not scalar, "\n".join(scalar)


@pytest.mark.slow
@pytest.mark.subprocess
def test_no_config_spills(compiled):
    spilled = [
        f"{_described(e)}: {e['spilled_bytes']} bytes, {e['local_memory_instructions']} LDL/STL"
        for e in compiled
        if "error" not in e and (e["spilled_bytes"] != 0 or e["local_memory_instructions"] != 0)
    ]
    assert not spilled, "\n".join(spilled)


@pytest.mark.slow
@pytest.mark.subprocess
def test_wgmma_and_no_mma_sync_where_the_tile_allows(compiled):
    allowed = [
        e for e in compiled
        if "error" not in e and e["config"]["num_warps"] % 4 == 0 and e["config"][RESULT_ROWS[e["kernel"]]] >= 64
    ]
    assert len(allowed) == len(compiled), "a config under a warpgroup or 64 rows: say here what it compiles to"
    wrong = [f"{_described(e)}: {e['hgmma']} HGMMA, {e['hmma']} HMMA" for e in allowed if e["hgmma"] == 0 or e["hmma"]]
    assert not wrong, "\n".join(wrong)


# ---------------------------------------------------------------------------------------------
# Quick: no compiling.


def test_kernels_take_at_most_35_parameters():
    patch_embed = importlib.import_module("kernels.triton.patch_embed")
    counts = {name: len(getattr(patch_embed, name).arg_names) for name in RESULT_ROWS}
    assert all(count <= MOST_PARAMETERS for count in counts.values()), counts


@pytest.mark.parametrize("patch", [14, 16])
def test_grad_images_pruning_keeps_a_config(patch):
    """At patch 14 only tiles of at most 64 fp32 accumulators per thread; at 16 every config."""
    patch_embed = importlib.import_module("kernels.triton.patch_embed")
    configs = patch_embed._configs(patch_embed._TILE_SIZES, patch_embed._GRAD_IMAGES_NAMES)
    kept = patch_embed._prune_grad_images(configs, {}, PATCH=patch)
    accumulators = [c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_K"] // (32 * c.num_warps) for c in kept]
    assert kept and max(accumulators) == (64 if patch == 14 else 128)
    assert len(kept) == (4 if patch == 14 else len(configs))


@pytest.mark.parametrize("patch", [14, 16])
def test_sm_100_leaves_out_the_tiles_that_spill_there(patch, monkeypatch):
    """On sm_100 (ahead of time, as bench.sass --arch 100 sets it) grad_weight and grad_images drop
    the tiles of ``_SM100_SPILLS``; on sm_90 (the default for tensors on no GPU) they keep them."""
    import torch

    patch_embed = importlib.import_module("kernels.triton.patch_embed")
    configs = importlib.import_module("kernels.triton.configs")
    grad = torch.empty(0)
    for kernel, names in (("grad_weight", patch_embed._GRAD_WEIGHT_NAMES), ("grad_images", patch_embed._GRAD_IMAGES_NAMES)):
        every = patch_embed._configs(patch_embed._TILE_SIZES, names)
        prune = patch_embed._sm100_pruner(kernel, names)
        spills = patch_embed._SM100_SPILLS[kernel][patch % 8 == 0]

        def tiles(kept, names=names):
            return {(*(c.kwargs[n] for n in names), c.num_warps) for c in kept}

        assert tiles(prune(every, {"grad_ptr": grad, "PATCH": patch})) == tiles(every)
        monkeypatch.setattr(configs, "AHEAD_OF_TIME_ARCH", 100)
        assert tiles(prune(every, {"grad_ptr": grad, "PATCH": patch})) == tiles(every) - spills
        monkeypatch.setattr(configs, "AHEAD_OF_TIME_ARCH", 90)
