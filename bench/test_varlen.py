"""Packed images of different sizes: ``kernels.attention_varlen`` against what people do today.

One group per (mix, dtype, pass), the providers on the same packed q, k, v (total, H, D):
  ours                   ``kernels.attention_varlen``: the Triton varlen kernels on a GPU (one
                         launch for every image); on a CPU the einsum fallback, one image at a time
  sdpa-per-image         transformers' non-flash path: one SDPA call per image, then a cat
  sdpa-block-diagonal    one SDPA call with a (total, total) bool mask (Pixtral's way)
  flex-document          compiled FlexAttention with a document mask (GPU only)
  flash-attn-varlen      ``flash_attn_varlen_func`` when importable (GPU only)

Mixes: 8 images of 224-1024 px at patch 14 (a VLM's native-resolution batch) on a GPU, whole and
(with ``--bench-sweep``) cut into Qwen2.5-VL's windows of 8 x 8 patches (64 tokens, fewer at the
edges); on a CPU a smaller one (4 images of 112-336 px), float32 (and bfloat16 in the sweep). Work
is counted over the per-image (per-window) blocks only.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import kernels
from bench.harness import (
    COMPILED_ON_GPU_ONLY,
    DEVICE,
    DTYPE_NAMES,
    NEEDS_GPU,
    ON_GPU,
    case_params,
    measure,
    provider_params,
    synchronize,
)
from bench.roofline import Work, attention_work


@dataclasses.dataclass(frozen=True)
class Mix:
    name: str
    sides: tuple[tuple[int, int], ...]  # (height, width) in pixels per image
    patch: int
    heads: int
    head_dim: int
    dtype: torch.dtype
    backward: bool
    window: int = 0  # > 0: attention within windows of window x window patches (Qwen2.5-VL: 8)

    @property
    def lengths(self) -> list[int]:
        grids = [(h // self.patch, w // self.patch) for h, w in self.sides]
        if not self.window:
            return [rows * cols for rows, cols in grids]
        # Windows tile each image's grid from its top-left corner; those at the right and bottom
        # edges are cut short, as in Qwen2.5-VL's get_window_index.
        def spans(n):
            return [min(self.window, n - start) for start in range(0, n, self.window)]
        return [r * c for rows, cols in grids for r in spans(rows) for c in spans(cols)]

    @property
    def group(self) -> str:
        passes = "fwd+bwd" if self.backward else "fwd"
        return f"varlen {self.name} images={len(self.sides)} tokens={sum(self.lengths)} H={self.heads} D={self.head_dim} {DTYPE_NAMES[self.dtype]} {passes}"

    def record(self) -> dict:
        return {"op": "attention_varlen", "mix": self.name, "lengths": self.lengths, "heads": self.heads,
                "head_dim": self.head_dim, "dtype": DTYPE_NAMES[self.dtype], "backward": self.backward}

    def work(self) -> Work:
        parts = [attention_work(1, self.heads, n, n, self.head_dim, self.dtype, self.backward) for n in self.lengths]
        return Work(sum(p.flops for p in parts), sum(p.bytes for p in parts))


GPU_SIDES = ((224, 224), (448, 336), (1024, 768), (336, 224), (672, 672), (224, 448), (896, 560), (308, 420))
CPU_SIDES = ((112, 112), (336, 224), (224, 168), (140, 280))
MIXES = {
    f"{name}-{DTYPE_NAMES[dtype]}-{'fwdbwd' if backward else 'fwd'}": Mix(name, sides, 14, 16, 80, dtype, backward, window)
    for name, sides, dtypes, window in (
        [("vlm-native", GPU_SIDES, (torch.bfloat16,), 0), ("vlm-windows", GPU_SIDES, (torch.bfloat16,), 8)] if ON_GPU
        else [("small-native", CPU_SIDES, (torch.float32, torch.bfloat16), 0)]
    )
    for dtype in dtypes
    for backward in (False, True)
}


def in_default(mix: Mix) -> bool:
    """Timed without ``--bench-sweep``: whole images (no windows), bf16 on a GPU, float32 on a CPU."""
    return not mix.window and mix.dtype == (torch.bfloat16 if ON_GPU else torch.float32)


PROVIDERS = {  # name: (role, why it cannot run on a CPU or None)
    "ours": ("ours", None),
    "sdpa-per-image": ("peer", None),
    "sdpa-block-diagonal": ("peer", None),
    "flex-document": ("peer", COMPILED_ON_GPU_ONLY),
    "flash-attn-varlen": ("peer", NEEDS_GPU),
}


def varlen_call(provider: str, cu_seqlens: torch.Tensor, lengths: list[int]):
    total, longest = sum(lengths), max(lengths)
    if provider == "ours":
        return lambda q, k, v: kernels.attention_varlen(q, k, v, cu_seqlens, cu_seqlens, longest, longest)
    if provider == "sdpa-per-image":
        def per_image(q, k, v):  # (total, H, D) -> per image (1, H, n, D), as transformers' Qwen2-VL loop
            pieces = zip(*(t.transpose(0, 1)[None].split(lengths, dim=2) for t in (q, k, v)))
            return torch.cat([F.scaled_dot_product_attention(*p) for p in pieces], dim=2)[0].transpose(0, 1)
        return per_image
    owner = torch.repeat_interleave(torch.arange(len(lengths), device=DEVICE), torch.tensor(lengths, device=DEVICE))
    if provider == "sdpa-block-diagonal":
        block_diagonal = owner[:, None] == owner[None, :]  # (total, total), made once outside the timed call

        def masked(q, k, v):
            out = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), attn_mask=block_diagonal)
            return out[0].transpose(0, 1)
        return masked
    if provider == "flex-document":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        block_mask = create_block_mask(lambda b, h, qi, ki: owner[qi] == owner[ki], None, None, total, total, device=DEVICE)
        flex = torch.compile(flex_attention, dynamic=False)
        return lambda q, k, v: flex(*(t.transpose(0, 1)[None] for t in (q, k, v)), block_mask=block_mask)[0].transpose(0, 1)
    if provider == "flash-attn-varlen":
        flash_attn = pytest.importorskip("flash_attn", reason="flash-attn is not importable here")
        return lambda q, k, v: flash_attn.flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, longest, longest)
    raise ValueError(f"unknown provider {provider!r}")


@pytest.mark.parametrize("provider", provider_params(PROVIDERS))
@pytest.mark.parametrize("mix_id", case_params(MIXES, in_default))
def test_attention_varlen(benchmark, machine_limits, mix_id: str, provider: str):
    mix = MIXES[mix_id]
    role, _ = PROVIDERS[provider]
    lengths = mix.lengths
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    cu_seqlens = torch.tensor(starts, dtype=torch.int32, device=DEVICE)
    qkv = torch.randn(sum(lengths), 3, mix.heads, mix.head_dim, device=DEVICE, dtype=mix.dtype, requires_grad=mix.backward)
    grad_out = torch.randn(sum(lengths), mix.heads, mix.head_dim, device=DEVICE, dtype=mix.dtype) if mix.backward else None
    attend = varlen_call(provider, cu_seqlens, lengths)

    def timed():
        out = attend(*qkv.unbind(1))
        if grad_out is not None:
            torch.autograd.grad(out, qkv, grad_out)
        synchronize()

    measure(benchmark, [("views of a packed qkv", timed)], provider=provider, role=role, work=mix.work(),
            limits=machine_limits, case=mix.record())
