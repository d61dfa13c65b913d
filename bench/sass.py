"""The kernels' machine code for Hopper (sm_90) or Blackwell (sm_100), compiled ahead of time on any
machine with Triton (no GPU).

    python -m bench.sass --arch 90 --shape vit_b16 --dtype bf16 --out DIR      (--arch 100: B200)
    python -m bench.sass --arch 90 --dtype fp8 --op attention --out DIR       (the FP8 inference forward)

For the launches a real call makes at a named ViT shape (attention forward and backward on q, k, v
views of a fused qkv projection, the patch projection forward and backward), compile every kernel
once per autotune config the autotuner would try there (after its pruning) with Triton's compiler
and bundled ptxas (ptxas-blackwell for sm_100), disassemble it with the bundled cuobjdump, and write
``DIR/report.json`` (one entry per compilation) and each SASS file; print a table per shape. No
kernel runs: the custom ops' bodies run on "meta" tensors with ``torch.library.wrap_triton``
replaced by a recorder, so arguments, constexprs and launch specialisation (ints equal to 1 become
constants, ints that are multiples of 16 and 16-byte aligned pointers get ``tt.divisibility``) are
those of the real call.

What the table reads from the SASS: tensor-core instructions (``MMA_FAMILIES``: Hopper's wgmma
HGMMA and FP8 QGMMA, the older mma.sync HMMA at about half the rate, Blackwell's tcgen05 UTC*MMA),
global loads by width (LDG and cp.async LDGSTS; 128-bit is vectorised, 16-bit is one bf16/fp16
element at a time), and the main loop (``loops``, ``main_loop``): its instructions per warp per
iteration and per score, ``loop instructions * 32 * num_warps / tile``.
Tests: ``tests/machine/test_sass.py``, ``test_sass_reading.py``; ``tests/machine/test_gpu_compile.py``
reuses the recording and compiling.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import ClassVar

import torch

ARCH = 90
H100_SMS = 132  # what the patch projection's weight-gradient split is sized for


@dataclasses.dataclass(frozen=True)
class SmLimits:
    """What one SM holds, for the resident-blocks model (``blocks_per_sm``)."""

    registers: int
    shared: int  # bytes, of which ``reserved_shared_per_block`` go to each resident block
    reserved_shared_per_block: int
    threads: int
    blocks: int


# The compute capabilities ``--arch`` takes (compiled as sm_90a, sm_100a; Triton runs its bundled
# ptxas-blackwell for 100 and above) and the CUDA programming guide's per-SM limits there: the same
# 64K registers, 228 KB of shared memory (1 KB reserved per block), 2048 threads and 32 blocks on both.
SM_LIMITS = {
    90: SmLimits(registers=65536, shared=233472, reserved_shared_per_block=1024, threads=2048, blocks=32),
    100: SmLimits(registers=65536, shared=233472, reserved_shared_per_block=1024, threads=2048, blocks=32),
}
# fp8: the FP8 inference forward (e4m3 q, k, v; ``kernels/triton/attention_fp8.py``), attention only.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": torch.float8_e4m3fn}
EXIT_CANNOT_COMPILE = 3  # exit status when this Triton/torch cannot compile ahead of time (1: a kernel failed)


@dataclasses.dataclass(frozen=True)
class Shape:
    """A ViT's attention (B, H, N, D) and the patch projection that feeds it (image, patch, width H * D)."""

    batch: int
    heads: int
    tokens: int
    head_dim: int
    image: int
    patch: int
    class_token: bool = True


SHAPES = {
    "vit_b16": Shape(batch=256, heads=12, tokens=197, head_dim=64, image=224, patch=16),
    "vit_l16_384": Shape(batch=64, heads=16, tokens=577, head_dim=64, image=384, patch=16),
    "vit_h14": Shape(batch=64, heads=16, tokens=257, head_dim=80, image=224, patch=14),
    "siglip_so400m": Shape(batch=64, heads=16, tokens=729, head_dim=72, image=384, patch=14, class_token=False),
}

