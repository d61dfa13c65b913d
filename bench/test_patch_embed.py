"""The patch projection: our Triton kernel against the sequence PyTorch models run.

That sequence (timm's PatchEmbed and ``_pos_embed``): Conv2d with kernel = stride = P, flatten,
transpose to (B, N, D), concatenate the class token, add the position embeddings. Timed eager and
``torch.compile``d (which may fuse the last three steps), with cuDNN free to pick its fastest
algorithm. The einsum reference is timed too. The images are data: only the weight, bias, class
token and position embeddings take gradients in the backward pass, as in training.

On a GPU: ViT-B/16 at 224 (B=256), and with ``--bench-sweep`` ViT-L/16 at 224 and ViT-B/16 at 384
(B=64), bf16, forward and forward + backward. On a CPU: a 64x64 image, P=16, D=192, B=2, float32.
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
    ON_GPU,
    TRITON_NEEDS_GPU,
    BenchCase,
    case_params,
    cudnn_autotuned,
    measure,
    provider_params,
    synchronize,
)
from bench.roofline import patch_embed_work

CHANNELS = 3


@dataclasses.dataclass(frozen=True)
class Case(BenchCase):
    OP = "patch_embed"
    shape: str
    image: int
    patch: int
    dim: int
    batch: int
    dtype: torch.dtype
    backward: bool

    def size_text(self) -> str:
        return f"{self.image}x{self.image} P={self.patch} D={self.dim}"

    def size_id(self) -> str:
        return str(self.image)

    def size_record(self) -> dict:
        return {"image": self.image, "patch": self.patch, "dim": self.dim}


if ON_GPU:
    CASE_LIST = [
        Case(shape, image, 16, dim, batch, torch.bfloat16, backward)
        for shape, image, dim, batch in [("ViT-B/16", 224, 768, 256), ("ViT-L/16", 224, 1024, 64), ("ViT-B/16-384", 384, 768, 64)]
        for backward in (False, True)
    ]
else:
    CASE_LIST = [Case("small", 64, 16, 192, 2, torch.float32, backward) for backward in (False, True)]
CASES = {case.id: case for case in CASE_LIST}


def in_default(case: Case) -> bool:
    """Timed without ``--bench-sweep``: ViT-B/16 at 224 on a GPU, the one size on a CPU."""
    return case.shape in ("ViT-B/16", "small")


# provider -> (role, why it does not run on a CPU, or None)
PROVIDERS = {
    "vitriton": ("ours", TRITON_NEEDS_GPU),
    "einsum": ("reference", None),
    "conv2d": ("peer", None),
    "conv2d-compiled": ("peer", COMPILED_ON_GPU_ONLY),
}


def conv_patch_embed(images, weight, bias, cls_token, pos_embed):
    """What a PyTorch ViT runs: (B, C, H, W) -> (B, 1 + N, D)."""
    tokens = F.conv2d(images, weight, bias, stride=weight.shape[-1])  # (B, D, H/P, W/P)
    tokens = tokens.flatten(2).transpose(1, 2)  # (B, N, D)
    tokens = torch.cat([cls_token.expand(images.shape[0], -1, -1), tokens], dim=1)  # (B, 1 + N, D)
    return tokens + pos_embed


def embedder(provider: str):
    if provider == "vitriton":
        return lambda *tensors: kernels.patch_embed(*tensors, backend="triton")
    if provider == "einsum":
        return lambda *tensors: kernels.patch_embed(*tensors, backend="einsum")
    if provider == "conv2d":
        return conv_patch_embed
    if provider == "conv2d-compiled":
        return torch.compile(conv_patch_embed, dynamic=False)
    raise ValueError(f"unknown provider {provider!r}")


@pytest.mark.parametrize("provider", provider_params(PROVIDERS))
@pytest.mark.parametrize("case_id", case_params(CASES, in_default))
def test_patch_embed(benchmark, machine_limits, case_id: str, provider: str):
    case = CASES[case_id]
    role, _ = PROVIDERS[provider]
    n_tokens = 1 + (case.image // case.patch) ** 2

    def param(*shape, scale=0.02):
        return (torch.randn(*shape, device=DEVICE, dtype=case.dtype) * scale).requires_grad_(case.backward)

    images = torch.randn(case.batch, CHANNELS, case.image, case.image, device=DEVICE, dtype=case.dtype)
    params = [
        param(case.dim, CHANNELS, case.patch, case.patch),  # the weight, in Conv2d's layout
        param(case.dim),  # bias
        param(1, 1, case.dim),  # class token
        param(1, n_tokens, case.dim),  # position embeddings
    ]
    embed = embedder(provider)
    grad_out = torch.randn(case.batch, n_tokens, case.dim, device=DEVICE, dtype=case.dtype)

    def forward():
        embed(images, *params)
        synchronize()

    def forward_backward():
        torch.autograd.grad(embed(images, *params), params, grad_out)
        synchronize()

    measure(
        benchmark,
        [("contiguous images", forward_backward if case.backward else forward)],
        provider=provider,
        role=role,
        work=patch_embed_work(case.batch, CHANNELS, case.image, case.patch, case.dim, case.dtype, case.backward),
        limits=machine_limits,
        case=case.record(),
        context=cudnn_autotuned() if provider.startswith("conv2d") else None,
    )
