"""The whole model: vitriton's ViT with the flag on and off, against timm's, eager and compiled.

Inference (a forward under ``no_grad``) and a training step (forward, cross-entropy, backward,
AdamW step, gradients zeroed), under bf16 autocast with float32 weights, as mixed-precision
training runs. ``fused=True`` runs our Triton kernels; ``fused=False`` the einsum reference and
nn modules; timm's ViT uses ``F.scaled_dot_product_attention`` (its ``fused_attn``, recorded).
Each result records images/s, an approximate TFLOP/s (bench/roofline.py counts the matmuls) and,
on a GPU, the peak memory allocated while timing (``torch.cuda.max_memory_allocated``).

On a GPU: ViT-B/16 at 224 (and ViT-L/16 with ``--bench-sweep``). On a CPU: ViT-Ti/16 inference at
B=2 in float32.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import vit
from bench.harness import (
    COMPILED_ON_GPU_ONLY,
    DEVICE,
    DTYPE_NAMES,
    ON_GPU,
    TRITON_NEEDS_GPU,
    case_params,
    cudnn_autotuned,
    measure,
    provider_params,
    synchronize,
)
from bench.roofline import model_work, vit_forward_flops


@dataclasses.dataclass(frozen=True)
class Case:
    model: str  # a vit.PRESETS name; timm has the same architecture under the same name
    batch: int
    train: bool
    dtype: torch.dtype  # the autocast dtype; float32 means no autocast

    @property
    def passes(self) -> str:
        return "train step" if self.train else "inference"

    @property
    def group(self) -> str:
        return f"model {self.model} B={self.batch} {DTYPE_NAMES[self.dtype]} {self.passes}"

    @property
    def id(self) -> str:
        return f"{self.model}-b{self.batch}-{DTYPE_NAMES[self.dtype]}-{'train' if self.train else 'inference'}"

    def record(self) -> dict:
        return {"op": "model", "shape": self.model, "batch": self.batch, "dtype": DTYPE_NAMES[self.dtype], "pass": self.passes}


if ON_GPU:
    CASE_LIST = [
        Case("vit_base_patch16_224", 256, False, torch.bfloat16),
        Case("vit_base_patch16_224", 128, True, torch.bfloat16),
        Case("vit_large_patch16_224", 256, False, torch.bfloat16),
        Case("vit_large_patch16_224", 64, True, torch.bfloat16),
    ]
else:
    CASE_LIST = [Case("vit_tiny_patch16_224", 2, False, torch.float32)]
CASES = {case.id: case for case in CASE_LIST}


def in_default(case: Case) -> bool:
    """Timed without ``--bench-sweep``: every size but ViT-L/16."""
    return not case.model.startswith("vit_large")


# provider -> (role, why it does not run on a CPU, or None)
PROVIDERS = {
    "vitriton-fused": ("ours", TRITON_NEEDS_GPU),
    "vitriton-unfused": ("reference", None),
    "timm": ("peer", None),
    "vitriton-fused-compiled": ("ours", TRITON_NEEDS_GPU),
    "vitriton-unfused-compiled": ("reference", COMPILED_ON_GPU_ONLY),
    "timm-compiled": ("peer", COMPILED_ON_GPU_ONLY),
}


def build_model(provider: str, case: Case) -> torch.nn.Module:
    if provider.startswith("timm"):
        timm = pytest.importorskip("timm", reason="timm is not importable here")
        model = timm.create_model(case.model, pretrained=False)
    else:
        model = vit.create_model(case.model, fused=provider.startswith("vitriton-fused"))
    return model.to(DEVICE).train(case.train)


@pytest.mark.parametrize("provider", provider_params(PROVIDERS))
@pytest.mark.parametrize("case_id", case_params(CASES, in_default))
def test_model(benchmark, machine_limits, case_id: str, provider: str):
    case = CASES[case_id]
    role, _ = PROVIDERS[provider]
    config = vit.PRESETS[case.model]
    model = build_model(provider, case)
    forward = torch.compile(model) if provider.endswith("-compiled") else model
    images = torch.randn(case.batch, config.in_channels, config.image_size, config.image_size, device=DEVICE)
    labels = torch.randint(0, config.num_classes, (case.batch,), device=DEVICE)

    def autocast():
        return torch.autocast(DEVICE.type, dtype=case.dtype, enabled=case.dtype != torch.float32)

    def inference():
        with torch.no_grad(), autocast():
            forward(images)
        synchronize()

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4) if case.train else None

    def train_step():
        with autocast():
            loss = F.cross_entropy(forward(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize()

    fused_attn = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    if fused_attn:
        benchmark.extra_info["timm_fused_attn"] = all(fused_attn)
    per_image = vit_forward_flops(
        config.image_size, config.patch_size, config.embed_dim, config.depth, config.mlp_ratio, config.num_classes
    )
    median = measure(
        benchmark,
        [("float32 images", train_step if case.train else inference)],
        provider=provider,
        role=role,
        work=model_work(case.batch, per_image, case.train),
        limits=machine_limits,
        case=case.record(),
        context=cudnn_autotuned(),  # timm's and the unfused patch projection are convolutions
    )
    if median is not None:
        benchmark.extra_info["images_per_s"] = case.batch / median
