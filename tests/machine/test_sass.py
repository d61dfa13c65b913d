"""The attention kernels' Hopper machine code keeps the lean shape it was given, checked without a GPU.

``bench/sass.py`` compiles every kernel for sm_90 with Triton's compiler and bundled ptxas (as
``tests/machine/test_gpu_compile.py`` does) and reads the SASS. At the four ViT shapes of ``bench.sass.SHAPES``
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
once per module, in three subprocesses (TRITON_INTERPRET=0) two at a time, a line on the terminal
as each (shape, dtype) is done (about 2 minutes on 2 cores); where the pinned toolchain cannot
compile, the tests fail (tests/machine/toolchain.py). The SASS-reading heuristics are tested on
hand-written SASS in test_sass_reading.py.
"""

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from bench import sass
from tests.machine.toolchain import Progress, cannot_compile, import_triton

ROOT = Path(__file__).resolve().parents[2]
# (shapes, dtypes) of each bench.sass run, the longest first
RUNS = [(("vit_b16",), ("bf16", "fp16")), (("vit_l16_384", "vit_h14"), ("bf16",)), (("siglip_so400m",), ("bf16", "fp16"))]
COMPILED = [(shape, dtype) for shapes, dtypes in RUNS for shape in shapes for dtype in dtypes]
ATTENTION = ("_attention_forward_kernel", "_attention_backward_delta_kernel", "_attention_backward_kv_kernel",
             "_attention_backward_q_kernel")
WITH_DOTS = ("_attention_forward_kernel", "_attention_backward_kv_kernel", "_attention_backward_q_kernel")
pytestmark = [pytest.mark.slow, pytest.mark.subprocess]  # every test here reads compiles for sm_90


# ---------------------------------------------------------------------------------------------
# The compiled kernels.


def run_bench_sass(jobs: list[tuple[Path, str, tuple, tuple]], progress: Progress) -> list[tuple[Path, int, str]]:
    """``python -m bench.sass`` for each (out, op, shapes, dtypes), two at a time (each compiles on one
    core), with a line on the terminal as each (shape, dtype) is done: [(out, exit status, stderr)].

    bench.sass compiles shape by shape, dtype by dtype, into ``out/<shape>-<dtype>/``: a (shape,
    dtype) is done when the next one's folder appears, or when the run ends."""
    environment = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    pending, running, finished = list(jobs), [], []
    with contextlib.ExitStack() as files:
        while pending or running:
            while pending and len(running) < 2:  # the compiles are single-threaded: two at a time
                out, op, shapes, dtypes = pending.pop(0)
                command = [sys.executable, "-m", "bench.sass", "--op", op, "--out", str(out)]
                command += [word for shape in shapes for word in ("--shape", shape)]
                command += [word for dtype in dtypes for word in ("--dtype", dtype)]
                stderr = files.enter_context(tempfile.TemporaryFile("w+"))
                process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.DEVNULL,
                                           stderr=stderr, text=True)
                folders = [f"{shape}-{dtype}" for shape in shapes for dtype in dtypes]
                running.append((out, op, folders, process, stderr, time.monotonic()))
            time.sleep(0.5)
            for job in list(running):
                out, op, folders, process, stderr, started = job
                if process.poll() is None and time.monotonic() - started > 900:
                    process.kill()
                ended = process.poll() is not None
                while folders and (ended or (len(folders) > 1 and (out / folders[1]).exists())):
                    done = out / folders.pop(0)
                    if done.exists():
                        progress(f"{op} {done.name}: {len(list(done.glob('*.sass')))} compiled")
                if ended:
                    stderr.seek(0)
                    finished.append((out, process.returncode, stderr.read()))
                    running.remove(job)
    return finished


@pytest.fixture(scope="module")
def compiled(request, tmp_path_factory) -> dict:
    """{(shape, dtype): [report entries of the attention kernels]}, one bench.sass run per shape."""
    import_triton()
    out = tmp_path_factory.mktemp("sass")
    progress = Progress(request.config, "tests/machine/test_sass.py, sm_90:")
    progress(f"compiling the attention kernels at {len(COMPILED)} shapes and dtypes, {len(RUNS)} runs, two at a time")
    finished = run_bench_sass([(out / shapes[0], "attention", shapes, dtypes) for shapes, dtypes in RUNS], progress)
    entries = {}
    for run_out, returncode, stderr in finished:
        if returncode == sass.EXIT_CANNOT_COMPILE:
            cannot_compile(stderr.strip().splitlines()[-1])
        report = run_out / "report.json"
        assert report.exists(), f"bench.sass --shape {run_out.name} ... exited {returncode}:\n{stderr[-4000:]}"
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
def compiled_patch_embed(request, tmp_path_factory) -> list[dict]:
    import_triton()
    out = tmp_path_factory.mktemp("sass_patch_embed")
    progress = Progress(request.config, "tests/machine/test_sass.py, sm_90:")
    progress("compiling the patch projection at vit_h14 bf16")
    [(_, returncode, stderr)] = run_bench_sass([(out, "patch_embed", ("vit_h14",), ("bf16",))], progress)
    if returncode == sass.EXIT_CANNOT_COMPILE:
        cannot_compile(stderr.strip().splitlines()[-1])
    report = out / "report.json"
    assert report.exists(), f"bench.sass --op patch_embed exited {returncode}:\n{stderr[-4000:]}"
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
