"""The attention kernels' Hopper machine code keeps the lean shape it was given, checked without a GPU.

``bench/sass.py`` compiles every kernel for sm_90 with Triton's compiler and bundled ptxas (as
``tests/test_gpu_compile.py`` does) and reads the SASS. At the four ViT shapes of ``bench.sass.SHAPES``
(ViT-B/16, ViT-L/16 at 384, ViT-H/14, SigLIP-So400m; q, k, v views of a fused qkv), every config
the autotuner may try there (after its pruning) must:
- spill no register (ptxas's count, and no local-memory instruction in the SASS);
- use wgmma (HGMMA) and no mma.sync (HMMA): the head dims are all <= 128;
- load q, k, v, out and dO with 128-bit instructions, never one 16-bit element at a time (D = 72
  has no 16-divisible strides; the kernels' alignment hint brings the vectors back);
and the forward's main loop at ViT-B/16 must cost at most 10 instructions per score for its best
config (13.8 before the loop was made lean; Triton's tutorial kernel is about 9.4).

What is compiled: bf16 at the four shapes, fp16 at ViT-B/16 and SigLIP (head-dim blocks 64 and
128). The two dtypes compile to the same code but for the MMA's input type; fp16 at the other two
shapes (same head-dim blocks, other lengths and head counts) would add about 40 s for no new fact.
The patch projection: at ViT-H/14 in bf16, no config spills or falls to mma.sync. The compiles run
once per module, in three subprocesses (TRITON_INTERPRET=0) two at a time; the SASS-reading
heuristics are tested first on hand-written SASS. Last, ``bench/gpu_check.py``: without a GPU it
says so in one line, and its table's ratios are to the fastest peer.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import sass

ROOT = Path(__file__).resolve().parents[1]
# (shapes, dtypes) of each bench.sass run, the longest first
RUNS = [(("vit_b16",), ("bf16", "fp16")), (("vit_l16_384", "vit_h14"), ("bf16",)), (("siglip_so400m",), ("bf16", "fp16"))]
COMPILED = [(shape, dtype) for shapes, dtypes in RUNS for shape in shapes for dtype in dtypes]
ATTENTION = ("_attention_forward_kernel", "_attention_backward_delta_kernel", "_attention_backward_kv_kernel",
             "_attention_backward_q_kernel")
WITH_DOTS = ("_attention_forward_kernel", "_attention_backward_kv_kernel", "_attention_backward_q_kernel")


# ---------------------------------------------------------------------------------------------
# The heuristics, on hand-written SASS.

SASS = """
        Function : kernel
        /*0000*/                   MOV R1, c[0x0][0x28] ;                /* 0x00000a0000017a02 */
        /*0010*/              @!P5 LDG.E.128 R36, desc[UR18][R40.64] ;   /* 0x000000122824d981 */
        /*0020*/                   LDG.E.U16 R2, desc[UR4][R2.64] ;      /* 0x0000000402027981 */
        /*0030*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ; /* 0x0000000c0804723c */
        /*0040*/                   IADD3 R5, R5, 0x1, RZ ;               /* 0x0000000105057810 */
        /*0050*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR12], RZ, !UPT ; /* 0x00e0 */
        /*0060*/                   NOP ;                                 /* 0x0000000000007918 */
        /*0070*/                   MUFU.EX2 R32, R36 ;                   /* 0x0000002400207308 */
        /*0080*/               @P0 BRA 0x50 ;                            /* 0xffffffe40010a947 */
        /*0090*/                   LDGSTS.E.BYPASS.LTC128B.128 [R51], desc[UR18][R22.64], !P2 ; /* 0x0 */
        /*00a0*/               @P1 BRA 0x30 ;                            /* 0xfffffffc00fc7947 */
        /*00b0*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ; /* 0x00e0 */
        /*00c0*/                   FFMA R3, R4, R5, R6 ;                 /* 0x00e0 */
        /*00d0*/               @P2 BRA 0xb0 ;                            /* 0xfffffffc00fc7947 */
        /*00e0*/                   EXIT ;                                /* 0x000000000000794d */
        /*00f0*/                   BRA 0xf0;                             /* 0xfffffffc00fc7947 */
