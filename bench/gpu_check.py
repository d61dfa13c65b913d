"""The first thing to run on a GPU: are the kernels right there, and how fast are they, in one command.

    python -m bench.gpu_check                       # writes bench/gpu_check.md and prints it
    python -m bench.gpu_check --budget 300 --out /tmp/check.md

Phases 1 to 6 stopped by the clock (``--budget`` seconds in all, 300 by default, so that
the whole run, Triton's compiling and autotuning included, fits a 6-minute slot on an H100/H200;
a phase the clock stopped says so, and a second run, with Triton's cache warm, gets further):
1. Correctness at the four ViT shapes of ``bench.sass.SHAPES`` (ViT-B/16, ViT-L/16 at 384,
   ViT-H/14, SigLIP-So400m), bf16, q/k/v views of a fused qkv: the output and the qkv gradient
   against the float64 einsum reference, by the tests' rule (``tests.equivalence``).
2. Attention timings at ViT-B/16 (B=256) and ViT-L/16-384 (B=64), bf16, forward and forward +
   backward, and B=1 forward latency: ours against SDPA's flash, cuDNN and efficient backends and
   compiled FlexAttention; forward + backward also with our backward forced to the fused kernel
   ("vitriton-fused") and to the pair ("vitriton-pair"), then the two over N = 197 to 1024 at a
   fixed token count: the switch-over ``kernels.triton.launch.FUSED_BACKWARD_MIN_KEYS`` comes from
   that table (until a first GPU run, from the machine-code estimate).
3. Packed images (``kernels.attention_varlen``): 8 images of 224-1024 px at patch 14, D=80, bf16,
   checked like 1, then timed whole (forward, forward + backward) and in Qwen2.5-VL's 64-token
   windows (forward) against an SDPA call per image, SDPA with a block-diagonal mask, compiled
   FlexAttention with a document mask and flash-attn's varlen function when importable.
4. The patch projection at ViT-B/16 (B=256) against Conv2d + flatten + cat + add, and at B=1.
5. FP8 inference forward (``kernels.quantize_fp8``, e4m3 q/k/v, bf16 out) at ViT-B/16 and ViT-L/16-384,
   where the GPU has FP8 tensor cores (sm_89 and up): the output against float64 attention of the
   same e4m3 values, within the bound of rounding P to e4m3 (tests/attention/test_fp8.py), then the
   forward timed on quantised inputs, with quantize_fp8 of bf16 q/k/v included, against our bf16
   forward and SDPA's flash and cuDNN backends.
6. Blackwell, only on sm_100 (B200/GB200): the FP8 check at all four shapes, and our bf16 forward
   (warp-specialised, and the sm_90 kernel for comparison), forward + backward and FP8 forward timed
   at ViT-H/14 and SigLIP (the head dims whose tiles sm_100 prunes apart from sm_90); elsewhere one
   row saying it did not run.
7. Many GPUs, with 2 or more: the engine checks of tests/distributed/test_engines.py (DDP, FSDP2,
   FSDP2 with checkpointing, tensor parallel, torch.compile over DDP and FSDP2; FSDP2 x TP with 4
   GPUs) on CUDA with NCCL, one process per GPU, the Triton kernels compiled: tiny models against
   one process, the same code as on CPU, not a scaling figure. Its own time (``--engines-timeout``,
   240 s), after the budget; with one GPU, a row saying it did not run.
Then a markdown table (time, TFLOP/s, the fastest peer's time over each provider's, the fraction
of the roofline measured by ``bench.roofline``) for bench/RESULTS.md. A peer that fails is
recorded with its error, not fatal. Timing is ``triton.testing.do_bench`` (CUDA events, median),
after a first call that compiles and autotunes. Run it from the repository root. Exit status: 0,
1 if a shape failed the correctness check, 2 (and one line saying so) without a CUDA GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from pathlib import Path

import torch

EXIT_NO_GPU = 2
DEVICE = "cuda"
# A phase starts no new piece of work after this fraction of the budget: one piece (a first call
# that compiles and autotunes) can take a minute, so the last phase ends early.
PHASE_ENDS = {
    "correctness": 0.36, "attention": 0.58, "switch-over": 0.66, "fp8": 0.75, "varlen": 0.85, "patch": 0.91,
    "blackwell": 0.97,
}
TIMED = [("vit_b16", 256), ("vit_l16_384", 64)]  # (shape, batch) of the attention timings
# The fused backward against the pair: N at about 37K tokens (ViT-L/16-384's 64 x 577), 16 heads, D = 64.
SWITCH_OVER_LENGTHS, SWITCH_OVER_TOKENS = (197, 257, 384, 512, 577, 729, 1024), 64 * 577
# The timed shapes first (their compiling and autotuning is then done for the timings too), then
# D = 72 (alignment hints) and D = 80.
CORRECTNESS_ORDER = ["vit_b16", "vit_l16_384", "siglip_so400m", "vit_h14"]
PATCH_EMBED = {"image": 224, "patch": 16, "dim": 768, "batch": 256}  # ViT-B/16's, timed


class Clock:
    """Seconds since the start, and whether a phase may start one more piece of work."""

    def __init__(self, budget: float):
        self.start, self.budget = time.perf_counter(), budget

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, phase: str) -> bool:
        return self.elapsed() < PHASE_ENDS[phase] * self.budget


def _one_line(error: BaseException, limit: int = 160) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _heads_first(qkv):
    """(B, N, 3, H, D) -> q, k, v as (B, H, N, D) views, as timm calls SDPA."""
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def _free() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# 1. Correctness.


def _compared(outputs: dict) -> str:
    """"pass (max errors)" for {"ours", "float64", "bf16"}: (output, qkv gradient) by the tests' rule,
    which raises AssertionError otherwise."""
    from tests.equivalence import assert_close_to_reference

    errors = []
    for index, what in enumerate(("output", "grad qkv")):
        ours, exact, low = (outputs[run][index] for run in ("ours", "float64", "bf16"))
        errors.append(f"{what} {(ours.double() - exact).abs().max().item():.2e}")
        assert_close_to_reference(ours, exact, low, name=what)
    return "pass (" + ", ".join(errors) + ")"


def check_correctness(clock: Clock) -> list[dict]:
    """One row per shape: the max errors of the output and the qkv gradient, and whether they pass."""
    import kernels
    from bench.sass import SHAPES
    from kernels.reference import attention_reference

    rows = []
    for name in CORRECTNESS_ORDER:
        shape = SHAPES[name]
        row = {"shape": name, "B, H, N, D": f"{shape.batch}, {shape.heads}, {shape.tokens}, {shape.head_dim}"}
        rows.append(row)
        if not clock.allows("correctness"):
            row["result"] = "not run: out of time"
            continue
        try:
            generator = torch.Generator(device=DEVICE).manual_seed(0)
            size = (shape.batch, shape.tokens, 3, shape.heads, shape.head_dim)
            qkv = torch.randn(size, device=DEVICE, generator=generator).to(torch.bfloat16).requires_grad_()
            grad_out = torch.randn(shape.batch, shape.heads, shape.tokens, shape.head_dim, device=DEVICE,
                                   generator=generator).to(torch.bfloat16)
            outputs = {}
            for run, dtype in (("ours", torch.bfloat16), ("float64", torch.float64), ("bf16", torch.bfloat16)):
                leaf = qkv if run == "ours" else qkv.detach().to(dtype).requires_grad_()
                q, k, v = _heads_first(leaf)
                out = kernels.attention(q, k, v, backend="triton") if run == "ours" else attention_reference(q, k, v)
                (grad,) = torch.autograd.grad(out, leaf, grad_out.to(dtype))
                outputs[run] = (out.detach(), grad)
            row["result"] = _compared(outputs)
        except AssertionError as error:
            row["result"] = f"FAIL: {_one_line(error, 300)}"
        except Exception as error:  # noqa: BLE001 - recorded, the next shape still runs
            row["result"] = f"ERROR: {_one_line(error, 300)}"
        finally:
            outputs = qkv = grad_out = None
            _free()
    return rows


# ---------------------------------------------------------------------------------------------
# 2 and 3. Timings.


def _timed(fn) -> float:
    """Median milliseconds of ``fn`` after a first call (compile, autotune) outside the timing."""
    import triton.testing

    fn()
    _free()
    try:
        return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")
    except TypeError:  # a Triton without return_mode
        return triton.testing.do_bench(fn, warmup=10, rep=60, quantiles=[0.5])[0]


@contextlib.contextmanager
def backward_path(path: str | None):
    """Our backward forced to "fused" or "pair" (``kernels.triton.launch``'s rule set aside); None: the rule."""
    from kernels.triton import launch

    saved = launch.FUSED_BACKWARD_MIN_KEYS, launch._fused_backward_fits
    if path is not None:
        launch.FUSED_BACKWARD_MIN_KEYS = 0 if path == "fused" else sys.maxsize
        launch._fused_backward_fits = lambda *args: path == "fused"
    try:
        yield
    finally:
        launch.FUSED_BACKWARD_MIN_KEYS, launch._fused_backward_fits = saved


def _attention_providers():
    """{provider: (role, attend(q, k, v) -> out, context around its timing, backward only)}."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import kernels

    def sdpa(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    compiled = []

    def flex(q, k, v):  # compiled on first use: compiling is part of the untimed first call
        if not compiled:
            from torch.nn.attention.flex_attention import flex_attention

            compiled.append(torch.compile(flex_attention, dynamic=False))
        return compiled[0](q, k, v)

    def ours(q, k, v):
        return kernels.attention(q, k, v, backend="triton")

    return {
        "vitriton": ("ours", ours, contextlib.nullcontext, False),
        "vitriton-fused": ("ours", ours, lambda: backward_path("fused"), True),
        "vitriton-pair": ("ours", ours, lambda: backward_path("pair"), True),
        "sdpa-flash": ("peer", sdpa, lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION), False),
        "sdpa-cudnn": ("peer", sdpa, lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION), False),
        "sdpa-efficient": ("peer", sdpa, lambda: sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION), False),
        "flex-compiled": ("peer", flex, contextlib.nullcontext, False),
    }


def time_attention(clock: Clock, limits) -> list[dict]:
    from bench.roofline import attention_work
    from bench.sass import SHAPES

    cases = [(name, batch, backward) for name, batch in TIMED for backward in (False, True)]
    cases.append(("vit_b16", 1, False))  # latency
    providers = _attention_providers()
    rows = []
    for name, batch, backward in cases:
        shape = SHAPES[name]
        b, h, n, d = batch, shape.heads, shape.tokens, shape.head_dim
        case = f"attention {name} B={b} bf16 {'fwd+bwd' if backward else 'fwd'}"
        work = attention_work(b, h, n, n, d, torch.bfloat16, backward)
        qkv = torch.randn(b, n, 3, h, d, device=DEVICE, dtype=torch.bfloat16, requires_grad=backward)
        grad_out = torch.randn(b, h, n, d, device=DEVICE, dtype=torch.bfloat16) if backward else None
        for provider, (role, attend, context, backward_only) in providers.items():
            if backward_only and not backward:
                continue
            row = {"case": case, "provider": provider, "role": role}
            rows.append(row)
            if not clock.allows("attention"):
                row["error"] = "not run: out of time"
                continue
            with context():
                row.update(_time_one(attend, qkv, grad_out, work, limits))
        qkv = grad_out = None
        _free()
    return rows


def time_switch_over(clock: Clock, limits) -> list[dict]:
    """Our forward + backward with the fused backward and with the pair, bf16, D = 64, 16 heads, at
    each of SWITCH_OVER_LENGTHS with about SWITCH_OVER_TOKENS tokens in all: the smallest N from
    which "fused" is faster is the measured switch-over (``FUSED_BACKWARD_MIN_KEYS``)."""
    import kernels
    from bench.roofline import attention_work

    heads, head_dim = 16, 64
    rows = []
    for n in SWITCH_OVER_LENGTHS:
        batch = max(1, SWITCH_OVER_TOKENS // n)
        case = f"backward switch-over N={n} B={batch} H={heads} D={head_dim} bf16 fwd+bwd"
        work = attention_work(batch, heads, n, n, head_dim, torch.bfloat16, True)
        qkv = torch.randn(batch, n, 3, heads, head_dim, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        grad_out = torch.randn(batch, heads, n, head_dim, device=DEVICE, dtype=torch.bfloat16)
        for path in ("fused", "pair"):
            row = {"case": case, "provider": f"vitriton-{path}", "role": "ours"}
            rows.append(row)
            if not clock.allows("switch-over"):
                row["error"] = "not run: out of time"
                continue
            with backward_path(path):
                row.update(_time_one(lambda q, k, v: kernels.attention(q, k, v, backend="triton"), qkv, grad_out, work, limits))
        qkv = grad_out = None
        _free()
    return rows


def _time_one(attend, qkv, grad_out, work, limits) -> dict:
    """Time ``attend`` on the views of ``qkv`` (and the qkv gradient when ``grad_out``); on contiguous
    copies, made inside the timed call, if the views are refused."""
    def contiguous(q, k, v):
        return attend(q.contiguous(), k.contiguous(), v.contiguous())

    last_error = None
    for inputs, call in (("views", attend), ("contiguous copies", contiguous)):
        if grad_out is None:
            def fn(call=call):
                call(*_heads_first(qkv))
        else:
            def fn(call=call):
                torch.autograd.grad(call(*_heads_first(qkv)), qkv, grad_out)
        try:
            ms = _timed(fn)
        except Exception as error:  # noqa: BLE001 - tried on copies, then recorded
            last_error = error
            _free()
            continue
        facts = {"ms": ms, "inputs": inputs}
        if limits is not None:
            facts.update(limits.describe(work, ms / 1e3))
        return facts
    return {"error": _one_line(last_error)}


def time_varlen(clock: Clock, limits) -> tuple[list[dict], list[dict]]:
    """Packed images (``kernels.attention_varlen``): one correctness row (a VLM's native-resolution
    pack, bf16, against the float64 reference per image), then timings of that pack, forward and
    forward + backward, and of its Qwen2.5-VL-style 64-token windows, forward, against the peers of
    bench/test_varlen.py (an SDPA call per image, SDPA with a block-diagonal mask, compiled
    FlexAttention with a document mask, flash-attn's varlen function when importable)."""
    import kernels
    from bench.test_varlen import MIXES, PROVIDERS, varlen_call
    from kernels.reference import attention_varlen_reference

    native, windows = MIXES["vlm-native-bf16-fwdbwd"], MIXES["vlm-windows-bf16-fwd"]
    lengths = native.lengths
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    row = {"shape": f"varlen {len(lengths)} images", "B, H, N, D": f"-, {native.heads}, {sum(lengths)}, {native.head_dim}"}
    correctness = [row]
    try:
        if not clock.allows("varlen"):
            raise TimeoutError("not run: out of time")
        generator = torch.Generator(device=DEVICE).manual_seed(0)
        qkv = torch.randn(sum(lengths), 3, native.heads, native.head_dim, device=DEVICE, generator=generator)
        grad_out = torch.randn(sum(lengths), native.heads, native.head_dim, device=DEVICE, generator=generator)
        outputs = {}
        for run, dtype in (("ours", torch.bfloat16), ("float64", torch.float64), ("bf16", torch.bfloat16)):
            leaf = qkv.to(dtype).requires_grad_()
            q, k, v = leaf.unbind(1)
            if run == "ours":
                out = kernels.attention_varlen(q, k, v, cu_seqlens, cu_seqlens, max(lengths), max(lengths), backend="triton")
            else:
                out = attention_varlen_reference(q, k, v, cu_seqlens, cu_seqlens)
            (grad,) = torch.autograd.grad(out, leaf, grad_out.to(dtype))
            outputs[run] = (out.detach(), grad)
        row["result"] = _compared(outputs)
    except TimeoutError as error:
        row["result"] = str(error)
    except AssertionError as error:
        row["result"] = f"FAIL: {_one_line(error, 300)}"
    except Exception as error:  # noqa: BLE001 - recorded, the timings still run
        row["result"] = f"ERROR: {_one_line(error, 300)}"
    finally:
        outputs = qkv = grad_out = None
        _free()

    timings = []
    for mix, backward in ((native, False), (native, True), (windows, False)):
        lengths = mix.lengths
        cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
        case = f"varlen {mix.name} {len(lengths)} seqs {sum(lengths)} tokens bf16 {'fwd+bwd' if backward else 'fwd'}"
        work = dataclasses.replace(mix, backward=backward).work()
        qkv = torch.randn(sum(lengths), 3, mix.heads, mix.head_dim, device=DEVICE, dtype=torch.bfloat16,
                          requires_grad=backward)
        grad_out = torch.randn(sum(lengths), mix.heads, mix.head_dim, device=DEVICE, dtype=torch.bfloat16)
        for provider, (role, _) in PROVIDERS.items():
            row = {"case": case, "provider": "vitriton" if provider == "ours" else provider, "role": role}
            timings.append(row)
            if not clock.allows("varlen"):
                row["error"] = "not run: out of time"
                continue
            try:
                attend = varlen_call(provider, cu_seqlens, lengths)

                def fn(attend=attend, qkv=qkv, grad_out=grad_out, backward=backward):
                    out = attend(*qkv.unbind(1))
                    if backward:
                        torch.autograd.grad(out, qkv, grad_out)

                ms = _timed(fn)
            except BaseException as error:  # pytest.skip (flash-attn not importable) is a BaseException
                if isinstance(error, KeyboardInterrupt):
                    raise
                row["error"] = _one_line(error)
                _free()
                continue
            row.update(ms=ms, inputs="views of a packed qkv", **(limits.describe(work, ms / 1e3) if limits else {}))
        qkv = grad_out = None
        _free()
    return correctness, timings


def conv_patch_embed(images, weight, bias, cls_token, pos_embed):
    """What a PyTorch ViT runs: (B, C, H, W) -> (B, 1 + N, D)."""
    tokens = torch.nn.functional.conv2d(images, weight, bias, stride=weight.shape[-1])  # (B, D, H/P, W/P)
    tokens = tokens.flatten(2).transpose(1, 2)  # (B, N, D)
    tokens = torch.cat([cls_token.expand(images.shape[0], -1, -1), tokens], dim=1)  # (B, 1 + N, D)
    return tokens + pos_embed


def time_patch_embed(clock: Clock, limits) -> list[dict]:
    """ViT-B/16's patch projection (224 px, P=16, D=768), bf16, B=256 forward and forward + backward
    (weight, bias, class token and position gradients), B=1 forward; cuDNN picks its fastest conv."""
    import kernels
    from bench.roofline import patch_embed_work

    image, patch, dim = PATCH_EMBED["image"], PATCH_EMBED["patch"], PATCH_EMBED["dim"]
    n_tokens = 1 + (image // patch) ** 2
    providers = {
        "vitriton": ("ours", lambda *tensors: kernels.patch_embed(*tensors, backend="triton")),
        "conv2d": ("peer", conv_patch_embed),
    }
    rows = []
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        for batch, backward in ((PATCH_EMBED["batch"], False), (PATCH_EMBED["batch"], True), (1, False)):
            case = f"patch_embed vit_b16 B={batch} bf16 {'fwd+bwd' if backward else 'fwd'}"
            work = patch_embed_work(batch, 3, image, patch, dim, torch.bfloat16, backward)
            images = torch.randn(batch, 3, image, image, device=DEVICE, dtype=torch.bfloat16)
            params = [
                (torch.randn(*size, device=DEVICE, dtype=torch.bfloat16) * 0.02).requires_grad_(backward)
                for size in ((dim, 3, patch, patch), (dim,), (1, 1, dim), (1, n_tokens, dim))
            ]
            grad_out = torch.randn(batch, n_tokens, dim, device=DEVICE, dtype=torch.bfloat16)
            for provider, (role, embed) in providers.items():
                row = {"case": case, "provider": provider, "role": role}
                rows.append(row)
                if not clock.allows("patch"):
                    row["error"] = "not run: out of time"
                    continue

                def fn(embed=embed, images=images, params=params, backward=backward, grad_out=grad_out):
                    tokens = embed(images, *params)
                    if backward:
                        torch.autograd.grad(tokens, params, grad_out)

                try:
                    ms = _timed(fn)
                except Exception as error:  # noqa: BLE001 - recorded, not fatal
                    row["error"] = _one_line(error)
                    _free()
                    continue
                row.update(ms=ms, inputs="contiguous images", **(limits.describe(work, ms / 1e3) if limits else {}))
            images = params = grad_out = None
            _free()
    finally:
        torch.backends.cudnn.benchmark = previous
    return rows


# ---------------------------------------------------------------------------------------------
# 5 and 6. FP8, and Blackwell.

FP8_TIMED = [("vit_b16", 256), ("vit_l16_384", 64)]
BLACKWELL_TIMED = [("vit_h14", 64), ("siglip_so400m", 64)]  # the head dims sm_100 prunes apart from sm_90


def _fp8_inputs(name: str, batch: int):
    """bf16 q, k, v views of a fused qkv at a named shape, and their quantize_fp8 (v keys-contiguous)."""
    import kernels
    from bench.sass import SHAPES

    shape = SHAPES[name]
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    qkv = torch.randn(batch, shape.tokens, 3, shape.heads, shape.head_dim, device=DEVICE, generator=generator)
    q, k, v = _heads_first(qkv.to(torch.bfloat16))
    return (q, k, v), kernels.quantize_fp8(q, k, v)


def _fp8_result(quantised) -> str:
    """Our FP8 output against float64 attention of the same e4m3 values, within the bound of rounding
    P to e4m3: 2**-4 of each weight, 2**-10 below e4m3's normal range, then the output's bf16 rounding."""
    import kernels
    from kernels.fp8 import dequantize

    q8, k8, v8, qd, kd, vd = quantised
    out = kernels.attention(q8, k8, v8, q_descale=qd, k_descale=kd, v_descale=vd, backend="triton").double()
    q, k, v = (dequantize(t, d, torch.float64) for t, d in ((q8, qd), (k8, kd), (v8, vd)))
    weights = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
    expected = weights @ v
    magnitudes = v.abs()
    bound = 2.0**-4 * (weights @ magnitudes) + 2.0**-10 * magnitudes.sum(-2, keepdim=True) + 2.0**-8 * expected.abs()
    error = (out - expected).abs()
    over = (error > bound).sum().item()
    verdict = "pass" if over == 0 else f"FAIL: {over} elements over the bound"
    return f"{verdict} (max error {error.max().item():.2e}, mean {error.mean().item():.2e}, bound mean {bound.mean().item():.2e})"


def _fp8_providers():
    """{provider: (role, forward(q, k, v, quantised), context)}: FP8 on quantised inputs, FP8 with the
    quantising, our bf16 forward, SDPA flash and cuDNN, on the same bf16 q, k, v."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import kernels

    def fp8(q, k, v, quantised):
        q8, k8, v8, qd, kd, vd = quantised
        return kernels.attention(q8, k8, v8, q_descale=qd, k_descale=kd, v_descale=vd, backend="triton")

    def fp8_quantising(q, k, v, quantised):
        return fp8(q, k, v, kernels.quantize_fp8(q, k, v))

    def sdpa(q, k, v, quantised):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    return {
        "vitriton-fp8": ("ours", fp8, contextlib.nullcontext),
        "vitriton-fp8 + quantize_fp8": ("ours", fp8_quantising, contextlib.nullcontext),
        "vitriton-bf16": ("ours", lambda q, k, v, _: kernels.attention(q, k, v, backend="triton"), contextlib.nullcontext),
        "sdpa-flash": ("peer", sdpa, lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)),
        "sdpa-cudnn": ("peer", sdpa, lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION)),
    }


def _fp8_phase(clock: Clock, limits, phase: str, checked: list[tuple[str, int]], timed: list[tuple[str, int]],
               bf16_backward: bool = False) -> tuple[list[dict], list[dict]]:
    """Correctness rows for ``checked`` and timing rows for ``timed`` ((shape, batch) pairs)."""
    import kernels
    from bench.roofline import attention_work
    from bench.sass import SHAPES

    correctness, timings = [], []
    major, minor = torch.cuda.get_device_capability()
    for name, batch in checked:
        shape = SHAPES[name]
        row = {"shape": f"{name} FP8 forward", "B, H, N, D": f"{batch}, {shape.heads}, {shape.tokens}, {shape.head_dim}"}
        correctness.append(row)
        if major * 10 + minor < 89:
            row["result"] = f"not run: FP8 tensor cores need sm_89 or later, this GPU is sm_{major}{minor}"
            continue
        if not clock.allows(phase):
            row["result"] = "not run: out of time"
            continue
        try:
            _, quantised = _fp8_inputs(name, batch)
            row["result"] = _fp8_result(quantised)
        except Exception as error:  # noqa: BLE001 - recorded, the next shape still runs
            row["result"] = f"ERROR: {_one_line(error, 300)}"
        finally:
            quantised = None
            _free()
    providers = _fp8_providers()
    if phase == "blackwell":
        import kernels

        providers["vitriton-bf16 not warp-specialised"] = (
            "ours", lambda q, k, v, _: kernels.attention(q, k, v, backend="triton"), _without_warp_specialisation,
        )
    for name, batch in timed:
        shape = SHAPES[name]
        (q, k, v), quantised = _fp8_inputs(name, batch)
        b, h, n, d = batch, shape.heads, shape.tokens, shape.head_dim
        for provider, (role, forward, context) in providers.items():
            case = f"attention {name} B={b} fwd ({'FP8' if phase == 'fp8' else 'Blackwell'} phase)"
            fp8 = provider.startswith("vitriton-fp8")
            row = {"case": case, "provider": provider, "role": role}
            timings.append(row)
            if not clock.allows(phase) or (fp8 and major * 10 + minor < 89):
                row["error"] = "not run: out of time" if clock.allows(phase) is False else "not run: no FP8 tensor cores"
                continue
            work = attention_work(b, h, n, n, d, torch.bfloat16, False)
            try:
                with context():
                    ms = _timed(lambda forward=forward, inputs=(q, k, v, quantised): forward(*inputs))
            except Exception as error:  # noqa: BLE001 - recorded, not fatal
                row["error"] = _one_line(error)
                _free()
                continue
            if fp8:  # the roofline is bf16's (measure_limits): TFLOP/s only, the FP8 peak is about twice it
                row.update(ms=ms, inputs="e4m3 q, k views of a fused qkv, v keys-contiguous; no roofline",
                           tflops=work.flops / (ms / 1e3) / 1e12)
            else:
                row.update(ms=ms, inputs="views of a fused qkv", **(limits.describe(work, ms / 1e3) if limits else {}))
        if bf16_backward:
            qkv = torch.randn(b, n, 3, h, d, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
            grad_out = torch.randn(b, h, n, d, device=DEVICE, dtype=torch.bfloat16)
            row = {"case": f"attention {name} B={b} bf16 fwd+bwd (Blackwell phase)", "provider": "vitriton", "role": "ours"}
            timings.append(row)
            if clock.allows(phase):
                row.update(_time_one(lambda q, k, v: kernels.attention(q, k, v, backend="triton"), qkv, grad_out,
                                     attention_work(b, h, n, n, d, torch.bfloat16, True), limits))
            else:
                row["error"] = "not run: out of time"
        q = k = v = quantised = qkv = grad_out = None
        _free()
    return correctness, timings


@contextlib.contextmanager
def _without_warp_specialisation():
    """Our forward on sm_100 made to run the 16-bit kernel of sm_90 rather than the warp-specialised one."""
    from kernels.triton import launch

    saved = launch._ws_forward_wanted
    launch._ws_forward_wanted = lambda *args, **kwargs: False
    try:
        yield
    finally:
        launch._ws_forward_wanted = saved


def check_and_time_fp8(clock: Clock, limits) -> tuple[list[dict], list[dict]]:
    """Phase 5: FP8 at ViT-B/16 and ViT-L/16-384 (``FP8_TIMED``), checked then timed."""
    return _fp8_phase(clock, limits, "fp8", FP8_TIMED, FP8_TIMED)


def check_blackwell(clock: Clock, limits) -> tuple[list[dict], list[dict]]:
    """Phase 6, on sm_100 only: FP8 checked at the four shapes, FP8 and bf16 timed at the split head dims."""
    major, minor = torch.cuda.get_device_capability()
    if major != 10:
        return [{"shape": "Blackwell phase", "B, H, N, D": "-",
                 "result": f"not run: needs an sm_100 GPU (B200/GB200), this one is sm_{major}{minor}"}], []
    from bench.sass import SHAPES

    checked = [(name, SHAPES[name].batch) for name in CORRECTNESS_ORDER]
    return _fp8_phase(clock, limits, "blackwell", checked, BLACKWELL_TIMED, bf16_backward=True)


# ---------------------------------------------------------------------------------------------
# 7. Many GPUs: the distributed engines.

ENGINE_ROW = "4, 2, 17, 16"  # tests/distributed/engines_worker.py's tiny models: batch, heads, tokens, head dim


def engine_cases(world: int) -> list[str]:
    """engine:model:backend:compile, as tests/distributed/test_engines.py names them: the 1-D meshes
    on 2 GPUs, FSDP2 x TP on a 2 x 2 mesh when ``world`` is 4."""
    if world == 4:
        return [f"fsdp2_tp:{model}:triton:none" for model in ("timm", "vit")]
    plain = [f"{e}:{m}:triton:none" for e in ("ddp", "fsdp2", "fsdp2_checkpoint", "tp") for m in ("timm", "vit")]
    return plain + [f"{e}:timm:triton:{c}" for e in ("ddp", "fsdp2") for c in ("aot_eager", "inductor")]


def check_engines(timeout_s: float) -> list[dict]:
    """One correctness row per engine case, or one row saying why none ran. Each process group is
    started as torchrun would (``tests.distributed.engines_worker.launch``), one rank per GPU."""
    import tempfile

    from tests.distributed.engines_worker import launch

    gpus = torch.cuda.device_count()
    if gpus < 2 or timeout_s <= 0:
        why = f"needs 2 CUDA GPUs, found {gpus}" if gpus < 2 else "--engines-timeout 0"
        return [{"shape": "distributed engines", "B, H, N, D": ENGINE_ROW, "result": f"not run: {why}"}]
    rows, deadline = [], time.perf_counter() + timeout_s
    for world in (2, 4) if gpus >= 4 else (2,):
        cases = engine_cases(world)
        try:
            with tempfile.TemporaryDirectory() as out:
                results = launch(world, cases, Path(out), max(deadline - time.perf_counter(), 1), device="cuda")
        except TimeoutError as error:
            results = dict.fromkeys(cases, f"ERROR: {_one_line(error, 300)}")
        for case, result in results.items():
            text = "pass" if result == "ok" else (result if result.startswith("ERROR") else f"FAIL: {_one_line(Exception(result), 300)}")
            rows.append({"shape": f"{case} ({world} GPUs, NCCL)", "B, H, N, D": ENGINE_ROW, "result": text})
    return rows


# ---------------------------------------------------------------------------------------------
# The report.


def markdown(header: list[str], correctness: list[dict], timings: list[dict]) -> str:
    lines = ["## GPU check (`python -m bench.gpu_check`)", "", *[f"- {line}" for line in header], ""]
    lines += ["### Correctness: bf16 output and qkv gradient against float64", "",
              "| shape | B, H, N, D | result |", "|---|---|---|"]
    lines += [f"| {r['shape']} | {r['B, H, N, D']} | {r['result']} |" for r in correctness]
    lines += ["", "### Timings", "",
              ("\"vs fastest peer\": the fastest peer's time over this provider's (above 1: faster than every "
               "peer); \"roofline\": the share of the binding limit (compute or memory) reached."), "",
              "| case | provider | ms | TFLOP/s | vs fastest peer | roofline | inputs / error |",
              "|---|---|---:|---:|---:|---:|---|"]
    fastest = {}
    for r in timings:
        if r["role"] == "peer" and "ms" in r:
            fastest[r["case"]] = min(fastest.get(r["case"], float("inf")), r["ms"])
    for r in timings:
        if "ms" not in r:
            lines.append(f"| {r['case']} | {r['provider']} | | | | | {r['error']} |")
            continue
        ratio = f"{fastest[r['case']] / r['ms']:.2f}x" if r["case"] in fastest else "no peer ran"
        tflops = f"{r['tflops']:.1f}" if "tflops" in r else ""
        roofline = f"{r['roofline_fraction']:.0%} ({r['bound']})" if "roofline_fraction" in r else ""
        lines.append(f"| {r['case']} | {r['provider']} | {r['ms']:.3f} | {tflops} | {ratio} | {roofline} | {r['inputs']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=300.0, help="seconds for the three phases (default 300)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "gpu_check.md")
    parser.add_argument("--engines-timeout", type=float, default=240.0,
                        help="seconds for phase 5, the distributed engines on 2+ GPUs (default 240; 0 skips it)")
    options = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.gpu_check: no CUDA GPU here (torch.cuda.is_available() is False): nothing checked or timed",
              file=sys.stderr)
        return EXIT_NO_GPU
    import triton

    from bench.roofline import measure_limits

    clock = Clock(options.budget)
    print(f"bench.gpu_check on {torch.cuda.get_device_name()}: budget {options.budget:.0f} s", flush=True)
    try:
        limits = measure_limits(torch.device("cuda"))
    except Exception as error:  # noqa: BLE001 - timings without roofline fractions
        limits, limits_text = None, f"limits not measured: {_one_line(error)}"
    else:
        limits_text = f"limits: {limits.tflops:.0f} TFLOP/s ({limits.tflops_how}), {limits.gbs:.0f} GB/s ({limits.gbs_how})"
    correctness = check_correctness(clock)
    print(f"correctness done at {clock.elapsed():.0f} s", flush=True)
    timings = time_attention(clock, limits)
    print(f"attention timed at {clock.elapsed():.0f} s", flush=True)
    timings += time_switch_over(clock, limits)
    print(f"fused backward against the pair timed at {clock.elapsed():.0f} s", flush=True)
    fp8_correctness, fp8_timings = check_and_time_fp8(clock, limits)
    correctness += fp8_correctness
    timings += fp8_timings
    print(f"FP8 checked and timed at {clock.elapsed():.0f} s", flush=True)
    varlen_correctness, varlen_timings = time_varlen(clock, limits)
    correctness += varlen_correctness
    timings += varlen_timings
    print(f"varlen checked and timed at {clock.elapsed():.0f} s", flush=True)
    timings += time_patch_embed(clock, limits)
    blackwell_correctness, blackwell_timings = check_blackwell(clock, limits)
    correctness += blackwell_correctness
    timings += blackwell_timings
    correctness += check_engines(options.engines_timeout)
    print(f"distributed engines checked at {clock.elapsed():.0f} s", flush=True)
    header = [
        (f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}, "
         f"CUDA {torch.version.cuda}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"),
        limits_text,
        ("timing: triton.testing.do_bench median (CUDA events) after a first call that compiles and autotunes; "
         f"whole run {clock.elapsed():.0f} s"),
    ]
    report = markdown(header, correctness, timings)
    options.out.write_text(report)
    print(report)
    print(f"written to {options.out}")
    failed = any(not r["result"].startswith(("pass", "not run")) for r in correctness)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
