"""The einsum references: what every fused kernel in this package must equal.

Written as plainly as the tutorial they come from, and fixed where the tutorial was wrong:
the scale multiplies the logits before the softmax (not the probabilities after it), the mask
is applied with ``masked_fill`` and its result kept (the tutorial called ``mask_fill``, which
does not exist, and would have thrown the result away), and a query row whose keys are all
masked out gets zeros instead of NaN. The tests compare the kernels with these, in float64.
"""

from __future__ import annotations

import itertools

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
    stride-P Conv2d computes), prepend the class token(s) (1, T, D) and add the position
    embedding (1, [T+]N, D) out of place, broadcasting over the batch. Returns (B, [T+]N, D).
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


def attention_varlen_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    scale: float | None = None,
    dropout_p: float = 0.0,
    *,
    is_causal: bool = False,
    attend=attention_reference,
    dropout_masks: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Packed sequences, one at a time: q (total_q, H, D), k (total_k, H, D), v (total_k, H, Dv).

    Sequence i is rows ``cu_seqlens_q[i]:cu_seqlens_q[i + 1]`` of q and the matching rows of k
    and v; each goes through ``attend`` (this file's ``attention_reference`` by default; the
    dispatch passes ``attention_fallback``) as a batch of one, and the outputs are packed again.
    A sequence with queries and no keys has nothing to attend: zeros, as a fully masked row.
    ``dropout_masks`` (with ``attention_reference``): sequence i's bool (H, Nq_i, Nk_i) keep mask.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outputs = []
    for i, ((q0, q1), (k0, k1)) in enumerate(zip(itertools.pairwise(starts_q), itertools.pairwise(starts_k))):
        if k1 == k0:
            outputs.append(v.new_zeros(q1 - q0, q.shape[1], v.shape[-1]))
            continue
        # (n, H, D) -> (1, H, n, D): the batch of one that the (B, H, N, D) functions take.
        seq_q, seq_k, seq_v = (t.transpose(0, 1).unsqueeze(0) for t in (q[q0:q1], k[k0:k1], v[k0:k1]))
        given_mask = {} if dropout_masks is None else {"dropout_mask": dropout_masks[i][None]}
        out = attend(seq_q, seq_k, seq_v, None, scale, dropout_p, is_causal=is_causal, **given_mask)  # (1, H, n, Dv)
        outputs.append(out.squeeze(0).transpose(0, 1))  # (n, H, Dv)
    if not outputs:
        return v.new_zeros(0, q.shape[1], v.shape[-1])
    return torch.cat(outputs, dim=0)  # (total_q, H, Dv)


def attention_varlen_masked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    scale: float | None = None,
    dropout_p: float = 0.0,
    *,
    is_causal: bool = False,
    attend=attention_reference,
) -> torch.Tensor:
    """``attention_varlen_reference`` with no host read of ``cu_seqlens`` (what ``torch.compile``
    traces in one graph): the packed rows as one problem, a bool mask keeping each query to its
    own sequence's keys (and, causal, to keys at or before its position in that sequence).
    total_q x total_k work instead of the sum of the sequences' own products.
    """
    rows_q = torch.arange(q.shape[0], device=q.device, dtype=cu_seqlens_q.dtype)
    rows_k = torch.arange(k.shape[0], device=k.device, dtype=cu_seqlens_k.dtype)
    sequence_q = torch.searchsorted(cu_seqlens_q[1:], rows_q, right=True)  # (total_q,): each row's sequence
    sequence_k = torch.searchsorted(cu_seqlens_k[1:], rows_k, right=True)  # (total_k,)
    allowed = sequence_q[:, None] == sequence_k[None, :]  # (total_q, total_k)
    if is_causal:  # top-left aligned within each sequence
        position_q = rows_q - cu_seqlens_q[sequence_q]
        position_k = rows_k - cu_seqlens_k[sequence_k]
        allowed = allowed & (position_k[None, :] <= position_q[:, None])
    # (total, H, D) -> (1, H, total, D): one batch of the packed rows
    packed_q, packed_k, packed_v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    out = attend(packed_q, packed_k, packed_v, allowed[None, None], scale, dropout_p, is_causal=False)
    return out.squeeze(0).transpose(0, 1)  # (total_q, H, Dv)
