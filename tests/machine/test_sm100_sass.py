"""The kernels' Blackwell (sm_100) machine code, compiled without a GPU (issue 23, item 1, in part).

``python -m bench.sass --arch 100`` compiles with Triton's bundled ptxas-blackwell for sm_100a, with
the launches and pruning a B200 would make (``kernels.triton.configs.target_arch``): every attention
config and patch-projection config the autotuner may try must use tcgen05 MMA (UTCHMMA), no wgmma
and no mma.sync, and spill nothing. The sm_90 tables are sm_100's but for the tiles that spill there
(``SM100_SPILLS_AT_SPLIT``, the fused backward at a split head dim, the patch projection's
``_SM100_SPILLS``), which tests/machine/test_sass.py and test_patch_embed_sass.py show leave sm_90
unchanged. Compiled: bf16 and fp16 at ViT-B/16 (head dim 64 as ViT-L/16-384, patch 16) and SigLIP
(72 = 64 + 16 as ViT-H/14's 80, patch 14), about 3 minutes on 2 cores. Not yet: the other two
shapes (the same head-dim blocks and patches), a warp-specialised forward, FP8.
"""

import json

import pytest

from bench import sass
from tests.machine.test_sass import run_bench_sass
from tests.machine.toolchain import Progress, cannot_compile, import_triton

SHAPES = ("vit_b16", "siglip_so400m")
pytestmark = [pytest.mark.slow, pytest.mark.subprocess]


@pytest.fixture(scope="module")
def compiled(request, tmp_path_factory) -> list[dict]:
    import_triton()
    out = tmp_path_factory.mktemp("sass100")
    progress = Progress(request.config, "tests/machine/test_sm100_sass.py, sm_100:")
    progress(f"compiling the attention kernels and the patch projection at {', '.join(SHAPES)}, bf16 and fp16")
    jobs = [(out / f"{op}-{shape}", op, (shape,), ("bf16", "fp16")) for op in ("attention", "patch_embed") for shape in SHAPES]
    finished = run_bench_sass(jobs, progress, arch=100)
    entries = []
    for run_out, returncode, stderr in finished:
        if returncode == sass.EXIT_CANNOT_COMPILE:
            cannot_compile(stderr.strip().splitlines()[-1])
        report = run_out / "report.json"
        assert report.exists(), f"bench.sass --arch 100 --shape {run_out.name} exited {returncode}:\n{stderr[-4000:]}"
        entries += json.loads(report.read_text())
    return entries


def _described(entry) -> str:
    return f"{entry['shape']} {entry['dtype']} {entry['kernel']} {entry['config']}"


def test_every_kernel_compiles_for_sm_100(compiled):
    assert {e["shape"] for e in compiled} == set(SHAPES) and all(e["arch"] == 100 for e in compiled)
    assert {e["dtype"] for e in compiled} == {"bf16", "fp16"}
    assert {"_patch_embed_grad_weight_kernel", "_attention_forward_kernel"} <= {e["kernel"] for e in compiled}
    failed = [f"{_described(e)}: {e['error']}" for e in compiled if "error" in e]
    assert not failed, "\n".join(failed)


def test_tcgen05_mma_only(compiled):
    wrong = [
        f"{_described(e)}: {e['tcgen05_mma']} tcgen05, {e['hgmma']} HGMMA, {e['hmma']} HMMA"
        for e in compiled if e["kernel"] != "_attention_backward_delta_kernel"
        and (e["tcgen05_mma"] == 0 or e["hgmma"] or e["hmma"])
    ]
    assert not wrong, "\n".join(wrong)


def test_no_config_spills_on_sm_100(compiled):
    spilled = [f"{_described(e)}: {e['spilled_bytes']} bytes" for e in compiled
               if e["spilled_bytes"] != 0 or e["local_memory_instructions"] != 0]
    assert not spilled, "\n".join(spilled)


def test_sm_100_pruning_leaves_out_the_tiles_that_spill_there(compiled):
    """At the split head dim the forward's 128x64/4-warp tile and dQ's 128x64/8-warp one are not
    tried, and the backward is the pair (the fused kernel spills there); at D = 64 nothing is left out."""
    at_split = {(e["kernel"], e["config"].get("BLOCK_M"), e["config"].get("BLOCK_N"), e["config"]["num_warps"])
                for e in compiled if e["shape"] == "siglip_so400m"}
    assert ("_attention_forward_kernel", 128, 64, 4) not in at_split
    assert ("_attention_backward_q_kernel", 128, 64, 8) not in at_split
    assert not any(kernel == "_attention_backward_fused_kernel" for kernel, *_ in at_split)
    whole = {(e["kernel"], e["config"].get("BLOCK_M"), e["config"].get("BLOCK_N"), e["config"]["num_warps"])
             for e in compiled if e["shape"] == "vit_b16"}
    assert ("_attention_forward_kernel", 128, 64, 4) in whole
    grad_weight_16 = {(e["config"]["BLOCK_D"], e["config"]["BLOCK_K"], e["config"]["BLOCK_M"], e["config"]["num_warps"])
                      for e in compiled if e["shape"] == "vit_b16" and e["kernel"] == "_patch_embed_grad_weight_kernel"}
    assert grad_weight_16 and not grad_weight_16 & {(128, 256, 64, 8), (256, 128, 64, 8), (128, 128, 32, 4)}
