"""The FP8 forward's machine code on Hopper (sm_90) and Blackwell (sm_100), compiled without a GPU
(issue 23, item 4).

``python -m bench.sass --dtype fp8 --arch 90|100`` compiles ``_attention_fp8_forward_kernel`` at the
four named ViT shapes for every config its autotuner may try there, with q and k views of a fused
qkv and v laid out as ``kernels.quantize_fp8`` makes it (keys contiguous). Each must have FP8 MMA in
its main loop (wgmma QGMMA on sm_90, tcgen05 UTCQMMA on sm_100) and no other kind, no STS in the
loop (a row-major V costs a transpose through shared memory there on sm_90: 32 STS and 303 -> 362
instructions per iteration at ViT-B/16, 64x64), no spill, and at most 12 instructions per score
(measured 6.6-11.6). About a minute on 2 cores.
"""

import json
from pathlib import Path

import pytest

from bench import sass
from tests.machine.test_sass import run_bench_sass
from tests.machine.toolchain import Progress, cannot_compile, import_triton

SHAPES = tuple(sass.SHAPES)  # vit_b16, vit_l16_384, vit_h14, siglip_so400m
ARCHS = (90, 100)
MMA = {90: "QGMMA", 100: "UTCQMMA"}
MAX_INSTRUCTIONS_PER_SCORE = 12.0
pytestmark = [pytest.mark.slow, pytest.mark.subprocess]


@pytest.fixture(scope="module")
def compiled(request, tmp_path_factory) -> list[dict]:
    import_triton()
    out = tmp_path_factory.mktemp("sass_fp8")
    progress = Progress(request.config, "tests/machine/test_fp8_sass.py:")
    entries = []
    for arch in ARCHS:
        progress(f"compiling the FP8 forward for sm_{arch} at {', '.join(SHAPES)}")
        halves = (SHAPES[:2], SHAPES[2:])
        jobs = [(out / f"sm{arch}-{i}", "attention", shapes, ("fp8",)) for i, shapes in enumerate(halves)]
        for run_out, returncode, stderr in run_bench_sass(jobs, progress, arch=arch):
            if returncode == sass.EXIT_CANNOT_COMPILE:
                cannot_compile(stderr.strip().splitlines()[-1])
            report = run_out / "report.json"
            assert report.exists(), f"bench.sass --arch {arch} --dtype fp8 exited {returncode}:\n{stderr[-4000:]}"
            for entry in json.loads(report.read_text()):
                if "sass" in entry:
                    entry["sass"] = str(run_out / entry["sass"])
                entries.append(entry)
    return entries


def _described(entry) -> str:
    return f"sm_{entry['arch']} {entry['shape']} {entry['kernel']} {entry['config']}"


def _loop_opcodes(entry) -> list[str]:
    code = sass.instructions(Path(entry["sass"]).read_text())
    loop = sass.main_loop(code)
    assert loop is not None, f"{_described(entry)}: no loop with an MMA"
    return [sass._base(text) for address, text in code if loop[0] <= address <= loop[1]]


def test_every_config_compiles(compiled):
    assert {(e["arch"], e["shape"]) for e in compiled} == {(a, s) for a in ARCHS for s in SHAPES}
    assert {e["kernel"] for e in compiled} == {"_attention_fp8_forward_kernel"}
    failed = [f"{_described(e)}: {e['error']}" for e in compiled if "error" in e]
    assert not failed, "\n".join(failed)
    # What the pruning tries: four tiles at head dim 64; at 72 and 80 (split 64 + 32) three on sm_90,
    # two on sm_100 (64x64 spills there).
    tiles = {(e["arch"], e["shape"], e["config"]["BLOCK_M"], e["config"]["BLOCK_N"], e["config"]["num_warps"])
             for e in compiled}
    assert sum(shape == "vit_b16" for _, shape, *_ in tiles) == 4 * len(ARCHS)
    assert {tile[2:] for tile in tiles if tile[:2] == (90, "siglip_so400m")} == {(64, 64, 4), (128, 64, 8), (128, 128, 8)}
    assert {tile[2:] for tile in tiles if tile[:2] == (100, "siglip_so400m")} == {(128, 64, 8), (128, 128, 8)}


