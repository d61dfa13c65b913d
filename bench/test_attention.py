"""Attention: our Triton kernel against the einsum reference and every attention PyTorch offers.

One group per (shape, batch, dtype, pass): the providers side by side on the same inputs. The
inputs are made the way a ViT makes them: one fused qkv projection (B, N, 3, H, D). Each provider
gets views of it in the layout it takes, and whatever it needs beyond views happens inside its
timed call: our kernel and SDPA read the permuted (B, H, N, D) views in place, as timm calls SDPA;
flash-attn and xformers read (B, N, H, D) views; a peer that refuses strided views is retried on
contiguous copies made in the timed call (recorded as ``inputs``).

On a GPU, with ``--bench-sweep``: ViT-S/B/L/16 at 224 (N=197) and 384 (N=577), ViT-H/14 (H=16,
D=80, N=257), the tutorial's 8 heads of 96; batch 1, 64, 256; bf16 and fp16; forward and forward +
backward. By default the sizes the targets name: ViT-B/16 at B=256 and ViT-L/16-384 at B=64, bf16.
On a CPU: the einsum reference against SDPA at B=2, H=2, D=64, float32, N=197 (and N=50 in the sweep).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import kernels
from bench.harness import (
    COMPILED_ON_GPU_ONLY,
    DEVICE,
    NEEDS_GPU,
    ON_GPU,
    TRITON_NEEDS_GPU,
    BenchCase,
    case_params,
    measure,
    provider_params,
    synchronize,
)
from bench.roofline import attention_work


@dataclasses.dataclass(frozen=True)
class Case(BenchCase):
    OP = "attention"
    shape: str  # the model whose attention this is
    heads: int
    tokens: int
    head_dim: int
    batch: int
    dtype: torch.dtype
    backward: bool

    def size_text(self) -> str:
        return f"H={self.heads} N={self.tokens} D={self.head_dim}"

    def size_id(self) -> str:
        return f"n{self.tokens}"

    def size_record(self) -> dict:
        return {"heads": self.heads, "tokens": self.tokens, "head_dim": self.head_dim}


# (shape, heads, tokens, head dim)
GPU_SHAPES = [
    ("ViT-S/16", 6, 197, 64),
    ("ViT-S/16-384", 6, 577, 64),
    ("ViT-B/16", 12, 197, 64),
    ("ViT-B/16-384", 12, 577, 64),
    ("ViT-L/16", 16, 197, 64),
    ("ViT-L/16-384", 16, 577, 64),
    ("ViT-H/14", 16, 257, 80),
    ("tutorial", 8, 197, 96),
]
if ON_GPU:
    CASE_LIST = [
        Case(shape, heads, tokens, head_dim, batch, dtype, backward)
        for shape, heads, tokens, head_dim in GPU_SHAPES
        for batch in (1, 64, 256)
        for dtype in (torch.bfloat16, torch.float16)
        for backward in (False, True)
    ]
else:  # small enough for a CPU run in seconds
    CASE_LIST = [
        Case("small", 2, tokens, 64, 2, torch.float32, backward)
        for tokens in (50, 197)
        for backward in (False, True)
    ]
CASES = {case.id: case for case in CASE_LIST}
TARGET_SIZES = {("ViT-B/16", 256), ("ViT-L/16-384", 64)}  # (shape, batch) the targets name (bench/results_table.py)


def in_default(case: Case) -> bool:
    """Timed without ``--bench-sweep``: the target sizes in bf16 on a GPU, N=197 on a CPU."""
    if ON_GPU:
        return (case.shape, case.batch) in TARGET_SIZES and case.dtype == torch.bfloat16
    return case.tokens == 197


# provider -> (role, why it does not run on a CPU, or None)
PROVIDERS = {
    "vitriton": ("ours", TRITON_NEEDS_GPU),
    "einsum": ("reference", None),
    "sdpa": ("peer", None),  # PyTorch's own choice of backend
    "sdpa-flash": ("peer", NEEDS_GPU),
    "sdpa-cudnn": ("peer", NEEDS_GPU),
    "sdpa-efficient": ("peer", NEEDS_GPU),
    "sdpa-math": ("peer", None),
    "flex-compiled": ("peer", COMPILED_ON_GPU_ONLY),
    "flash-attn": ("peer", NEEDS_GPU),
    "xformers": ("peer", NEEDS_GPU),
}
SDPA_BACKENDS = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-math": SDPBackend.MATH,
}


def heads_first(qkv):
    """(B, N, 3, H, D) -> q, k, v as (B, H, N, D) views, as timm and vit/model.py take them."""
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def tokens_first(qkv):
    """(B, N, 3, H, D) -> q, k, v as (B, N, H, D) views, flash-attn's and xformers' layout."""
    return qkv.unbind(2)


def contiguous(views):
    return [t.contiguous() for t in views]


def attention_calls(provider: str):
    """[(inputs, attend)]: ``attend(qkv)`` returns the output; tried in order by ``measure``."""
    if provider == "vitriton":
        return [("views", lambda qkv: kernels.attention(*heads_first(qkv), backend="triton"))]
    if provider == "einsum":
        return [("views", lambda qkv: kernels.attention(*heads_first(qkv), backend="einsum"))]
    if provider == "sdpa" or provider in SDPA_BACKENDS:
        return [
            ("views", lambda qkv: F.scaled_dot_product_attention(*heads_first(qkv))),
            ("contiguous copies", lambda qkv: F.scaled_dot_product_attention(*contiguous(heads_first(qkv)))),
        ]
    if provider == "flex-compiled":
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        return [
            ("views", lambda qkv: flex(*heads_first(qkv))),
            ("contiguous copies", lambda qkv: flex(*contiguous(heads_first(qkv)))),
        ]
    if provider == "flash-attn":
        flash_attn = pytest.importorskip("flash_attn", reason="flash-attn is not importable here")
        return [("views", lambda qkv: flash_attn.flash_attn_func(*tokens_first(qkv)))]
    if provider == "xformers":
        xformers_ops = pytest.importorskip("xformers.ops", reason="xformers is not importable here")
        return [("views", lambda qkv: xformers_ops.memory_efficient_attention(*tokens_first(qkv)))]
    raise ValueError(f"unknown provider {provider!r}")


def timed_unit(attend, qkv, grad_out):
    """The timed call: attention alone, or attention and the gradient with respect to qkv."""
    if grad_out is None:
        def forward():
            attend(qkv)
            synchronize()

        return forward

    def forward_backward():
        out = attend(qkv)
        # The gradient of the fused qkv, as the qkv Linear's backward needs it: the scatter of
        # dQ, dK, dV back into (B, N, 3, H, D) counts against every provider alike.
        torch.autograd.grad(out, qkv, grad_out)
        synchronize()

    return forward_backward


@pytest.mark.parametrize("provider", provider_params(PROVIDERS))
@pytest.mark.parametrize("case_id", case_params(CASES, in_default))
def test_attention(benchmark, machine_limits, case_id: str, provider: str):
    case = CASES[case_id]
    role, _ = PROVIDERS[provider]
    b, n, h, d = case.batch, case.tokens, case.heads, case.head_dim
    qkv = torch.randn(b, n, 3, h, d, device=DEVICE, dtype=case.dtype, requires_grad=case.backward)  # (B, N, 3, H, D)
    layout = (b, n, h, d) if provider in ("flash-attn", "xformers") else (b, h, n, d)
    grad_out = torch.randn(layout, device=DEVICE, dtype=case.dtype) if case.backward else None
    candidates = [(inputs, timed_unit(attend, qkv, grad_out)) for inputs, attend in attention_calls(provider)]
    measure(
        benchmark,
        candidates,
        provider=provider,
        role=role,
        work=attention_work(b, h, n, n, d, case.dtype, case.backward),
        limits=machine_limits,
        case=case.record(),
        context=sdpa_kernel(SDPA_BACKENDS[provider]) if provider in SDPA_BACKENDS else None,
    )

