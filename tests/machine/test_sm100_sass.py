"""The kernels' Blackwell (sm_100) machine code, compiled without a GPU (issue 23, item 1, in part).

``python -m bench.sass --arch 100`` compiles with Triton's bundled ptxas-blackwell for sm_100a, with
the launches and pruning a B200 would make (``kernels.triton.configs.target_arch``): every attention
config and patch-projection config the autotuner may try must use tcgen05 MMA (UTCHMMA), no wgmma
and no mma.sync, and spill nothing. The sm_90 tables are sm_100's but for the tiles that spill there
(``SM100_SPILLS_AT_SPLIT``, the fused backward at a split head dim, the patch projection's
``_SM100_SPILLS``), which tests/machine/test_sass.py and test_patch_embed_sass.py show leave sm_90
unchanged. Compiled: bf16 and fp16 at the four named shapes (ViT-B/16 and ViT-L/16-384: head dim
64, patch 16, the latter with the fused backward; ViT-H/14 and SigLIP: 80 and 72, split 64 + 16,
patch 14), about 4 minutes on 2 cores. The FP8 forward's sm_100 code: tests/machine/test_fp8_sass.py.
"""

import json

import pytest

from bench import sass
from tests.machine.test_sass import run_bench_sass
from tests.machine.toolchain import Progress, cannot_compile, import_triton

SHAPES = ("vit_b16", "vit_l16_384", "vit_h14", "siglip_so400m")
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
    assert {"_patch_embed_grad_weight_kernel", "_attention_forward_ws_kernel"} <= {e["kernel"] for e in compiled}
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
    """At the split head dim dQ's 128x64/8-warp tile is not tried, and the backward is the pair (the
    fused kernel spills there); at D = 64 the warp-specialised forward's 128x64/4-warp tile is tried,
    at 72-80 (padded to 128) it is not. (The 16-bit forward, which sm_100 runs for dropout and odd
    strides only, is pruned by ``SM100_SPILLS_AT_SPLIT``: tests/attention/test_autotune_pruning.py.)"""
    at_split = {(e["kernel"], e["config"].get("BLOCK_M"), e["config"].get("BLOCK_N"), e["config"]["num_warps"])
                for e in compiled if e["shape"] == "siglip_so400m"}
    assert ("_attention_forward_ws_kernel", 128, 64, 4) not in at_split
    assert ("_attention_backward_q_kernel", 128, 64, 8) not in at_split
    assert not any(kernel == "_attention_backward_fused_kernel" for kernel, *_ in at_split)
    whole = {(e["kernel"], e["config"].get("BLOCK_M"), e["config"].get("BLOCK_N"), e["config"]["num_warps"])
             for e in compiled if e["shape"] == "vit_b16"}
    assert ("_attention_forward_ws_kernel", 128, 64, 4) in whole
    # At D = 64 and 577 keys the backward is the fused kernel (and the pair, deterministic): both clean.
    assert any(e["kernel"] == "_attention_backward_fused_kernel" for e in compiled if e["shape"] == "vit_l16_384")
    grad_weight_16 = {(e["config"]["BLOCK_D"], e["config"]["BLOCK_K"], e["config"]["BLOCK_M"], e["config"]["num_warps"])
                      for e in compiled if e["shape"] == "vit_b16" and e["kernel"] == "_patch_embed_grad_weight_kernel"}
    assert grad_weight_16 and not grad_weight_16 & {(128, 256, 64, 8), (256, 128, 64, 8), (128, 128, 32, 4)}


def test_the_forward_is_warp_specialised_on_sm_100(compiled):
    """At every shape the forward is ``_attention_forward_ws_kernel``: TTGIR partitions (the softmax
    warps by default, a correction warpgroup, one MMA warp, two loader warps), q, k, v by TMA only
    (no global load instruction), and its softmax warps' loop at most 5.3 instructions per score
    (4.38 with 128x64 and 4 warps at head dim 64, 5.28 for the other tiles: the sm_90 forward's best
    is 7.2)."""
    forwards = [e for e in compiled if e["pass"] == "forward" and e["kernel"].startswith("_attention")]
    assert {e["kernel"] for e in forwards} == {"_attention_forward_ws_kernel"}
    assert {e["shape"] for e in forwards} == set(SHAPES)
    wrong = [
        f"{_described(e)}: partitions {e['partitions']}, {e['tma_loads']} TMA, loads {e['global_loads']}, "
        f"{e['instructions_per_score']} per score"
        for e in forwards
        if len(e["partitions"]) < 3 or e["partitions"][0] != e["config"]["num_warps"] or e["tma_loads"] == 0
        or e["global_loads"] or e["instructions_per_score"] is None or e["instructions_per_score"] > 5.3
    ]
    assert not wrong, "\n".join(wrong)
    best_at_64 = min(e["instructions_per_score"] for e in forwards if e["shape"] == "vit_b16")
    assert best_at_64 <= 4.5