# The two config keys whose product is the tile of scores one loop iteration computes. The patch
# projection's GEMMs have no scores: their loop is reported without a per-score figure.
SCORE_TILE = {
    "_attention_forward_kernel": ("BLOCK_M", "BLOCK_N"),
    "_attention_backward_kv_kernel": ("BLOCK_M", "BLOCK_N"),
    "_attention_backward_q_kernel": ("BLOCK_M", "BLOCK_N"),
    "_attention_backward_fused_kernel": ("BLOCK_M", "BLOCK_N"),
    "_attention_fp8_forward_kernel": ("BLOCK_M", "BLOCK_N"),
    "_attention_forward_ws_kernel": ("BLOCK_M", "BLOCK_N"),
}
FORWARD_KERNELS = {
    "_attention_forward_kernel", "_patch_embed_forward_kernel", "_attention_fp8_forward_kernel",
    "_attention_forward_ws_kernel",
}
OPS = ("attention", "patch_embed")


# ---------------------------------------------------------------------------------------------
# Recording the launches of the custom ops' bodies on meta tensors.


class CannotCompile(RuntimeError):
    """This Triton or torch cannot record or compile the launches ahead of time (nothing is wrong with the kernels)."""


class Recorder:
    """Stands in for ``torch.library.wrap_triton(kernel)``: ``[grid](*args, **kwargs)`` records the launch."""

    launches: ClassVar[list] = []

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            Recorder.launches.append((self.kernel, args, kwargs))

        return launch


def recorded(call) -> list:
    """The (kernel, args, kwargs) launches ``call()`` makes; ``install_recorder`` must have run."""
    Recorder.launches = []
    call()
    return Recorder.launches


def install_recorder():
    """Route every launch of the kernel modules to ``Recorder`` (for this process: run it in a
    subprocess with TRITON_INTERPRET=0) and return the modules ``kernels.triton.attention_ops``, ``kernels.triton.patch_embed``."""
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "compiling needs TRITON_INTERPRET=0"
    torch.library.wrap_triton = Recorder  # the launchers' `torch.library.wrap_triton(kernel)[grid](...)`
    import kernels.triton.attention_fp8
    import kernels.triton.attention_ops
    import kernels.triton.patch_embed  # noqa: F401

    attention, patch_embed = sys.modules["kernels.triton.attention_ops"], sys.modules["kernels.triton.patch_embed"]
    if not hasattr(attention.attention_forward, "_init_fn"):  # torch.library's CustomOpDef keeps the body there
        raise CannotCompile(f"torch {torch.__version__}: a triton_op's Python body is not reachable to record its launches")
    if not isinstance(attention._dropout_keep_mask_kernel, Recorder):  # launched directly, not wrapped
        attention._dropout_keep_mask_kernel = Recorder(attention._dropout_keep_mask_kernel)
    return attention, patch_embed


def attention_launches(
    batch, heads, tokens, head_dim, dtype, mask_kind=None, is_causal=False, dropout_p=0.0, bias_grad=False,
    allow_tf32=False,
) -> list:
    """Forward, delta, dK/dV and dQ launches of ViT attention: q, k, v views of a fused qkv (B, N, 3, H, D),
    the upstream gradient in the (B, N, H, D) memory of the output."""
    attention = sys.modules["kernels.triton.attention_ops"]
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
    launches = recorded(
        lambda: attention.attention_forward._init_fn(q, k, v, mask, seed, scale, dropout_p, is_causal, allow_tf32)
    )
    out = torch.empty(batch, tokens, heads, head_dim, **meta).permute(0, 2, 1, 3)  # (B, H, N, D)
    stats = attention._dense_stats(q)  # as the forward allocates it (rows padded in memory)
    grad_out = torch.empty(batch, tokens, heads, head_dim, **meta).permute(0, 2, 1, 3)
    launches += both_backward_paths(
        lambda: recorded(
            lambda: attention.attention_backward._init_fn(
                grad_out, q, k, v, out, stats, mask, seed, scale, dropout_p, is_causal, allow_tf32, bias_grad
            )
        )
    )
    if seed is not None:
        launches += recorded(lambda: attention.dropout_keep_mask(seed, (batch, heads, tokens, tokens), dropout_p))
    return launches


def both_backward_paths(record) -> list:
    """The backward's launches as a call chooses them, then those it makes under
    ``torch.use_deterministic_algorithms(True)`` (the pair of kernels, where the default takes the
    fused one with its atomic dQ) that it did not make already: every kernel a shape may compile."""
    launches = record()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        deterministic = record()
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    seen = {id(kernel) for kernel, _, _ in launches}
    return launches + [launch for launch in deterministic if id(launch[0]) not in seen]


