"""The einsum references: what every fused kernel in this package must equal.

Written as plainly as the tutorial they come from, and fixed where the tutorial was wrong:
the scale multiplies the logits before the softmax (not the probabilities after it), the mask
is applied with ``masked_fill`` and its result kept (the tutorial called ``mask_fill``, which
does not exist, and would have thrown the result away), and a query row whose keys are all
masked out gets zeros instead of NaN.

These functions are also the CPU fallback: ``kernels.attention`` and ``kernels.patch_embed``
call them when the dispatch picks ``"einsum"``.
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat


def safe_softmax(energy: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim that returns 0 (not NaN) for a row that is all -inf.

    A row whose every key is masked has no probability to spread; PyTorch's math SDPA and
    FlexAttention return zeros there, and so do we. Subtracting a row maximum of -inf would
    give NaN, so such rows subtract 0 instead, and their zero sum is divided by 1.
    """
    row_max = energy.amax(dim=-1, keepdim=True).detach()
    row_max = row_max.masked_fill(row_max == float("-inf"), 0.0)
    weights = torch.exp(energy - row_max)
    row_sum = weights.sum(dim=-1, keepdim=True)
    return weights / row_sum.masked_fill(row_sum == 0, 1.0)


def causal_mask(n_queries: int, n_keys: int, device=None) -> torch.Tensor:
    """True where query i may attend key j: j <= i, aligned to the top left as in SDPA."""
    return torch.ones(n_queries, n_keys, dtype=torch.bool, device=device).tril()


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    *,
    is_causal: bool = False,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-head attention, written out: q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv).

    ``mask`` broadcasts to (B, H, Nq, Nk): bool (True = may attend) or float (added to the
    scaled logits). ``dropout_mask`` (bool, True = keep, shape (B, H, Nq, Nk)) replaces the
    random draw, so a test can apply exactly the mask a kernel used.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    energy = torch.einsum("bhqd, bhkd -> bhqk", q, k) * scale  # (B, H, Nq, Nk), scaled logits
    if is_causal:
        energy = energy.masked_fill(~causal_mask(q.shape[-2], k.shape[-2], q.device), float("-inf"))
    if mask is not None:
        if mask.dtype == torch.bool:
            energy = energy.masked_fill(~mask, float("-inf"))
        else:
            energy = energy + mask
    # A float32 bias on float16/bfloat16 logits promotes them to float32; the weights meet v in v's dtype.
    att = safe_softmax(energy).to(v.dtype)  # (B, H, Nq, Nk)
    if dropout_p > 0.0:
        if dropout_mask is None:
            dropout_mask = torch.rand_like(att, dtype=torch.float32) >= dropout_p
        att = att * dropout_mask / (1.0 - dropout_p)
    return torch.einsum("bhal, bhlv -> bhav", att, v)  # (B, H, Nq, Dv)


def patch_embed_reference(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cls_token: torch.Tensor | None = None,
    pos_embed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Image to tokens: images (B, C, H, W), weight (D, C, P, P) in Conv2d layout.

    Cut the image into P x P patches, project each patch with the weight (the same sum a
    stride-P Conv2d computes), prepend the class token (1, 1, D) and add the position
    embedding (1, [1+]N, D) out of place, broadcasting over the batch. Returns (B, [1+]N, D).
    """
    p = weight.shape[-1]
    patches = rearrange(images, "b c (h s1) (w s2) -> b (h w) c s1 s2", s1=p, s2=p)
    tokens = torch.einsum("bncij, dcij -> bnd", patches, weight)  # (B, N, D)
    if bias is not None:
        tokens = tokens + bias
    if cls_token is not None:
        cls_tokens = repeat(cls_token, "() n d -> b n d", b=images.shape[0])
        tokens = torch.cat([cls_tokens, tokens], dim=1)  # (B, 1 + N, D)
    if pos_embed is not None:
        tokens = tokens + pos_embed  # out of place: the tutorial's `x += positions` broke autograd
    return tokens
