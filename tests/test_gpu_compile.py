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
those of a real call at that shape. An autotuned kernel is compiled once per config where the case
says so: at run time the autotuner silently skips a config that fails to compile, so a broken
config would otherwise only show up as a slower kernel. Each kernel must also fit the target's
shared memory per block (227 KB on sm_90).

The compilation runs in one subprocess with TRITON_INTERPRET=0 (with the interpreter on,
``@triton.jit`` gives interpreter functions, which cannot be compiled). On a GPU machine this test
is skipped: there the kernel tests compile and run the kernels for real. If the installed Triton
lacks the ahead-of-time API used here (``triton.compile(ASTSource(...), target=GPUTarget(...))``),
or cannot compile a trivial kernel for sm_90 at all (no ptxas), the test skips and says why.

``TRITON_INTERPRET=0 python -m tests.test_gpu_compile`` prints one JSON line per compilation (shared
memory, registers, spills); ``pytest -s`` prints them as a table.
"""

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# The most shared memory one block may use (the opt-in maximum), in bytes: 227 KB on H100, 163 KB on A100.
SHARED_MEMORY_PER_BLOCK = {90: 232448, 80: 166912}
TARGET_ARCH = 90
_SKIP = "SKIP: "


# ---------------------------------------------------------------------------------------------
# Run in the subprocess (TRITON_INTERPRET=0): record the launches, compile them.


class _Recorder:
    """Stands in for a kernel: ``recorder[grid](*args, **kwargs)`` records the launch instead."""

    launches: ClassVar[list] = []

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            _Recorder.launches.append((self.kernel, args, kwargs))

        return launch


def _recorded(call) -> list:
    """The (kernel, args, kwargs) launches ``call()`` makes."""
    _Recorder.launches = []
    call()
    return _Recorder.launches


def _triton_type(dtype: torch.dtype) -> str:
    return {
        torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.bool: "i1",
        torch.uint8: "u8", torch.int64: "i64", torch.int32: "i32",
    }[dtype]


def _specialised(fn, args, kwargs):
    """(signature, constexprs, attrs) for ``triton.compile`` as a launch with these arguments makes them."""
    assert len(args) <= len(fn.arg_names), f"{fn.__name__}: {len(args)} arguments for {len(fn.arg_names)} parameters"
    bound = dict(zip(fn.arg_names, args))
    bound.update(kwargs)
    missing, unknown = set(fn.arg_names) - set(bound), set(bound) - set(fn.arg_names)
    assert not missing and not unknown, f"{fn.__name__}: no value for {sorted(missing)}, no parameter {sorted(unknown)}"
    signature, constexprs, attrs = {}, {}, {}
    for index, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        value = bound[name]
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _triton_type(value.dtype)
            # Allocations are 256-byte aligned: a view's alignment is that of its offset.
            if value.storage_offset() * value.element_size() % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1:
                signature[name] = "constexpr"
                constexprs[name] = 1
                continue
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of unexpected type {type(value).__name__}")
    return signature, constexprs, attrs


def _compile(fn, args, kwargs, num_warps, num_stages, arch):
    """Compile one launch; a dict with the shared memory, registers and spills (when ptxas says)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = _specialised(fn, args, kwargs)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # ptxas -v, printed when knobs.nvidia.dump_ptxas_log is on
        kernel = triton.compile(
            ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": num_warps, "num_stages": num_stages},
        )
    registers = re.search(r"Used (\d+) registers", log.getvalue())
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
    return {
        "shared": kernel.metadata.shared,
        "registers": int(registers.group(1)) if registers else None,
        "spill_bytes": int(spills.group(1)) + int(spills.group(2)) if spills else None,
    }


