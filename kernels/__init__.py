"""vitriton's kernels: fused Triton attention and patch projection, with their einsum references.

    import kernels
    out = kernels.attention(q, k, v, mask=None)           # (B, H, N, D) in, (B, H, N, D) out
    out = kernels.scaled_dot_product_attention(q, k, v)   # torch.nn.functional's, same arguments
    tokens = kernels.patch_embed(images, conv.weight, conv.bias, cls_token, pos_embed)
    with kernels.use_backend("einsum"): ...               # or VITRITON_BACKEND=einsum
    report = kernels.swap(timm_or_torchvision_or_hf_vit)  # our kernels in their model, in place

Triton runs on CUDA tensors, the einsum reference on CPU tensors (see ``kernels.dispatch``).
"""

# The kernel modules share their names with the public functions bound below. Importing a
# submodule sets it as an attribute of the package, so they are imported first and the
# functions bound after them win. Without Triton (it installs on Linux only) the einsum
# reference still works; asking for the Triton backend then says Triton is missing.
try:
    from kernels import attention as _attention_kernels  # noqa: F401
    from kernels import patch_embed as _patch_embed_kernels  # noqa: F401
    from kernels import swap as _swap_module  # noqa: F401
except ImportError as error:  # pragma: no cover - only where triton is not installed
    if getattr(error, "name", "") != "triton":
        raise

from kernels.dispatch import (  # noqa: E402
    BACKENDS,
    attention,
    fused_by_default,
    get_backend,
    patch_embed,
    scaled_dot_product_attention,
    set_backend,
    use_backend,
)
from kernels.swap import SwapReport, register_transformers_attention, swap, unswap  # noqa: E402

__all__ = [
    "BACKENDS",
    "SwapReport",
    "attention",
    "fused_by_default",
    "get_backend",
    "patch_embed",
    "register_transformers_attention",
    "scaled_dot_product_attention",
    "set_backend",
    "swap",
    "unswap",
    "use_backend",
]
