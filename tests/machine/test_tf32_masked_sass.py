"""TF32 dQ and forward under a mask, causal or dropout, compiled for sm_90 and sm_100 without a GPU: clean.

fp32 inputs with ``allow_tf32`` run the tensor cores as TF32. Masked, the dQ kernel's light tiles
(64x32 and 128x32, 2 stages) spilled: with a bias gradient at ViT-B/16 and SigLIP (sm_90 72-448 bytes,
sm_100 284-1012), and at SigLIP under a bias, a bool mask or causal too (sm_90 64x32 56-136, sm_100
128x32 168-428). Such launches now try ``configs.TF32_MASKED``'s tile, 64x16 with 2 stages, on both
architectures. The forward's 64x32 tile (3 stages) spills on sm_100 under a bool mask with causal
(96-576 bytes): there it tries ``configs.TF32_MASKED_SM100``'s 64x16 (sm_90's is clean). Compiled
here: every dQ and forward config the pruner keeps, under a bias with its gradient, a bool mask with
causal, and dropout, at ViT-B/16 (D = 64) and SigLIP (72, split 64 + 16), for each architecture: no
spill, tensor-core MMA (wgmma on sm_90, tcgen05 on sm_100). dK/dV compiles clean there as it was
(checked when this was written, not held here: TF32 compiles are slow). About a minute on 2 cores.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.machine.test_sass import ROOT
from tests.machine.toolchain import cannot_compile, import_triton

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

_COMPILE = """
import json, sys, torch
from bench import sass
reason = sass.probe_api(int(sys.argv[1]))
if reason is not None:
    print("SKIP: " + reason)
    sys.exit(0)
sass.enable_ptxas_log()
sass.install_recorder()
arch = int(sys.argv[1])
sys.modules["kernels.triton.configs"].AHEAD_OF_TIME_ARCH = arch
cases = [dict(mask_kind="bias", bias_grad=True), dict(mask_kind="bool", is_causal=True), dict(dropout_p=0.1)]
entries = []
for shape_name in ("vit_b16", "siglip_so400m"):
    shape = sass.SHAPES[shape_name]
    for case in cases:
        launches = sass.attention_launches(shape.batch, shape.heads, shape.tokens, shape.head_dim, torch.float32,
                                           allow_tf32=True, **case)
        for kernel, args, kwargs in launches:
            fn, configs = sass.variants(kernel, args, kwargs)
            if fn.__name__ not in ("_attention_backward_q_kernel", "_attention_forward_kernel"):
                continue
            for config, warps, stages in configs:
                facts, cubin = sass.compile_launch(fn, args, {**kwargs, **config}, warps, stages, arch)
                facts.update(sass.analyse(sass.disassemble(cubin), fn.__name__, config, warps))
                entries.append({"arch": arch, "shape": shape_name, "case": case, "kernel": fn.__name__,
                                "tile": [config["BLOCK_M"], config["BLOCK_N"], warps, stages], **facts})
print(json.dumps(entries))
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> list[dict]:
    """Both architectures side by side, one subprocess each (TRITON_INTERPRET=0, a fresh cache)."""
    import_triton()
    processes = []
    for arch in (90, 100):
        cache = tmp_path_factory.mktemp(f"triton_cache_{arch}")
        environment = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT), "TRITON_CACHE_DIR": str(cache)}
        processes.append(subprocess.Popen([sys.executable, "-c", _COMPILE, str(arch)], cwd=ROOT, env=environment,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    entries = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=900)
        assert process.returncode == 0, stderr[-3000:]
        last = stdout.strip().splitlines()[-1]
        if last.startswith("SKIP: "):
            cannot_compile(last[len("SKIP: "):])
        entries += json.loads(last)
    return entries


def test_masked_tf32_dq_and_forward_compile_clean_on_sm_90_and_sm_100(compiled):
    assert {(e["arch"], e["shape"]) for e in compiled} == {(a, s) for a in (90, 100) for s in ("vit_b16", "siglip_so400m")}
    wrong = [e for e in compiled if e["spill_bytes"] or e["local_memory_instructions"] or e["hmma"]
             or not (e["hgmma"] if e["arch"] == 90 else e["tcgen05_mma"])]
    assert not wrong, wrong
    assert {tuple(e["tile"]) for e in compiled if e["kernel"] == "_attention_backward_q_kernel"} == {(64, 16, 4, 2)}
    forward = {(e["arch"], tuple(e["tile"])) for e in compiled if e["kernel"] == "_attention_forward_kernel"}
    assert forward == {(90, (64, 32, 4, 3)), (100, (64, 16, 4, 2))}