def _attention_launches(
    dtype, head_dim, mask_kind=None, is_causal=False, dropout_p=0.0, bias_grad=False, allow_tf32=False
):
    """The forward, delta, dK/dV and dQ launches of ViT-style attention: q, k, v views of a fused qkv."""
    attention = sys.modules["kernels.attention"]
    batch, heads, tokens = 32, 12, 197
    meta = {"device": "meta", "dtype": dtype}
    qkv = torch.empty(batch, tokens, 3, heads, head_dim, **meta).permute(2, 0, 3, 1, 4)  # (3, B, H, N, D) views
    q, k, v = qkv.unbind(0)
    mask = None
    if mask_kind == "bool":  # a key padding mask, (B, 1, 1, N)
        mask = torch.empty(batch, 1, 1, tokens, device="meta", dtype=torch.bool)
    elif mask_kind == "bias":  # a relative position bias, (1, H, N, N)
        mask = torch.empty(1, heads, tokens, tokens, **meta)
    seed = torch.empty(1, device="meta", dtype=torch.int64) if dropout_p > 0.0 else None
    scale = head_dim**-0.5
    launches = _recorded(
        lambda: attention.attention_forward._init_fn(q, k, v, mask, seed, scale, dropout_p, is_causal, allow_tf32)
    )
    out = torch.empty(batch, tokens, heads, head_dim, **meta).permute(0, 2, 1, 3)
    stats = torch.empty(2, batch, heads, tokens, device="meta", dtype=torch.float32)
    grad_out = torch.empty(batch, tokens, heads, head_dim, **meta).permute(0, 2, 1, 3)
    launches += _recorded(
        lambda: attention.attention_backward._init_fn(
            grad_out, q, k, v, out, stats, mask, seed, scale, dropout_p, is_causal, allow_tf32, bias_grad
        )
    )
    if seed is not None:
        launches += _recorded(lambda: attention.dropout_keep_mask(seed, (batch, heads, tokens, tokens), dropout_p))
    return launches


def _patch_embed_launches(dtype, linear_weight, grad_weight_splits):
    """ViT-B/16's patch embedding, forward and both backward GEMMs, on NCHW images."""
    patch_embed = sys.modules["kernels.patch_embed"]
    batch, channels, size, patch, dim = 64, 3, 224, 16, 768
    n_patches = (size // patch) ** 2
    meta = {"device": "meta", "dtype": dtype}
    images = torch.empty(batch, channels, size, size, **meta)
    if linear_weight:  # vit's Linear-form weight (D, P*P*C), seen as the Conv2d layout
        weight = torch.empty(dim, patch * patch * channels, **meta)
        weight = weight.view(dim, patch, patch, channels).permute(0, 3, 1, 2)
    else:
        weight = torch.empty(dim, channels, patch, patch, **meta)
    bias, cls_token = torch.empty(dim, **meta), torch.empty(1, 1, dim, **meta)
    pos_embed = torch.empty(1, 1 + n_patches, dim, **meta)
    grads = torch.empty(batch, 1 + n_patches, dim, **meta)[:, 1:]
    return _recorded(
        lambda: (
            patch_embed.patch_embed_forward._init_fn(images, weight, bias, cls_token, pos_embed),
            patch_embed._grad_weight(grads, images, weight, grad_weight_splits),
            patch_embed.patch_embed_grad_images._init_fn(grads, images, weight),
        )
    )


def _cases():
    """(name, launches, configs): ``configs`` is "all" the autotune configs, or for each autotuned kernel
    the index of the one config to compile (0 where not named), one that fits the target's shared memory."""
    forward, kv, q = "_attention_forward_kernel", "_attention_backward_kv_kernel", "_attention_backward_q_kernel"
    return [
        ("ViT-B/16 attention: D=64 bf16", _attention_launches(torch.bfloat16, 64), "all"),
        ("D=80 fp16, bool mask, causal", _attention_launches(torch.float16, 80, "bool", is_causal=True),
         {forward: 6, kv: 3, q: 4}),
        ("D=96 bf16, bias with grad, dropout",
         _attention_launches(torch.bfloat16, 96, "bias", dropout_p=0.1, bias_grad=True), {kv: 3, q: 4}),
        ("D=64 fp32, exact dots", _attention_launches(torch.float32, 64, allow_tf32=False), {}),
        ("ViT-B/16 patch embed: bf16, Conv2d weight", _patch_embed_launches(torch.bfloat16, False, 8), {}),
        ("ViT-B/16 patch embed: bf16, Linear-weight view", _patch_embed_launches(torch.bfloat16, True, 1),
         dict.fromkeys(["_patch_embed_forward_kernel", "_patch_embed_grad_weight_kernel",
                        "_patch_embed_grad_images_kernel"], 4)),
    ]


def _probe_api(arch):
    """None if this Triton compiles a trivial kernel ahead of time for ``arch``, else why not."""
    import triton

    try:
        import triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        @triton.jit
        def probe(x_ptr, n, BLOCK: tl.constexpr):
            offsets = tl.arange(0, BLOCK)
            tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=offsets < n) * 2, mask=offsets < n)

        source = ASTSource(
            probe, {"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}, constexprs={"BLOCK": 16},
            attrs={(0,): [["tt.divisibility", 16]]},
        )
        triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "num_stages": 3})
        return None
    except Exception as error:  # noqa: BLE001 - an older or different Triton, or no ptxas: nothing to test with
        return f"Triton {getattr(triton, '__version__', '?')} cannot compile ahead of time for sm_{arch}: " \
               f"{type(error).__name__}: {str(error)[:300]}"


