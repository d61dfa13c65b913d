"""vitriton's kernels: fused Triton attention and patch projection, with their einsum references.

    import kernels
    out = kernels.attention(q, k, v, mask=None)           # (B, H, N, D) in, (B, H, N, D) out
    out = kernels.scaled_dot_product_attention(q, k, v)   # torch.nn.functional's, same arguments
    out = kernels.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k)  # packed (total, H, D), flash-attn's layout
    q8, k8, v8, *descales = kernels.quantize_fp8(q, k, v)  # e4m3 and (B, H) float32 descales
    out = kernels.attention(q8, k8, v8, q_descale=..., k_descale=..., v_descale=...)  # FP8 inference, bf16 out
    tokens = kernels.patch_embed(images, conv.weight, conv.bias, cls_token, pos_embed)
    with kernels.use_backend("einsum"): ...               # this thread; VITRITON_BACKEND for the process
    report = kernels.swap(timm_or_torchvision_or_hf_vit)  # our kernels in their model, in place

Triton runs on CUDA tensors the kernels can take, the einsum fallback otherwise (see ``kernels.backend``).
"""

# ``kernels.swap`` names the function, bound here over the subpackage of the same name; the
# function carries the subpackage's public names (``kernels.swap.TARGETS``, ``swap_table()``).
# The Triton kernels are imported when first called (``kernels/dispatch.py``).
from kernels.backend import BACKENDS, fused_by_default, get_backend, use_backend
from kernels.dispatch import (
    attention,
    attention_varlen,
    patch_embed,
    scaled_dot_product_attention,
)
from kernels.fp8 import fp8_mode, quantize_fp8
from kernels.swap import SwapReport, register_transformers_attention, swap, unswap

__all__ = [
    "BACKENDS",
    "SwapReport",
    "attention",
    "attention_varlen",
    "fp8_mode",
    "fused_by_default",
    "get_backend",
    "patch_embed",
    "quantize_fp8",
    "register_transformers_attention",
    "scaled_dot_product_attention",
    "swap",
    "unswap",
    "use_backend",
]