"""


def test_main_loop_is_the_innermost_loop_with_a_tensor_core_instruction():
    """Loops: [0x30, 0xa0] holds the MMA loop [0x50, 0x80] (innermost: picked over its parent), and a
    sibling [0xb0, 0xd0] with as many MMAs comes later (the first wins a tie); the trap loop at
    0xf0 has no MMA."""
    code = sass.instructions(SASS)
    assert len(code) == 16 and code[8] == (0x80, "@P0 BRA 0x50")
    assert sass.main_loop(code) == (0x50, 0x80)
    assert sass.main_loop([c for c in code if c[0] < 0x50 or c[0] > 0xa0]) == (0xb0, 0xd0)
    assert sass.main_loop([c for c in code if "MMA" not in c[1]]) is None


def test_analyse_counts_per_score_and_loads_by_width():
    facts = sass.analyse(SASS, "_attention_forward_kernel", {"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4)
    assert facts["loop_instructions"] == 3  # 0x50 to 0x80, the NOP not counted
    assert facts["instructions_per_score"] == round(3 * 32 * 4 / (64 * 64), 2)
    assert (facts["hgmma"], facts["hmma"]) == (2, 1)
    assert facts["global_loads"] == {"128": 2, "16": 1}  # LTC128B is a cache hint, not a width
    assert sass.analyse(SASS, "_patch_embed_forward_kernel", {"BLOCK_M": 64}, 4)["instructions_per_score"] is None


def test_blocks_per_sm():
    assert sass.blocks_per_sm(128, 40960, 4) == 4  # 4 x 16K registers: the register file
    assert sass.blocks_per_sm(168, 147456, 4) == 1  # shared memory
    assert sass.blocks_per_sm(32, 128, 4) == 16  # threads: 2048 / 128
    assert sass.blocks_per_sm(None, 0, 4) is None


# ---------------------------------------------------------------------------------------------
# The compiled kernels.


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    """{(shape, dtype): [report entries of the attention kernels]}, one bench.sass run per shape."""
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("sass")
    environment = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    jobs = []
    for shapes, dtypes in RUNS:
        command = [sys.executable, "-m", "bench.sass", "--op", "attention", "--out", str(out / shapes[0])]
        command += [word for shape in shapes for word in ("--shape", shape)]
        command += [word for dtype in dtypes for word in ("--dtype", dtype)]
        jobs.append((shapes[0], command))
    finished, running = [], []
    while jobs or running:
        while jobs and len(running) < 2:  # the compiles are single-threaded: two at a time
            shape, command = jobs.pop(0)
            process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            running.append((shape, process))
        shape, process = running.pop(0)
        stdout, stderr = process.communicate(timeout=900)
        finished.append((shape, process.returncode, stdout, stderr))
    entries = {}
    for shape, returncode, stdout, stderr in finished:
        if returncode == sass.EXIT_CANNOT_COMPILE:
            pytest.skip(stderr.strip().splitlines()[-1])
        report = out / shape / "report.json"
        assert report.exists(), f"bench.sass --shape {shape} ... exited {returncode}:\n{stderr[-4000:]}"
        for entry in json.loads(report.read_text()):
            entries.setdefault((entry["shape"], entry["dtype"]), []).append(entry)
    return entries


def _described(entry) -> str:
    return f"{entry['shape']} {entry['dtype']} {entry['kernel']} {entry['config']}"


def test_every_shape_compiles_every_attention_kernel(compiled):
    assert sorted(compiled) == sorted(COMPILED)
    for entries in compiled.values():
        assert {e["kernel"] for e in entries} == set(ATTENTION)
        failed = [f"{_described(e)}: {e['error']}" for e in entries if "error" in e]
        assert not failed, "\n".join(failed)


def test_no_config_spills(compiled):
    spilled = [
        f"{_described(e)}: {e['spilled_bytes']} bytes, {e['local_memory_instructions']} LDL/STL"
        for entries in compiled.values() for e in entries
        if e["spilled_bytes"] != 0 or e["local_memory_instructions"] != 0
    ]
    assert not spilled, "\n".join(spilled)


def test_wgmma_and_no_mma_sync_at_head_dims_up_to_128(compiled):
    assert all(sass.SHAPES[shape].head_dim <= 128 for shape, _ in COMPILED)
    wrong = [
        f"{_described(e)}: {e['hgmma']} HGMMA, {e['hmma']} HMMA"
        for entries in compiled.values() for e in entries
        if e["kernel"] in WITH_DOTS and (e["hgmma"] == 0 or e["hmma"] != 0)
    ]
    assert not wrong, "\n".join(wrong)


def test_q_k_v_loads_are_vectorised(compiled):
    """No 16-bit (one element) or 8-bit global load at all: the 16-bit tensors come in 128-bit vectors
    (the fp32 statistics as 32-bit words)."""
    scalar = [
        f"{_described(e)}: loads by width {e['global_loads']}"
        for entries in compiled.values() for e in entries
        if e["global_loads"].get("128", 0) == 0 or set(e["global_loads"]) & {"16", "8"}
    ]
    assert not scalar, "\n".join(scalar)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_forward_main_loop_at_vit_b16_is_lean(compiled, dtype):
    forward = [e for e in compiled["vit_b16", dtype] if e["kernel"] == "_attention_forward_kernel"]
    best = min(forward, key=lambda e: e["instructions_per_score"])
    assert best["instructions_per_score"] <= 10.0, [(e["config"], e["instructions_per_score"]) for e in forward]


# ---------------------------------------------------------------------------------------------
# The patch projection's three GEMMs, at ViT-H/14 in bf16 (patch 14, where the forward's gathered
# addresses press hardest on the registers): every config they would try.


@pytest.fixture(scope="module")
def compiled_patch_embed(tmp_path_factory) -> list[dict]:
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("sass_patch_embed")
    environment = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "bench.sass", "--op", "patch_embed", "--shape", "vit_h14", "--dtype", "bf16",
               "--out", str(out)]
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=900, check=False)
    if result.returncode == sass.EXIT_CANNOT_COMPILE:
        pytest.skip(result.stderr.strip().splitlines()[-1])
    report = out / "report.json"
    assert report.exists(), f"bench.sass --op patch_embed exited {result.returncode}:\n{result.stderr[-4000:]}"
    return json.loads(report.read_text())


def test_patch_projection_neither_spills_nor_falls_to_mma_sync(compiled_patch_embed):
    kernels_seen = {e["kernel"] for e in compiled_patch_embed}
    assert kernels_seen == {"_patch_embed_forward_kernel", "_patch_embed_grad_weight_kernel", "_patch_embed_grad_images_kernel"}
    wrong = [
        f"{_described(e)}: {e.get('error') or ''} {e.get('spilled_bytes')} bytes spilled, {e.get('hgmma')} HGMMA, {e.get('hmma')} HMMA"
        for e in compiled_patch_embed
        if "error" in e or e["spilled_bytes"] != 0 or e["local_memory_instructions"] != 0 or e["hgmma"] == 0 or e["hmma"] != 0
    ]
    assert not wrong, "\n".join(wrong)


# ---------------------------------------------------------------------------------------------
# bench/gpu_check.py, which needs a GPU to do anything: it imports, and says so in one line.


def test_gpu_check_without_a_gpu_says_so_in_one_line():
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "bench.gpu_check"], cwd=ROOT, env=environment,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "bench.gpu_check: no CUDA GPU here (torch.cuda.is_available() is False): nothing checked or timed"
    ]


def test_gpu_check_table_ratios_are_to_the_fastest_peer():
    from bench import gpu_check

    timings = [
        {"case": "c", "provider": "vitriton", "role": "ours", "ms": 1.0, "inputs": "views",
         "tflops": 300.0, "roofline_fraction": 0.5, "bound": "compute"},
        {"case": "c", "provider": "slow", "role": "peer", "ms": 4.0, "inputs": "views"},
        {"case": "c", "provider": "fast", "role": "peer", "ms": 2.0, "inputs": "contiguous copies"},
        {"case": "c", "provider": "broken", "role": "peer", "error": "RuntimeError: no"},
        {"case": "d", "provider": "vitriton", "role": "ours", "ms": 1.0, "inputs": "views"},
    ]
    table = gpu_check.markdown(["header"], [{"shape": "s", "B, H, N, D": "1, 2, 3, 4", "result": "pass"}], timings)
    assert "| c | vitriton | 1.000 | 300.0 | 2.00x | 50% (compute) | views |" in table
    assert "| c | slow | 4.000 |  | 0.50x |  | views |" in table
    assert "| c | broken | | | | | RuntimeError: no |" in table
    assert "| d | vitriton | 1.000 |  | no peer ran |  | views |" in table
    assert "| s | 1, 2, 3, 4 | pass |" in table