def varlen_launches(lengths, heads, head_dim, dtype, is_causal=False, dropout_p=0.0, allow_tf32=False) -> list:
    """Forward, delta, dK/dV and dQ launches of packed attention (``kernels.attention_varlen``): q, k, v
    views of a fused qkv (total, 3, H, D) over sequences of ``lengths``."""
    attention = sys.modules["kernels.triton.attention_ops"]
    meta = {"device": "meta", "dtype": dtype}
    total, longest = sum(lengths), max(lengths)
    q, k, v = torch.empty(total, 3, heads, head_dim, **meta).unbind(1)  # (total, H, D) views
    cu_seqlens = torch.empty(len(lengths) + 1, device="meta", dtype=torch.int32)
    seed = torch.empty(1, device="meta", dtype=torch.int64) if dropout_p > 0.0 else None
    scale = head_dim**-0.5
    options = (cu_seqlens, cu_seqlens, longest, longest, seed, scale, dropout_p, is_causal, allow_tf32)
    launches = recorded(lambda: attention.attention_varlen_forward._init_fn(q, k, v, *options))
    out = torch.empty(total, heads, head_dim, **meta)
    stats = torch.empty(2, heads, total, device="meta", dtype=torch.float32)
    grad_out = torch.empty(total, heads, head_dim, **meta)
    launches += both_backward_paths(
        lambda: recorded(lambda: attention.attention_varlen_backward._init_fn(grad_out, q, k, v, out, stats, *options))
    )
    return launches


