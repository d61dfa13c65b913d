"""The fused attention backward's Hopper machine code (``kernels/triton/attention_bwd_fused.py``), read
without a GPU: 5 GEMMs per tile, dQ by fp32 reductions, no spills.

At the four ViT shapes of ``bench.sass.SHAPES`` (ViT-B/16, ViT-L/16 at 384, ViT-H/14, SigLIP-So400m;
q, k, v views of a fused qkv), bf16 and fp16, the launches a real backward makes are recorded with
the fused path forced (``launch.FUSED_BACKWARD_MIN_KEYS`` at 0: ViT-B/16 and ViT-H/14 are below the
switch-over) and compiled for sm_90 once per autotune config the pruner keeps there
(``bench.sass``). Each compilation must:
- spill nothing (ptxas's count, and no LDL/STL in the SASS) and use wgmma only (HGMMA, no HMMA);
- hold in its main loop (``bench.sass.main_loop``) the dQ reductions, ``REDG.E.ADD.F32...``
  (Triton's relaxed ``tl.atomic_add`` whose result is unused; vectorised, ``.F32x4``);
- hold in its main loop exactly 5 GEMMs per head-dim piece (``mma_groups``): q k^T, dO v^T, P^T dO,
  dS^T q, dS k, where the pair of kernels recomputes q k^T and dO v^T (7). With the head dim split
  (72 and 80 as 64 + 16) each GEMM is one group per piece: 10;
- cost at most 15 instructions per score (loop instructions * 32 * warps / (BLOCK_M * BLOCK_N)),
  the head dim split included. The pair costs 17.4 at D = 64 (dK/dV 9.5 + dQ 7.9, best configs).
  With the split the fused loop was 16.9-17.1 until the lean body read one log-sum-exp per row
  (``tiles._store_log_sum_exp``: one FFMA per score, not an FFMA and an FADD) from rows padded to
  16 floats in memory (``launch._dense_stats``: 64-bit loads, not 32-bit).
The compiles run in two subprocesses (TRITON_INTERPRET=0), one per dtype, about a minute on 2
cores; where the pinned toolchain cannot compile, the tests fail (tests/machine/toolchain.py).
"""

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from bench import sass
from tests.machine.toolchain import Progress, cannot_compile, import_triton

ROOT = Path(__file__).resolve().parents[2]
SHAPES = ("vit_b16", "vit_l16_384", "vit_h14", "siglip_so400m")
DTYPES = ("bf16", "fp16")
FUSED = "_attention_backward_fused_kernel"
GEMMS = 5  # per tile and head-dim piece
MAX_PER_SCORE = 15.0
_SKIP = "SKIP: "
pytestmark = [pytest.mark.slow, pytest.mark.subprocess]


# ---------------------------------------------------------------------------------------------
# Reading the SASS.


def mma_groups(code: list[tuple[int, str]], first: int, last: int) -> int:
    """wgmma groups laid out in [first, last] of ``bench.sass.instructions(sass)``.

    A group is one tl.dot as ptxas lays it out: ``WARPGROUP.ARRIVE`` (wgmma.fence), then HGMMA
    instructions, one per 16-deep k-step, each accumulating into the same registers, the last one
    carrying the ``gsb0`` scoreboard (wgmma.commit_group), which ``WARPGROUP.DEPBAR`` waits on. So
    the groups are counted by their committing HGMMA; every HGMMA must lie between an ARRIVE and its
    group's commit (else the count is not of groups: an AssertionError says so).
    """
    groups, open_group = 0, False
    for address, text in code:
        if not first <= address <= last:
            continue
        base = sass._base(text)
        if base == "WARPGROUP" and ".ARRIVE" in sass._opcode(text):
            open_group = True
        elif base == "HGMMA":
            assert open_group, f"HGMMA outside a WARPGROUP.ARRIVE group at {address:#x}: {text}"
            if "gsb0" in text:
                groups += 1
                open_group = False
    return groups