_VARLEN_WS = """
import json, sys, torch
from bench import sass
sass.enable_ptxas_log()
sass.install_recorder()
sys.modules["kernels.triton.configs"].AHEAD_OF_TIME_ARCH = 100
entries = []
for kernel, args, kwargs in sass.varlen_launches([256, 729, 1024], 16, 64, torch.bfloat16)[:1]:
    fn, configs = sass.variants(kernel, args, kwargs)
    for config, warps, stages in configs:
        facts, cubin = sass.compile_launch(fn, args, {**kwargs, **config}, warps, stages, 100)
        facts.update(sass.analyse(sass.disassemble(cubin), fn.__name__, config, warps, facts["partitions"]))
        entries.append({"kernel": fn.__name__, "config": config, **facts})
print(json.dumps(entries))
"""


def test_packed_sequences_take_the_warp_specialised_forward_too(tmp_path):
    """Packed images (views of a packed qkv, 256 + 729 + 1024 tokens, D = 64): the same kernel, its
    descriptors made per sequence, clean."""
    import os
    import subprocess
    import sys

    from tests.machine.test_sass import ROOT

    environment = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT), "TRITON_CACHE_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", _VARLEN_WS], cwd=ROOT, env=environment, capture_output=True,
                            text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    entries = json.loads(result.stdout.strip().splitlines()[-1])
    assert entries and {e["kernel"] for e in entries} == {"_attention_forward_ws_kernel"}
    for e in entries:
        assert e["spill_bytes"] == 0 and len(e["partitions"]) >= 3 and e["tma_loads"] > 0, e
        assert e["instructions_per_score"] <= 5.3, e


_MASKED = """
import json, sys, torch
from bench import sass
sass.enable_ptxas_log()
sass.install_recorder()
sys.modules["kernels.triton.configs"].AHEAD_OF_TIME_ARCH = 100
cases = [("vit_b16", mask, causal, 0.0, False) for mask, causal in (("bias", False), ("bool", False), (None, True))]
cases += [("siglip_so400m", "bias", False, 0.0, True), ("siglip_so400m", "bool", True, 0.0, False),
          ("siglip_so400m", None, False, 0.1, False)]
entries = []
for shape_name, mask_kind, is_causal, dropout_p, bias_grad in cases:
    shape = sass.SHAPES[shape_name]
    launches = sass.attention_launches(shape.batch, shape.heads, shape.tokens, shape.head_dim, torch.bfloat16,
                                       mask_kind=mask_kind, is_causal=is_causal, dropout_p=dropout_p, bias_grad=bias_grad)
    if shape_name == "vit_b16":
        launches = launches[:1]  # the forward: D = 64, the warp-specialised kernel
    for kernel, args, kwargs in launches:
        fn, configs = sass.variants(kernel, args, kwargs)
        for config, warps, stages in configs:
            facts, cubin = sass.compile_launch(fn, args, {**kwargs, **config}, warps, stages, 100)
            facts.update(sass.analyse(sass.disassemble(cubin), fn.__name__, config, warps, facts["partitions"]))
            entries.append({"shape": shape_name, "kernel": fn.__name__, "mask": mask_kind, "causal": is_causal,
                            "dropout": dropout_p, "tile": [config.get("BLOCK_M"), config.get("BLOCK_N"), warps, stages],
                            **facts})
print(json.dumps(entries))
"""


def test_masked_causal_and_dropout_launches_are_clean(tmp_path):
    """Under a mask, causal or dropout, every kernel sm_100 compiles is clean: at D = 64 (ViT-B/16) the
    forward is the warp-specialised one (its softmax warps 22-29 instructions per score with a mask,
    10.8-11.7 causal, where the sm_90 kernel has only 64x32 at 52-54 and spills 120 bytes with a
    bias); at the split head dims (SigLIP, 72) masked forwards take the 16-bit kernel's F16_MASKED_SM100
    tile (64x32, 1 stage) and dQ 128x32 with 1 stage (configs.py: the sm_90 light tiles spill there),
    with a bias and its gradient, a bool mask with causal, and dropout: every kernel of the pass."""
    import os
    import subprocess
    import sys

    from tests.machine.test_sass import ROOT

    environment = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT), "TRITON_CACHE_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", _MASKED], cwd=ROOT, env=environment, capture_output=True,
                            text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    entries = json.loads(result.stdout.strip().splitlines()[-1])
    no_dots = {"_attention_backward_delta_kernel", "_dropout_keep_mask_kernel"}
    spilled = [e for e in entries if e["spill_bytes"] or e["local_memory_instructions"] or (
        e["kernel"] not in no_dots and not e["tcgen05_mma"])]
    assert not spilled, spilled
    at_64 = [e for e in entries if e["shape"] == "vit_b16"]
    assert {e["kernel"] for e in at_64} == {"_attention_forward_ws_kernel"}
    for e in at_64:
        assert len(e["partitions"]) >= 3 and e["instructions_per_score"] <= (12.0 if e["causal"] else 30.0), e
    at_split = {(e["kernel"], tuple(e["tile"])) for e in entries if e["shape"] == "siglip_so400m"}
    assert {tile for kernel, tile in at_split if kernel == "_attention_forward_kernel"} == {(64, 32, 4, 1)}
    assert {tile for kernel, tile in at_split if kernel == "_attention_backward_q_kernel"} == {(128, 32, 8, 1)}