def test_fp8_mma_in_the_main_loop_and_no_other_kind(compiled):
    wrong = []
    for e in compiled:
        opcodes = _loop_opcodes(e)
        if MMA[e["arch"]] not in opcodes or e["hgmma"] or e["hmma"] or (e["arch"] == 90 and e["tcgen05_mma"]):
            wrong.append(f"{_described(e)}: loop {sorted({o for o in opcodes if 'MMA' in o})}")
    assert not wrong, "\n".join(wrong)


def test_no_transpose_of_v_through_shared_memory_in_the_loop(compiled):
    stores = [f"{_described(e)}: {opcodes.count('STS')} STS" for e in compiled if (opcodes := _loop_opcodes(e)).count("STS")]
    assert not stores, "\n".join(stores)


def test_no_spills_and_instructions_per_score(compiled):
    spilled = [f"{_described(e)}: {e['spilled_bytes']} bytes" for e in compiled
               if e["spilled_bytes"] != 0 or e["local_memory_instructions"] != 0]
    assert not spilled, "\n".join(spilled)
    heavy = [f"{_described(e)}: {e['instructions_per_score']}" for e in compiled
             if e["instructions_per_score"] is None or e["instructions_per_score"] > MAX_INSTRUCTIONS_PER_SCORE]
    assert not heavy, "\n".join(heavy)


_VARLEN_FP8 = """
import json, sys, torch
from bench import sass
sass.enable_ptxas_log()
sass.install_recorder()
fp8 = sys.modules["kernels.triton.attention_fp8"]
lengths, heads, head_dim = [256, 729, 1024], 16, 64
total, meta = sum(lengths), {"device": "meta", "dtype": torch.float8_e4m3fn}
q, k, v = torch.empty(total, 3, heads, head_dim, **meta).unbind(1)  # v row-major: quantize_fp8's packed default
cu = torch.empty(len(lengths) + 1, device="meta", dtype=torch.int32)
descales = torch.empty(len(lengths), heads, 3, device="meta", dtype=torch.float32)
entries = []
for arch in (90, 100):
    sys.modules["kernels.triton.configs"].AHEAD_OF_TIME_ARCH = arch
    launches = sass.recorded(lambda: fp8.attention_fp8_varlen_forward._init_fn(
        q, k, v, cu, cu, max(lengths), max(lengths), descales, head_dim**-0.5, False, torch.bfloat16))
    for kernel, args, kwargs in launches:
        fn, configs = sass.variants(kernel, args, kwargs)
        for config, warps, stages in configs:
            facts, cubin = sass.compile_launch(fn, args, {**kwargs, **config}, warps, stages, arch)
            text = sass.disassemble(cubin)
            code = sass.instructions(text)
            loop = sass.main_loop(code)
            opcodes = [sass._base(t) for a, t in code if loop and loop[0] <= a <= loop[1]]
            facts.update(sass.analyse(text, fn.__name__, config, warps))
            entries.append({"arch": arch, "config": config, "loop_opcodes": sorted(set(opcodes)),
                            "loop_sts": opcodes.count("STS"), **facts})
print(json.dumps(entries))
"""


def test_packed_fp8_forward_compiles_clean(tmp_path):
    """The FP8 kernel on packed sequences (VARLEN, views of a packed qkv, v row-major as quantize_fp8
    leaves packed inputs), sm_90 and sm_100: FP8 MMA in the loop, no spill, at most 12 instructions
    per score; on sm_100 no STS in the loop (sm_90 transposes V there: 16-32 STS, 326-597 instructions)."""
    import os
    import subprocess
    import sys

    from tests.machine.test_sass import ROOT

    environment = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT), "TRITON_CACHE_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", _VARLEN_FP8], cwd=ROOT, env=environment, capture_output=True,
                            text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    entries = json.loads(result.stdout.strip().splitlines()[-1])
    assert {e["arch"] for e in entries} == set(ARCHS)
    for e in entries:
        assert MMA[e["arch"]] in e["loop_opcodes"] and (e["arch"] == 90 or e["loop_sts"] == 0), e
        assert e["spill_bytes"] == 0 and e["instructions_per_score"] <= MAX_INSTRUCTIONS_PER_SCORE, e