def patch_embed_launches(
    batch, image, patch, dim, dtype, *, channels=3, linear_weight=False, class_token=True, grad_weight_splits=None
) -> list:
    """The patch projection forward and both backward GEMMs on NCHW images. ``grad_weight_splits``
    None: the split the launcher picks on an H100 (132 SMs)."""
    patch_embed = sys.modules["kernels.triton.patch_embed"]
    n_patches = (image // patch) ** 2
    meta = {"device": "meta", "dtype": dtype}
    images = torch.empty(batch, channels, image, image, **meta)
    if linear_weight:  # vit's Linear-form weight (D, P*P*C), seen as the Conv2d layout
        weight = torch.empty(dim, patch * patch * channels, **meta)
        weight = weight.view(dim, patch, patch, channels).permute(0, 3, 1, 2)
    else:
        weight = torch.empty(dim, channels, patch, patch, **meta)
    bias = torch.empty(dim, **meta)
    cls_token = torch.empty(1, 1, dim, **meta) if class_token else None
    pos_embed = torch.empty(1, class_token + n_patches, dim, **meta)
    grads = torch.empty(batch, class_token + n_patches, dim, **meta)[:, int(class_token):]  # (B, N, D)
    if grad_weight_splits is None:
        patch_embed._sm_counts.setdefault(0, H100_SMS)
        grad_weight_splits = patch_embed._grad_weight_splits(
            batch * n_patches, dim, channels * patch * patch, torch.device("cuda", 0)
        )
    return recorded(
        lambda: (
            patch_embed.patch_embed_forward._init_fn(images, weight, bias, cls_token, pos_embed),
            patch_embed._grad_weight(grads, images, weight, grad_weight_splits),
            patch_embed.patch_embed_grad_images._init_fn(grads, images, weight),
        )
    )


def fp8_launches(batch, heads, tokens, head_dim, v_keys_contiguous=True, mask_kind=None, is_causal=False) -> list:
    """The FP8 forward's launch at a ViT shape: e4m3 q and k views of a fused qkv (B, N, 3, H, D); v as
    ``kernels.quantize_fp8`` lays it out, a (B, H, N, D) view of (B, H, D, N rounded up to 16) memory
    (``v_keys_contiguous``), or row-major like q and k."""
    fp8 = sys.modules["kernels.triton.attention_fp8"]
    meta = {"device": "meta", "dtype": torch.float8_e4m3fn}
    q, k, v = torch.empty(batch, tokens, 3, heads, head_dim, **meta).permute(2, 0, 3, 1, 4).unbind(0)
    if v_keys_contiguous:
        v = torch.empty(batch, heads, head_dim, -(-tokens // 16) * 16, **meta)[..., :tokens].transpose(2, 3)
    mask = None
    if mask_kind == "bool":
        mask = torch.empty(batch, 1, 1, tokens, device="meta", dtype=torch.bool)
    elif mask_kind == "bias":
        mask = torch.empty(1, heads, tokens, tokens, device="meta", dtype=torch.bfloat16)
    descales = torch.empty(batch, heads, 3, device="meta", dtype=torch.float32)
    return recorded(
        lambda: fp8.attention_fp8_forward._init_fn(q, k, v, descales, mask, head_dim**-0.5, is_causal, torch.bfloat16)
    )


def shape_launches(shape: Shape, dtype, ops=OPS) -> list:
    """The launches a forward and backward of each of ``ops`` ("attention", "patch_embed") make at ``shape``;
    in FP8, the FP8 forward's (the patch projection has no FP8 kernel)."""
    if dtype == torch.float8_e4m3fn:
        return fp8_launches(shape.batch, shape.heads, shape.tokens, shape.head_dim) if "attention" in ops else []
    launches = []
    if "attention" in ops:
        launches += attention_launches(shape.batch, shape.heads, shape.tokens, shape.head_dim, dtype)
    if "patch_embed" in ops:
        launches += patch_embed_launches(
            shape.batch, shape.image, shape.patch, shape.heads * shape.head_dim, dtype, class_token=shape.class_token
        )
    return launches


def variants(kernel, args, kwargs) -> list[tuple]:
    """(jit function, [(config kwargs, num_warps, num_stages)]) a launch compiles: for an autotuned
    kernel each config its ``early_config_prune`` keeps, as Triton's and torch's autotuners call it."""
    from triton.runtime.autotuner import Autotuner

    if not isinstance(kernel, Autotuner):
        return kernel, [({}, 4, 3)]  # Triton's defaults for a plain @triton.jit launch
    configs = kernel.configs
    prune = getattr(kernel, "early_config_prune", None)
    if prune is not None:
        configs = prune(configs, dict(zip(kernel.arg_names, args)), **kwargs)
    return kernel.fn, [(c.kwargs, c.num_warps, c.num_stages) for c in configs]


# ---------------------------------------------------------------------------------------------
# Compiling one launch.


def _triton_type(dtype: torch.dtype) -> str:
    return {
        torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.bool: "i1",
        torch.float8_e4m3fn: "fp8e4nv",
        torch.uint8: "u8", torch.int64: "i64", torch.int32: "i32",
    }[dtype]


def specialised(fn, args, kwargs):
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


def enable_ptxas_log() -> None:
    """Make Triton print ptxas -v (registers, spills) for each compilation, where this Triton can."""
    with contextlib.suppress(ImportError, AttributeError):
        from triton import knobs

        knobs.nvidia.dump_ptxas_log = True


def compile_launch(fn, args, kwargs, num_warps, num_stages, arch=ARCH) -> tuple[dict, bytes]:
    """Compile one launch for sm_``arch`` (sm_90a, sm_100a): ({shared, registers, spill_bytes}, cubin).
    Registers and spills come from ptxas -v (``enable_ptxas_log``), so only a fresh compilation (not
    a cache hit) reports them."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = specialised(fn, args, kwargs)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # ptxas -v, printed when knobs.nvidia.dump_ptxas_log is on
        kernel = triton.compile(
            ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": num_warps, "num_stages": num_stages},
        )
    registers = re.search(r"Used (\d+) registers", log.getvalue())
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
    facts = {
        "shared": kernel.metadata.shared,
        "registers": int(registers.group(1)) if registers else None,
        "spill_bytes": int(spills.group(1)) + int(spills.group(2)) if spills else None,
        "partitions": partitions(kernel.asm.get("ttgir", ""), num_warps),
    }
    return facts, kernel.asm["cubin"]


def partitions(ttgir: str, num_warps: int) -> list[int]:
    """The warps of each partition of a warp-specialised kernel, the default one (``num_warps``) first,
    as its TTGIR's ``ttg.warp_specialize`` lays them out; [] for a kernel that is not."""
    if "ttg.warp_specialize" not in ttgir:
        return []
    return [num_warps] + [int(w) for w in re.findall(r"^\s*partition\d+\(.*\) num_warps\((\d+)\)", ttgir, re.MULTILINE)]


def probe_api(arch=ARCH) -> str | None:
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


def cuobjdump() -> str:
    """The cuobjdump Triton bundles (or the one TRITON_CUOBJDUMP_PATH names)."""
    with contextlib.suppress(ImportError, AttributeError):
        from triton import knobs

        return knobs.nvidia.cuobjdump.path
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def disassemble(cubin: bytes) -> str:
    """``cuobjdump -sass`` of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        return subprocess.run([cuobjdump(), "-sass", file.name], capture_output=True, text=True, check=True).stdout


# ---------------------------------------------------------------------------------------------
# Reading the SASS.

_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", re.MULTILINE)
# A direct branch's target is its last operand, after any modifiers (.U uniform, .DIV, .CONV) and any
# operand before it: ``BRA 0x50``, ``@!UP0 BRA.U 0x50``, ``BRA.U !UP0, 0x50`` (how sm_100 writes loop
# back-edges), ``BRA.DIV UR4, 0x50``. Indirect branches (BRX, JMX) name a register, not an address.
_BRANCH = re.compile(r"^(?:@!?U?P[0-7T]\s+)?BRA(?:\.[A-Z0-9_]+)*\s+(?:[^,]*,\s*)?(0x[0-9a-f]+)$")
_GUARD = re.compile(r"^@(!?)U?P([0-7T])\s")

# Tensor-core instructions by family: report key -> opcodes. sm_90's warpgroup MMA (wgmma) is HGMMA
# for bf16/fp16/tf32 and QGMMA for FP8; HMMA is the older warp-level mma.sync at about half the rate;
# sm_100's tcgen05.mma, issued by one thread with its accumulator in tensor memory, is UTCHMMA for
# bf16/fp16/tf32 (what our kernels compile to) and UTCQMMA for FP8/FP6/FP4; the block-scaled kinds
# (UTCMXQMMA, UTCOMMA for FP4) and int8 (UTCIMMA) are counted with them, as public opcode tables name them.
MMA_FAMILIES = {
    "hgmma": ("HGMMA",),
    "qgmma": ("QGMMA",),
    "hmma": ("HMMA",),
    "tcgen05_mma": ("UTCHMMA", "UTCQMMA", "UTCMXQMMA", "UTCOMMA", "UTCIMMA"),
}
_MMA_OPCODES = {opcode for opcodes in MMA_FAMILIES.values() for opcode in opcodes}


def instructions(sass: str) -> list[tuple[int, str]]:
    """(address, instruction text without the trailing ';') of each SASS instruction."""
    return [(int(address, 16), text) for address, text in _INSTRUCTION.findall(sass)]


def _opcode(text: str) -> str:
    """The opcode with its modifiers, guard predicate removed: ``@!P2 LDG.E.128 R4, ...`` -> ``LDG.E.128``,
    ``@!UP0 BRA.U 0x50`` -> ``BRA.U``."""
    words = text.split()
    return words[1] if words[0].startswith("@") and len(words) > 1 else words[0]


def _base(text: str) -> str:
    """The opcode without modifiers: ``@P0 HGMMA.64x64x16.F32.BF16 ...`` -> ``HGMMA``."""
    return _opcode(text).split(".")[0]


def _guard(text: str) -> bool | None:
    """Whether the instruction runs: True always (no guard, ``@PT``), False never (``@!PT``), None
    when a predicate register decides (``@P0``, ``@!UP3``)."""
    guard = _GUARD.match(text)
    if guard is None:
        return True
    negated, register = guard.groups()
    return (not negated) if register == "T" else None


def _is_mma(text: str) -> bool:
    return _base(text) in _MMA_OPCODES


def _branch_target(text: str) -> int | None:
    """The address a direct branch can jump to, None for any other instruction or a branch never taken."""
    branch = _BRANCH.match(text)
    if branch is None or _guard(text) is False:
        return None
    return int(branch.group(1), 16)


def _is_exit(text: str) -> bool:
    """An EXIT that always ends the thread (``@P0 EXIT``, an early exit of some threads, falls through)."""
    return _base(text) == "EXIT" and _guard(text) is True


def loops(code: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """(first, last) address of each loop of ``instructions(sass)``: a backward branch (to an address
    at or before its own) and the code laid out from its target to it, in the order of the branches.

    What is not a loop, though it branches backward: the kernel's body ends at its last unconditional
    EXIT, and what ptxas lays out after it is out-of-line code the body jumps to: the mbarrier
    try-wait retry stubs of TMA, tcgen05 and warp-specialised code (``SYNCS.PHASECHK.TRANS64.TRYWAIT``,
    ``@!P0 BRA`` to itself, then ``BRA`` back into the body), called subroutines, the closing
    ``BRA`` to itself. So a loop's back-edge lies in the body, at or before the last EXIT, and its span
    holds no unconditional EXIT (control cannot pass one, so a span across it is not a loop body):
    a stub's jump back from after EXIT to where its wait was would otherwise read as a loop spanning
    most of the kernel. Not required: that the span is entered only at its first instruction. The
    retry stubs jump back into the middle of the loops whose waits they serve, and a loop laid out
    with its test at the bottom is entered there.
    """
    exits = [address for address, text in code if _is_exit(text)]
    found = []
    for address, text in code:
        target = _branch_target(text)
        if target is None or target > address or (exits and address > exits[-1]):
            continue
        if not any(target <= exit_address <= address for exit_address in exits):
            found.append((target, address))
    return found


def main_loop(code: list[tuple[int, str]]) -> tuple[int, int] | None:
    """(first, last) address of the main loop of ``instructions(sass)``, or None where no loop has a
    tensor-core instruction (any of ``MMA_FAMILIES``).

    Of the ``loops`` that hold an MMA (the dot that makes the scores, and for attention the others),
    keep the innermost ones (no smaller such loop inside), then the one with the most MMA
    instructions, the first in the code on a tie. A peeled, masked copy of the body is straight-line
    code, not a loop, so it is never picked. The count is of the instructions laid out inside the
    span: ptxas keeps these kernels' loop bodies contiguous; code a loop jumps out to and back from
    (the retry stubs after EXIT, run only when a wait is not yet satisfied) is not counted.
    """
    mma_addresses = [address for address, text in code if _is_mma(text)]

    def mmas(loop):
        return sum(loop[0] <= a <= loop[1] for a in mma_addresses)

    with_mma = [loop for loop in loops(code) if mmas(loop) > 0]
    innermost = [
        loop for loop in with_mma
        if not any(other != loop and loop[0] <= other[0] and other[1] <= loop[1] for other in with_mma)
    ]
    if not innermost:
        return None
    return max(innermost, key=lambda loop: (mmas(loop), -loop[0]))


def _load_width(opcode: str) -> int:
    """Bits per thread of a global load opcode (LDG.E.128 -> 128, LDG.E.U16 -> 16, LDG.E -> 32)."""
    parts = opcode.split(".")[1:]
    for width in ("128", "64"):
        if width in parts:
            return int(width)
    if any(p in ("U16", "S16") for p in parts):
        return 16
    if any(p in ("U8", "S8") for p in parts):
        return 8
    return 32


def softmax_loop(code: list[tuple[int, str]]) -> tuple[int, int] | None:
    """(first, last) address of the innermost loop with the most exponentials (``MUFU.EX2``): in a
    warp-specialised attention kernel the softmax partition's loop, which holds no MMA."""
    exponentials = [address for address, text in code if _opcode(text).startswith("MUFU.EX2")]

    def count(loop):
        return sum(loop[0] <= a <= loop[1] for a in exponentials)

    with_exp = [loop for loop in loops(code) if count(loop) > 0]
    innermost = [loop for loop in with_exp
                 if not any(other != loop and loop[0] <= other[0] and other[1] <= loop[1] for other in with_exp)]
    return max(innermost, key=lambda loop: (count(loop), -loop[0])) if innermost else None


def analyse(sass: str, kernel: str, config: dict, num_warps: int, partition_warps: list[int] | None = None) -> dict:
    """Tensor-core instructions by family (``MMA_FAMILIES``), TMA and tensor-memory traffic, global
    loads by width, and the main loop's length, from SASS of any architecture.

    A warp-specialised kernel (``partition_warps``, from ``partitions``) is read by its softmax
    partition, the default one of ``num_warps`` warps: its loop (``softmax_loop``) is the main loop
    reported, and its instructions per score are that loop's over the tile, issued by those warps
    while the loader and MMA warps run beside them."""
    code = instructions(sass)
    bases = [_base(text) for _, text in code]
    loads: dict[int, int] = {}
    for (_, text), base in zip(code, bases):
        if base in ("LDG", "LDGSTS"):
            width = _load_width(_opcode(text))
            loads[width] = loads.get(width, 0) + 1
    facts = {family: sum(b in opcodes for b in bases) for family, opcodes in MMA_FAMILIES.items()}
    facts.update(
        tma_loads=sum(b == "UTMALDG" for b in bases),  # cp.async.bulk.tensor, global to shared
        bulk_copies=sum(b == "UBLKCP" for b in bases),  # cp.async.bulk, the untiled kind
        tmem_loads=sum(b == "LDTM" for b in bases),  # tcgen05.ld: accumulators out of tensor memory
        tmem_stores=sum(b == "STTM" for b in bases),  # tcgen05.st
        global_loads={str(width): loads[width] for width in sorted(loads, reverse=True)},
        local_memory_instructions=sum(b in ("LDL", "STL") for b in bases),
        loop_instructions=None,
        instructions_per_score=None,
    )
    loop = softmax_loop(code) if partition_warps else main_loop(code)
    facts["partitions"] = partition_warps or []
    if loop is not None:
        facts["loop_instructions"] = sum(loop[0] <= a <= loop[1] and _base(t) != "NOP" for a, t in code)
        if kernel in SCORE_TILE:
            rows, cols = (config[key] for key in SCORE_TILE[kernel])
            facts["instructions_per_score"] = round(facts["loop_instructions"] * 32 * num_warps / (rows * cols), 2)
    return facts


def blocks_per_sm(registers: int | None, shared: int, num_warps: int, arch: int = ARCH) -> int | None:
    """Resident blocks per SM on sm_``arch``, limited by registers (256-register allocation units
    per warp), shared memory (less what each block reserves), threads and the block cap."""
    if registers is None:
        return None
    limits = SM_LIMITS[arch]
    per_warp = -(-registers * 32 // 256) * 256
    return min(
        limits.registers // (per_warp * num_warps),
        limits.shared // (shared + limits.reserved_shared_per_block),
        limits.threads // (32 * num_warps),
        limits.blocks,
    )


# ---------------------------------------------------------------------------------------------
# The report.


def compile_shape(name: str, dtype_name: str, out: Path, arch: int = ARCH, ops=OPS) -> list[dict]:
    """Compile every launch of ``ops`` at SHAPES[name] in ``dtype_name``; the SASS under ``out``; one entry each."""
    shape, dtype = SHAPES[name], DTYPES[dtype_name]
    entries = []
    # The launches and the autotuners' pruning as on a GPU of this arch (the meta tensors have none).
    sys.modules["kernels.triton.configs"].AHEAD_OF_TIME_ARCH = arch
    for kernel, args, kwargs in shape_launches(shape, dtype, ops):
        fn, configs = variants(kernel, args, kwargs)
        for config, num_warps, num_stages in configs:
            described = {**config, "num_warps": num_warps, "num_stages": num_stages}
            entry = {
                "shape": name, "dtype": dtype_name, "arch": arch, "kernel": fn.__name__,
                "pass": "forward" if fn.__name__ in FORWARD_KERNELS else "backward", "config": described,
            }
            start = time.perf_counter()
            try:
                facts, cubin = compile_launch(fn, args, {**kwargs, **config}, num_warps, num_stages, arch)
            except Exception as error:  # noqa: BLE001 - reported in the entry, with the kernel and config
                entry["error"] = f"{type(error).__name__}: {error}"[-4000:]
            else:
                sass = disassemble(cubin)
                tag = "-".join(f"{k.removeprefix('BLOCK_').lower()}{v}" for k, v in config.items())
                path = Path(f"{name}-{dtype_name}") / f"{fn.__name__.strip('_')}-{tag}-w{num_warps}-s{num_stages}.sass"
                (out / path).parent.mkdir(parents=True, exist_ok=True)
                (out / path).write_text(sass)
                entry.update(
                    registers=facts["registers"], spilled_bytes=facts["spill_bytes"], shared_memory=facts["shared"],
                    blocks_per_sm=blocks_per_sm(facts["registers"], facts["shared"], num_warps, arch),
                    sass=str(path), **analyse(sass, fn.__name__, config, num_warps, facts["partitions"]),
                )
            entry["seconds"] = round(time.perf_counter() - start, 2)
            entries.append(entry)
    return entries


def table(entries: list[dict]) -> str:
    """One line per compilation: the facts the issue asks for, grouped by shape, dtype and architecture.
    UTCMMA counts sm_100's tcgen05 MMA instructions (``MMA_FAMILIES``)."""
    header = (f"{'kernel':<32} {'config (M N/D K, warps, stages)':<32} {'regs':>4} {'spill':>5} {'smem':>6} "
              f"{'blk/SM':>6} {'HGMMA':>5} {'QGMMA':>5} {'HMMA':>4} {'UTCMMA':>6}  {'loads 128/64/32/16/8-bit':<24} "
              f"{'loop':>5} {'/score':>6}")
    lines, current = [], None
    for e in entries:
        if (e["shape"], e["dtype"], e["arch"]) != current:
            current = (e["shape"], e["dtype"], e["arch"])
            lines += ["", f"{e['shape']} {e['dtype']} sm_{e['arch']}: {SHAPES[e['shape']]}", header]
        blocks = "/".join(str(v) for k, v in e["config"].items() if k.startswith("BLOCK_"))
        config = f"{blocks or '-'} w{e['config']['num_warps']} s{e['config']['num_stages']}"
        if "error" in e:
            lines.append(f"{e['kernel']:<32} {config:<32} FAILED: {e['error'][:120]}")
            continue
        loads = "/".join(str(e["global_loads"].get(str(w), 0)) for w in (128, 64, 32, 16, 8))
        per_score = "" if e["instructions_per_score"] is None else e["instructions_per_score"]
        loop = "" if e["loop_instructions"] is None else e["loop_instructions"]
        lines.append(
            f"{e['kernel']:<32} {config:<32} {e['registers']!s:>4} {e['spilled_bytes']!s:>5} {e['shared_memory']:>6} "
            f"{e['blocks_per_sm']!s:>6} {e['hgmma']:>5} {e['qgmma']:>5} {e['hmma']:>4} {e['tcgen05_mma']:>6}  "
            f"{loads:<24} {loop!s:>5} {per_score!s:>6}"
        )
    return "\n".join(lines)


def run(shapes: list[str], dtypes: list[str], out: Path, arch: int = ARCH, ops=OPS) -> list[dict]:
    """Compile ``ops`` at every shape in every dtype; write ``out/report.json``."""
    out.mkdir(parents=True, exist_ok=True)
    reason = probe_api(arch)
    if reason is not None:
        raise CannotCompile(reason)
    enable_ptxas_log()
    install_recorder()
    entries = []
    for name in shapes:
        for dtype_name in dtypes:
            entries += compile_shape(name, dtype_name, out, arch, ops)
    (out / "report.json").write_text(json.dumps(entries, indent=1))
    return entries


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sass", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=ARCH, choices=sorted(SM_LIMITS),
                        help="compute capability as an int: 90 (Hopper, the default) or 100 (Blackwell B200)")
    parser.add_argument("--shape", action="append", choices=[*SHAPES, "all"],
                        help="a named shape; repeat for several; default all")
    parser.add_argument("--dtype", action="append", choices=list(DTYPES), help="repeat for several; default bf16")
    parser.add_argument("--op", action="append", choices=OPS, help="repeat for several; default both")
    parser.add_argument("--out", type=Path, required=True, help="directory for report.json and the SASS files")
    options = parser.parse_args(argv)
    shapes = list(SHAPES) if not options.shape or "all" in options.shape else options.shape
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("bench.sass: TRITON_INTERPRET=1 gives interpreter functions, which do not compile; unset it",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # every kernel compiled afresh, so ptxas reports on it
        try:
            entries = run(shapes, options.dtype or ["bf16"], options.out, options.arch, options.op or OPS)
        except CannotCompile as error:
            print(f"bench.sass: cannot compile here: {error}", file=sys.stderr)
            return EXIT_CANNOT_COMPILE
    print(table(entries))
    print(f"\n{len(entries)} compilations; {options.out / 'report.json'}")
    return 1 if any("error" in e for e in entries) else 0


if __name__ == "__main__":
    sys.exit(main())