def reductions(code: list[tuple[int, str]], first: int, last: int) -> list[str]:
    """The fp32 add-reductions (``RED``/``REDG`` ``.ADD.F32``, any width) in [first, last], by opcode."""
    return [
        sass._opcode(text) for address, text in code
        if first <= address <= last and sass._base(text) in ("RED", "REDG") and ".ADD.F32" in sass._opcode(text)
    ]


def narrow_mmas(code: list[tuple[int, str]], first: int, last: int) -> tuple[int, int]:
    """(inside [first, last], outside it) HGMMAs 16 columns wide: the narrow last block's (16 query
    rows, ``_backward_kv_tail`` with ADD_GRAD_Q), absent from the main loop where the head dim is whole."""
    narrow = [address for address, text in code if re.match(r"HGMMA\.\d+x16x", sass._opcode(text))]
    inside = sum(first <= address <= last for address in narrow)
    return inside, len(narrow) - inside


# ---------------------------------------------------------------------------------------------
# Run in a subprocess (TRITON_INTERPRET=0): record, compile, read; one JSON line per compilation.


def _main(dtype_name: str) -> None:
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run with TRITON_INTERPRET=0"
    reason = sass.probe_api()
    if reason is not None:
        print(_SKIP + reason, flush=True)
        return
    sass.enable_ptxas_log()
    try:
        sass.install_recorder()
    except sass.CannotCompile as error:
        print(_SKIP + str(error), flush=True)
        return
    from kernels.triton import launch

    launch.FUSED_BACKWARD_MIN_KEYS = 0  # the fused path at every shape
    for name in SHAPES:
        shape = sass.SHAPES[name]
        launches = sass.attention_launches(shape.batch, shape.heads, shape.tokens, shape.head_dim, sass.DTYPES[dtype_name])
        [(kernel, args, kwargs)] = [launch for launch in launches if getattr(launch[0], "fn", None).__name__ == FUSED]
        fn, configs = sass.variants(kernel, args, kwargs)
        for config, num_warps, num_stages in configs:
            result = {"shape": name, "dtype": dtype_name, "split": kwargs["SPLIT_D"],
                      "config": {**config, "num_warps": num_warps, "num_stages": num_stages}}
            start = time.perf_counter()
            try:
                facts, cubin = sass.compile_launch(fn, args, {**kwargs, **config}, num_warps, num_stages)
            except Exception as error:  # noqa: BLE001 - reported by the test, with the shape and config
                result["error"] = f"{type(error).__name__}: {error}"[-4000:]
            else:
                code_text = sass.disassemble(cubin)
                code = sass.instructions(code_text)
                read = sass.analyse(code_text, fn.__name__, config, num_warps)
                loop = sass.main_loop(code)
                result.update(
                    registers=facts["registers"], spilled_bytes=facts["spill_bytes"],
                    local_memory_instructions=read["local_memory_instructions"], hgmma=read["hgmma"],
                    hmma=read["hmma"], loop_instructions=read["loop_instructions"],
                    per_score=round(read["loop_instructions"] * 32 * num_warps / (config["BLOCK_M"] * config["BLOCK_N"]), 2)
                    if loop else None,
                    mma_groups=mma_groups(code, *loop) if loop else None,
                    reductions=reductions(code, *loop) if loop else [],
                    narrow_mmas=narrow_mmas(code, *loop) if loop else None,
                )
            result["seconds"] = round(time.perf_counter() - start, 2)
            print(json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# The tests.


@pytest.fixture(scope="module")
def compiled(request, tmp_path_factory) -> list[dict]:
    """One entry per (shape, dtype, config): two subprocesses, one per dtype, side by side."""
    import_triton()
    progress = Progress(request.config, "tests/machine/test_fused_backward_sass.py, sm_90:")
    progress(f"compiling the fused backward at {len(SHAPES)} shapes in {' and '.join(DTYPES)}, two processes")
    entries = []
    with contextlib.ExitStack() as files:
        processes = []
        for dtype_name in DTYPES:
            cache = tmp_path_factory.mktemp(f"triton_cache_{dtype_name}")  # fresh: ptxas reports registers and spills
            environment = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT), "TRITON_CACHE_DIR": str(cache)}
            stderr = files.enter_context(tempfile.TemporaryFile("w+"))
            process = subprocess.Popen(
                [sys.executable, "-m", "tests.machine.test_fused_backward_sass", dtype_name], cwd=ROOT, env=environment,
                stdout=subprocess.PIPE, stderr=stderr, text=True,
            )
            processes.append((dtype_name, process, stderr))
        for dtype_name, process, stderr in processes:
            try:
                stdout, _ = process.communicate(timeout=600)
            except subprocess.TimeoutExpired:
                process.kill()
                stdout, _ = process.communicate()
            stderr.seek(0)
            lines = stdout.splitlines()
            skipped = [line for line in lines if line.startswith(_SKIP)]
            if skipped:
                cannot_compile(skipped[0][len(_SKIP):])
            assert process.returncode == 0, f"{dtype_name}: exit {process.returncode}\n{stderr.read()[-4000:]}"
            entries += [json.loads(line) for line in lines if line.startswith("{")]
            progress(f"{dtype_name}: {sum(1 for line in lines if line.startswith('{'))} compiled")
    return entries


