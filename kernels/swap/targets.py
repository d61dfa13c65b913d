"""The table of swap targets: every library file's rows, in the order the walk tries them.

``TARGETS`` is timm's rows (timm.py), then torch's and torchvision's (torch_nn.py), then
transformers' (transformers.py), then our own ``vit`` modules, which have a flag (``fused``).
A module takes the first row whose class it is an instance of (or whose ``matches_module`` says
so). The README's swap table is ``swap_table()``, pasted; tests/swap/test_coverage.py checks it.
"""

from __future__ import annotations

from kernels.swap.report import RECORD
from kernels.swap.rows import (
    ATTENTION_DONE,
    PATCH_EMBED_DONE,
    Site,
    SwapTarget,
    head_dim_problem,
)
from kernels.swap.timm import ROWS as TIMM_ROWS
from kernels.swap.torch_nn import ROWS as TORCH_NN_ROWS
from kernels.swap.transformers import ROWS as TRANSFORMERS_ROWS


def _vit_already(site: Site) -> str | None:
    if site.module.fused and RECORD not in site.module.__dict__:
        return "built with fused=True"
    return None


def _vit_problem(site: Site) -> str | None:
    module = site.module
    if hasattr(module, "qkv"):
        return head_dim_problem(module.qkv.in_features // module.num_heads)
    return None


def _vit_fused(site: Site) -> dict:
    return {site.module: {"fused": True}}


VIT_ROWS: tuple[SwapTarget, ...] = (
    SwapTarget(
        library="vit", module_name="vit.model", class_name="MultiHeadAttention", swap_argument="attention",
        becomes=f"{ATTENTION_DONE} (fused=True)",
        why_left_alone=_vit_problem, instance_patches=_vit_fused, already_on_kernels=_vit_already,
    ),
    SwapTarget(
        library="vit", module_name="vit.model", class_name="PatchEmbedding", swap_argument="patch_embed",
        becomes=f"{PATCH_EMBED_DONE} (fused=True)",
        why_left_alone=_vit_problem, instance_patches=_vit_fused, already_on_kernels=_vit_already,
    ),
)

TARGETS: tuple[SwapTarget, ...] = (*TIMM_ROWS, *TORCH_NN_ROWS, *TRANSFORMERS_ROWS, *VIT_ROWS)


def swap_table() -> str:
    """The README's swap table, from ``TARGETS``: each class, and what it becomes."""
    rows = ["| library | module | becomes |", "|---|---|---|"]
    for target in TARGETS:
        where = target.module_name.rsplit(".", 1)[-1]  # beit.Attention, not every timm Attention
        name = target.class_name if target.matches_module else f"`{where}.{target.class_name}`"
        rows.append(f"| {target.library} | {name} | {target.becomes.replace('|', '/')} |")
    return "\n".join(rows)
