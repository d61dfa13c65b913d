"""vitriton's kernels: fused Triton attention and patch projection, with their einsum references.

    import kernels
    out = kernels.attention(q, k, v, mask=None)           # (B, H, N, D) in, (B, H, N, D) out
    out = kernels.scaled_dot_product_attention(q, k, v)   # torch.nn.functional's, same arguments
    out = kernels.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k)  # packed (total, H, D), flash-attn's layout
    tokens = kernels.patch_embed(images, conv.weight, conv.bias, cls_token, pos_embed)
    with kernels.use_backend("einsum"): ...               # this thread; VITRITON_BACKEND for the process
    report = kernels.swap(timm_or_torchvision_or_hf_vit)  # our kernels in their model, in place

Triton runs on CUDA tensors the kernels can take, the einsum fallback otherwise (see ``kernels.dispatch``).
"""

# The kernel modules share their names with the public functions bound below. Importing a
# submodule sets it as an attribute of the package, so they are imported first and the
# functions bound after them win; the swap function carries its module's public names
# (``kernels.swap.TARGETS``, ``kernels.swap.swap_table()``). Without Triton (it installs on
# Linux only) the einsum reference still works; asking for the Triton backend then says Triton
# is missing.
try:
    from kernels import swap as _swap_module  # noqa: F401
    from kernels.triton import attention_ops as _attention_kernels  # noqa: F401
    from kernels.triton import patch_embed as _patch_embed_kernels  # noqa: F401
except ImportError as error:  # pragma: no cover - only where triton is not installed
    if getattr(error, "name", "") != "triton":
        raise

from kernels.dispatch import (
    BACKENDS,
    attention,
    attention_varlen,
    fused_by_default,
    get_backend,
    patch_embed,
    scaled_dot_product_attention,
    use_backend,
)
from kernels.swap import SwapReport, register_transformers_attention, swap, unswap

__all__ = [
    "BACKENDS",
    "SwapReport",
    "attention",
    "attention_varlen",
    "fused_by_default",
    "get_backend",
    "patch_embed",
    "register_transformers_attention",
    "scaled_dot_product_attention",
    "swap",
    "unswap",
    "use_backend",
]