def _described(entry) -> str:
    return f"{entry['shape']} {entry['dtype']} {entry['config']}"


def test_every_shape_and_dtype_compiles(compiled):
    assert sorted({(e["shape"], e["dtype"]) for e in compiled}) == sorted((s, d) for s in SHAPES for d in DTYPES)
    failed = [f"{_described(e)}: {e['error']}" for e in compiled if "error" in e]
    assert not failed, "\n".join(failed)


def test_no_spills_and_wgmma_only(compiled):
    wrong = [
        f"{_described(e)}: {e['spilled_bytes']} bytes spilled, {e['local_memory_instructions']} LDL/STL, "
        f"{e['hgmma']} HGMMA, {e['hmma']} HMMA"
        for e in compiled
        if e["spilled_bytes"] != 0 or e["local_memory_instructions"] != 0 or e["hgmma"] == 0 or e["hmma"] != 0
    ]
    assert not wrong, "\n".join(wrong)


def test_main_loop_holds_the_dq_reductions(compiled):
    missing = [f"{_described(e)}: {e['reductions']}" for e in compiled if not e["reductions"]]
    assert not missing, "\n".join(missing)
    assert all(opcode.startswith(("RED.E.ADD.F32", "REDG.E.ADD.F32")) for e in compiled for opcode in e["reductions"])


def test_main_loop_holds_five_gemms_per_head_dim_piece(compiled):
    wrong = [
        f"{_described(e)}: {e['mma_groups']} wgmma groups, split {e['split']}"
        for e in compiled if e["mma_groups"] != GEMMS * (2 if e["split"] else 1)
    ]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("shape", SHAPES)
def test_at_most_15_instructions_per_score(compiled, shape):
    entries = [e for e in compiled if e["shape"] == shape]
    over = [f"{_described(e)}: {e['per_score']}" for e in entries if e["per_score"] > MAX_PER_SCORE]
    assert entries and not over, "\n".join(over)


def test_narrow_last_block_outside_the_main_loop(compiled):
    """Where the head dim is whole, the 16-row last block's MMAs (dQ computed as k^T dS there, so
    a wgmma too) lie outside the main loop, which has none; split, there is no narrow block."""
    whole = [e for e in compiled if not e["split"]]
    wrong = [f"{_described(e)}: 16-wide HGMMAs (inside, outside) the loop {e['narrow_mmas']}"
             for e in whole if e["narrow_mmas"][0] != 0 or e["narrow_mmas"][1] == 0]
    assert whole and not wrong, "\n".join(wrong)



if __name__ == "__main__":
    _main(sys.argv[1])
