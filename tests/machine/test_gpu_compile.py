"""The Triton kernels compile for a real GPU (H100, sm_90), checked on a machine without one.

The CPU kernel tests run Triton's interpreter, which executes the kernels' Python in numpy: it never
lowers them to GPU layouts, pipelines their loads, allocates shared memory or registers, or runs
ptxas, so a kernel can pass every interpreter test and still fail to compile, or not fit, on a GPU.
So here the kernels go through the real compiler ahead of time: Triton's front end, its NVIDIA
passes, LLVM and Triton's bundled ptxas, for sm_90, as a launch on an H100 would compile them,
minus the launch.

What is compiled is what the launchers launch: the custom ops' Python bodies run on "meta"
tensors (no memory, no GPU) with ``torch.library.wrap_triton`` replaced by a recorder, so the
arguments, the constexprs and the specialisation a launch gives them (an int equal to 1 becomes a
constant; ints that are multiples of 16 and 16-byte aligned pointers get ``tt.divisibility``) are
those of a real call at that shape (``bench/sass.py`` records and compiles). An autotuned kernel is
compiled once per config it would try there (after its pruning) where the case says so: at run time
the autotuner silently skips a config that fails to compile, so a broken config would otherwise only
show up as a slower kernel. Each kernel must also fit the target's shared memory per block (227 KB
on sm_90).

The compilation runs in one subprocess with TRITON_INTERPRET=0 (with the interpreter on,
``@triton.jit`` gives interpreter functions, which cannot be compiled). On a GPU machine this test
is skipped: there the kernel tests compile and run the kernels for real. If the installed Triton
lacks the ahead-of-time API used here (``triton.compile(ASTSource(...), target=GPUTarget(...))``),
or cannot compile a trivial kernel for sm_90 at all (no ptxas), the test fails on the pinned
toolchain (Triton 3.6-3.8 with its bundled ptxas on Linux x86_64) and elsewhere skips, saying what
the platform lacks (tests/machine/toolchain.py). Each case prints a line on the terminal once compiled.

``TRITON_INTERPRET=0 python -m tests.machine.test_gpu_compile`` prints one JSON line per compilation (shared
memory, registers, spills); ``pytest -s`` prints them as a table.
"""

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from bench import sass
from tests.machine.toolchain import Progress, cannot_compile, import_triton

ROOT = Path(__file__).resolve().parents[2]
# The most shared memory one block may use (the opt-in maximum), in bytes: 227 KB on H100, 163 KB on A100.
SHARED_MEMORY_PER_BLOCK = {90: 232448, 80: 166912}
TARGET_ARCH = 90
_SKIP = "SKIP: "


# ---------------------------------------------------------------------------------------------
# Run in the subprocess (TRITON_INTERPRET=0): record the launches, compile them (bench/sass.py).


def _cases():
    """(name, launches, configs): ``configs`` is "all" the configs the autotuner tries there (after its
    pruning), or for each autotuned kernel the index among those of the one to compile (0 where not named)."""
    forward, kv, q = "_attention_forward_kernel", "_attention_backward_kv_kernel", "_attention_backward_q_kernel"
    batch, heads, tokens = 32, 12, 197

    def attention(dtype, head_dim, *args, **kwargs):
        return sass.attention_launches(batch, heads, tokens, head_dim, dtype, *args, **kwargs)

    def patch_embed(linear_weight, grad_weight_splits):  # ViT-B/16's, at 64 images
        return sass.patch_embed_launches(
            64, 224, 16, 768, torch.bfloat16, linear_weight=linear_weight, grad_weight_splits=grad_weight_splits
        )

    return [
        ("ViT-B/16 attention: D=64 bf16", attention(torch.bfloat16, 64), "all"),
        ("D=80 fp16, bool mask, causal", attention(torch.float16, 80, "bool", is_causal=True),
         {forward: -1, kv: -1, q: -1}),
        ("D=96 bf16, bias with grad, dropout",
         attention(torch.bfloat16, 96, "bias", dropout_p=0.1, bias_grad=True), {kv: -1, q: -1}),
        ("D=64 fp32, exact dots", attention(torch.float32, 64, allow_tf32=False), {}),
        ("D=80 fp32, TF32 dots", attention(torch.float32, 80, allow_tf32=True), {}),
        ("Packed images (varlen): D=80 bf16, Qwen2.5-VL-like",
         sass.varlen_launches([1024, 256, 64, 3000], 16, 80, torch.bfloat16), "all"),
        ("Packed, causal and dropout: D=72 fp16", sass.varlen_launches([729, 33, 1], 16, 72, torch.float16,
         is_causal=True, dropout_p=0.1), {forward: -1, kv: -1, q: -1}),
        ("ViT-B/16 patch embed: bf16, Conv2d weight", patch_embed(False, 8), {}),
        ("ViT-B/16 patch embed: bf16, Linear-weight view", patch_embed(True, 1),
         dict.fromkeys(["_patch_embed_forward_kernel", "_patch_embed_grad_weight_kernel",
                        "_patch_embed_grad_images_kernel"], 4)),
    ]