def _main(arch=TARGET_ARCH):
    """Compile every case; one JSON line per compilation, or one SKIP line."""
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run with TRITON_INTERPRET=0"
    reason = _probe_api(arch)
    if reason is not None:
        print(_SKIP + reason, flush=True)
        return
    from triton.runtime.autotuner import Autotuner

    with contextlib.suppress(ImportError, AttributeError):  # registers and spills, where this Triton can tell
        from triton import knobs

        knobs.nvidia.dump_ptxas_log = True  # make_cubin prints ptxas -v
    torch.library.wrap_triton = _Recorder  # the launchers' `torch.library.wrap_triton(kernel)[grid](...)`
    import kernels.attention
    import kernels.patch_embed  # noqa: F401

    attention = sys.modules["kernels.attention"]
    if not hasattr(attention.attention_forward, "_init_fn"):  # torch.library's CustomOpDef keeps the body there
        print(_SKIP + f"torch {torch.__version__}: a triton_op's Python body is not reachable to record its launches")
        return
    attention._dropout_keep_mask_kernel = _Recorder(attention._dropout_keep_mask_kernel)  # launched directly

    for name, launches, which in _cases():
        for kernel, args, kwargs in launches:
            if isinstance(kernel, Autotuner):
                fn, configs = kernel.fn, kernel.configs
                if which != "all":
                    configs = [configs[which.get(fn.__name__, 0) % len(configs)]]
                variants = [(c.kwargs, c.num_warps, c.num_stages) for c in configs]
            else:
                fn, variants = kernel, [({}, 4, 3)]  # Triton's defaults for a plain @triton.jit launch
            for config, num_warps, num_stages in variants:
                described = {**config, "warps": num_warps, "stages": num_stages}
                result = {"case": name, "kernel": fn.__name__, "config": described}
                start = time.perf_counter()
                try:
                    result.update(_compile(fn, args, {**kwargs, **config}, num_warps, num_stages, arch), ok=True)
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernel tests compile the kernels for real")
def test_kernels_compile_for_sm90_and_fit_shared_memory(tmp_path):
    pytest.importorskip("triton")
    # A fresh cache: every kernel is compiled (and ptxas reports on it), none comes from an earlier run.
    environment = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT), "TRITON_CACHE_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "tests.test_gpu_compile"], env=environment, cwd=ROOT,
        capture_output=True, text=True, timeout=900, check=False,
    )
    skipped = [line for line in result.stdout.splitlines() if line.startswith(_SKIP)]
    if skipped:
        pytest.skip(skipped[0][len(_SKIP):])
    assert result.returncode == 0, result.stderr[-4000:]
    results = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    print(_table(results))
    assert len(results) >= 30, result.stdout[-4000:]  # every case ran: nothing silently dropped
    failed = [r for r in results if not r["ok"]]
    assert not failed, "\n\n".join(f"{r['case']}: {r['kernel']} {r['config']}\n{r['error']}" for r in failed)
    limit = SHARED_MEMORY_PER_BLOCK[TARGET_ARCH]
    too_big = [r for r in results if r["shared"] > limit]
    assert not too_big, f"over the {limit} bytes of shared memory per block of sm_{TARGET_ARCH}:\n" + _table(too_big)
    kernels_compiled = {r["kernel"] for r in results}
    assert len(kernels_compiled) == 8, kernels_compiled  # 5 attention kernels, 3 patch-embed kernels


if __name__ == "__main__":
    _main()