def _main(arch=TARGET_ARCH):
    """Compile every case; one JSON line per compilation, or one SKIP line."""
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run with TRITON_INTERPRET=0"
    reason = sass.probe_api(arch)
    if reason is not None:
        print(_SKIP + reason, flush=True)
        return
    sass.enable_ptxas_log()  # registers and spills, where this Triton can tell
    try:
        sass.install_recorder()
    except sass.CannotCompile as error:  # e.g. a torch whose triton_op hides its Python body
        print(_SKIP + str(error), flush=True)
        return

    for name, launches, which in _cases():
        for kernel, args, kwargs in launches:
            fn, variants = sass.variants(kernel, args, kwargs)  # the configs the autotuner tries there
            if which != "all":
                variants = [variants[which.get(fn.__name__, 0) % len(variants)]]
            for config, num_warps, num_stages in variants:
                described = {**config, "warps": num_warps, "stages": num_stages}
                result = {"case": name, "kernel": fn.__name__, "config": described}
                start = time.perf_counter()
                try:
                    facts, _ = sass.compile_launch(fn, args, {**kwargs, **config}, num_warps, num_stages, arch)
                    result.update(facts, ok=True)
                except Exception as error:  # noqa: BLE001 - reported by the test, with the kernel and config
                    result.update(ok=False, error=f"{type(error).__name__}: {error}"[-4000:])
                result["seconds"] = round(time.perf_counter() - start, 2)
                print(json.dumps(result), flush=True)


def _table(results) -> str:
    lines = []
    for r in results:
        config = " ".join(f"{k}={v}" for k, v in r["config"].items())
        status = "FAILED"
        if r["ok"]:
            status = f"shared {r['shared']:>6} B  regs {r['registers']}  spills {r['spill_bytes']} B"
        lines.append(f"{r['case']:<46} {r['kernel']:<32} {config:<52} {status}  ({r['seconds']} s)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The test.


def _compile_in_a_subprocess(environment: dict, progress: Progress) -> tuple[int, list[str], str]:
    """Run this module's ``_main`` with the interpreter off: (exit status, stdout lines, stderr), with a
    line on the terminal as each case is compiled."""
    with tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.machine.test_gpu_compile"], env=environment, cwd=ROOT,
            stdout=subprocess.PIPE, stderr=stderr, text=True,
        )
        watchdog = threading.Timer(900, process.kill)
        watchdog.start()
        lines, case, count = [], None, 0
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            name = json.loads(line)["case"] if line.startswith("{") else None
            if case is not None and name != case:
                progress(f"{case}: {count} compiled")
                count = 0
            case, count = name, count + 1
        if case is not None:
            progress(f"{case}: {count} compiled")
        process.wait()
        watchdog.cancel()
        stderr.seek(0)
        return process.returncode, lines, stderr.read()


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernel tests compile the kernels for real")
def test_kernels_compile_for_sm90_and_fit_shared_memory(request, tmp_path):
    import_triton()
    progress = Progress(request.config, "tests/machine/test_gpu_compile.py, sm_90:")
    progress("compiling the kernels case by case, in a subprocess")
    # A fresh cache: every kernel is compiled (and ptxas reports on it), none comes from an earlier run.
    environment = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT), "TRITON_CACHE_DIR": str(tmp_path)}
    returncode, stdout, stderr = _compile_in_a_subprocess(environment, progress)
    skipped = [line for line in stdout if line.startswith(_SKIP)]
    if skipped:
        cannot_compile(skipped[0][len(_SKIP):])
    assert returncode == 0, stderr[-4000:]
    results = [json.loads(line) for line in stdout if line.startswith("{")]
    print(_table(results))
    assert len(results) >= 30, "\n".join(stdout)[-4000:]  # every case ran: nothing silently dropped
    failed = [r for r in results if not r["ok"]]
    assert not failed, "\n\n".join(f"{r['case']}: {r['kernel']} {r['config']}\n{r['error']}" for r in failed)
    limit = SHARED_MEMORY_PER_BLOCK[TARGET_ARCH]
    too_big = [r for r in results if r["shared"] > limit]
    assert not too_big, f"over the {limit} bytes of shared memory per block of sm_{TARGET_ARCH}:\n" + _table(too_big)
    kernels_compiled = {r["kernel"] for r in results}
    assert len(kernels_compiled) == 9, kernels_compiled  # 6 attention kernels (the fused backward too), 3 patch-embed


if __name__ == "__main__":
    _main()
