"""DTensor sharding rules for the custom ops, so tensor-parallel (and data- or context-parallel) models run them.

    q, k, v = (distribute_tensor(t, mesh, [Shard(1)]) for t in (q, k, v))  # heads over the ranks
    out = kernels.attention(q, k, v, backend="triton")                      # local: no communication

DTensor asks each op for the placements it can run on locally, and redistributes its inputs to the
cheapest of them (``torch.distributed.tensor.experimental.register_sharding``). Local (no
communication), for attention (B, H, N, D): q, k, v, out and their gradients sharded alike on the
batch (dim 0) or the heads (dim 1), the statistics (2, B, H, Nq) on the same dim + 1, a mask or bias
on that dim where it has one of full size, replicated where it broadcasts; and, without ``is_causal``
or dropout, the queries sharded by sequence (dim 2) with k, v replicated: out sharded alike, dK, dV
then partial sums (what ``context_parallel`` needs: see ``kernels.dispatch``). Varlen (total, H, D):
the heads only, cu_seqlens replicated, the statistics (2, H, total) on dim 1. FP8 attention (forward
only): the batch or the heads, its (B, H, 3) descales alike; packed, the heads. Patch projection: the
images on the batch with weight, bias, cls and pos replicated (the weight's gradient a partial sum),
or the embedding dim (weight dim 0, tokens dim 2) with the images replicated (the images' gradient
partial). Every rule also lists "all replicated", so any other placement (sequence-sharded keys,
a Partial input) is redistributed to one of these, never computed on a shard as if it were whole.
Dropout on shards draws from the rank's local (batch, head) indices (shards draw alike, as under DDP).
"""

from __future__ import annotations

import torch

from kernels.backend import interpreter_on

# The first argument after the tensors of each op: its non-tensor arguments (is_causal, dropout_p,
# bias_needs_grad) change the rule and the output shapes, so they must key DTensor's cache of
# sharding decisions; register_sharding keys it only from the first int argument on.
_FIRST_SCALAR = {
    "attention_forward": 5,
    "attention_backward": 8,
    "attention_varlen_forward": 5,
    "attention_varlen_backward": 8,
    "attention_fp8_forward": 5,
    "attention_fp8_varlen_forward": 5,
}


def _mask_placement(mask, dim: int):
    """The placement of a mask broadcast to (B, H, Nq, Nk) when that problem is sharded on ``dim``."""
    if mask is None:
        return None
    own = dim - (4 - mask.ndim)  # the mask's dims align from the right
    if own < 0 or mask.shape[own] == 1:
        from torch.distributed.tensor import Replicate

        return Replicate()
    from torch.distributed.tensor import Shard

    return Shard(own)


def _or_none(tensor, placement):
    return None if tensor is None else placement


def _attention_forward_rule(q, k, v, mask, dropout_seed, scale, dropout_p, is_causal, allow_tf32):
    from torch.distributed.tensor import Replicate, Shard

    r = Replicate()
    rules = [([r, r], [r, r, r, _or_none(mask, r), _or_none(dropout_seed, r)])]
    for dim in (0, 1):  # batch, heads: every tensor alike, the statistics (2, B, H, Nq) one dim on
        s = Shard(dim)
        rules.append(([s, Shard(dim + 1)], [s, s, s, _mask_placement(mask, dim), _or_none(dropout_seed, r)]))
    if not is_causal and dropout_p == 0.0:  # query rows, each against every key
        s = Shard(2)
        rules.append(([s, Shard(3)], [s, r, r, _mask_placement(mask, 2), _or_none(dropout_seed, r)]))
    return [(out, [*inputs, None, None, None, None]) for out, inputs in rules]


def _fp8_forward_rule(q, k, v, descales, mask, scale, is_causal, out_dtype):
    """FP8 (inference, no statistics): batch or heads, the (B, H, 3) descales along; else replicated."""
    from torch.distributed.tensor import Replicate, Shard

    r = Replicate()
    rules = [([r], [r, r, r, r, _or_none(mask, r)])]
    for dim in (0, 1):
        s = Shard(dim)
        rules.append(([s], [s, s, s, s, _mask_placement(mask, dim)]))
    return [(out, [*inputs, None, None, None]) for out, inputs in rules]


def _fp8_varlen_forward_rule(q, k, v, cu_seqlens_q, cu_seqlens_k, *scalars):
    """Packed FP8: the heads (dim 1 of q, k, v, out and of the (n, H, 3) descales), cu_seqlens replicated."""
    from torch.distributed.tensor import Replicate, Shard

    r, s = Replicate(), Shard(1)
    return [
        ([r], [r, r, r, r, r, None, None, r] + [None] * 3),
        ([s], [s, s, s, r, r, None, None, s] + [None] * 3),
    ]


def _attention_backward_rule(
    grad_out, q, k, v, out, stats, mask, dropout_seed, scale, dropout_p, is_causal, allow_tf32, bias_needs_grad
):
    from torch.distributed.tensor import Partial, Replicate, Shard

    r = Replicate()
    seed = _or_none(dropout_seed, r)
    rules = [([r, r, r, r], [r, r, r, r, r, r, _or_none(mask, r), seed])]
    for dim in (0, 1):
        s = Shard(dim)
        grad_bias = s if bias_needs_grad else r  # else an empty (0,) tensor on every rank
        rules.append(([s, s, s, grad_bias], [s, s, s, s, s, Shard(dim + 1), _mask_placement(mask, dim), seed]))
    if not is_causal and dropout_p == 0.0:  # each rank's query rows add their share to dK and dV
        s = Shard(2)
        grad_bias = s if bias_needs_grad else r
        rules.append(([s, Partial(), Partial(), grad_bias], [s, s, r, r, s, Shard(3), _mask_placement(mask, 2), seed]))
    return [(outs, [*inputs, None, None, None, None, None]) for outs, inputs in rules]


def _varlen_forward_rule(q, k, v, cu_seqlens_q, cu_seqlens_k, *scalars):
    from torch.distributed.tensor import Replicate, Shard

    dropout_seed = scalars[2]
    r = Replicate()
    return [
        ([p, p], [p, p, p, r, r, None, None, _or_none(dropout_seed, r), None, None, None, None])
        for p in (r, Shard(1))  # (total, H, D) and the statistics (2, H, total) both on dim 1
    ]


def _varlen_backward_rule(grad_out, q, k, v, out, stats, cu_seqlens_q, cu_seqlens_k, *scalars):
    from torch.distributed.tensor import Replicate, Shard

    dropout_seed = scalars[2]
    r = Replicate()
    return [
        ([p, p, p], [p, p, p, p, p, p, r, r, None, None, _or_none(dropout_seed, r), None, None, None, None])
        for p in (r, Shard(1))
    ]


def _patch_embed_forward_rule(images, weight, bias, cls_token, pos_embed):
    from torch.distributed.tensor import Replicate, Shard

    r, first, last = Replicate(), Shard(0), Shard(2)
    return [
        ([r], [r, r, _or_none(bias, r), _or_none(cls_token, r), _or_none(pos_embed, r)]),
        # images (B, C, H, W) on the batch -> tokens (B, T + N, D) on the batch
        ([first], [first, r, _or_none(bias, r), _or_none(cls_token, r), _or_none(pos_embed, r)]),
        # weight (D, C, P, P) and bias (D,) on D -> tokens, cls (1, T, D), pos (1, T + N, D) on D
        ([last], [r, first, _or_none(bias, first), _or_none(cls_token, last), _or_none(pos_embed, last)]),
    ]


def _patch_embed_grad_weight_rule(patch_grads, images, weight):
    from torch.distributed.tensor import Partial, Replicate, Shard

    r = Replicate()
    return [
        ([r], [r, r, r]),
        ([Partial()], [Shard(0), Shard(0), r]),  # each rank's images add their share
        ([Shard(0)], [Shard(2), r, Shard(0)]),
    ]


def _patch_embed_grad_images_rule(patch_grads, images, weight):
    from torch.distributed.tensor import Partial, Replicate, Shard

    r = Replicate()
    return [
        ([r], [r, r, r]),
        ([Shard(0)], [Shard(0), Shard(0), r]),
        ([Partial()], [Shard(2), r, Shard(0)]),  # each rank's embedding columns add their share
    ]


RULES = {
    "attention_forward": _attention_forward_rule,
    "attention_backward": _attention_backward_rule,
    "attention_varlen_forward": _varlen_forward_rule,
    "attention_varlen_backward": _varlen_backward_rule,
    "attention_fp8_forward": _fp8_forward_rule,
    "attention_fp8_varlen_forward": _fp8_varlen_forward_rule,
    "patch_embed_forward": _patch_embed_forward_rule,
    "patch_embed_grad_weight": _patch_embed_grad_weight_rule,
    "patch_embed_grad_images": _patch_embed_grad_images_rule,
}


def register(*names: str) -> None:
    """Register the DTensor rules of ``vitriton::<name>`` (and, under the interpreter, its shape-only
    fake kernel); a no-op where PyTorch has no torch.distributed."""
    for name in names:
        if interpreter_on():
            torch.library.register_fake(f"vitriton::{name}", _FAKES[name])
    if not torch.distributed.is_available():
        return
    from torch.distributed.tensor.experimental import register_sharding

    for name in names:
        op = getattr(torch.ops.vitriton, name).default
        if name in _FIRST_SCALAR:
            # DTensor's private cache key (torch 2.11-2.14). Where it is not, no rule: DTensor inputs then
            # fail in one line ("Sharding propagation failed"), never a cached decision for other flags.
            try:
                from torch.distributed.tensor import DTensor
                from torch.distributed.tensor._op_schema import RuntimeSchemaInfo

                schema_info = RuntimeSchemaInfo(static_argnum=_FIRST_SCALAR[name], needs_pytree=True)
                schema_infos = DTensor._op_dispatcher.sharding_propagator.op_to_schema_info
            except (ImportError, AttributeError, TypeError):
                continue
        register_sharding(op)(RULES[name])
        if name in _FIRST_SCALAR:
            schema_infos[op] = schema_info


# ---------------------------------------------------------------------------------------------
# Shape-only fake kernels. DTensor runs each op on fake tensors to learn its global output shapes;
# the ops' own fake kernel is their host function, which launches the kernel through
# torch.library.wrap_triton, and under Triton's interpreter that launch reads the (absent) data.
# These give the same shapes, strides and dtypes without a launch (tests/distributed compare them
# with the real outputs).


def _attention_forward_fake(q, k, v, mask, dropout_seed, scale, dropout_p, is_causal, allow_tf32):
    from kernels.triton.launch import _dense_output, _dense_stats

    return _dense_output(q, v, q.dtype), _dense_stats(q)


def _attention_backward_fake(
    grad_out, q, k, v, out, stats, mask, dropout_seed, scale, dropout_p, is_causal, allow_tf32, bias_needs_grad
):
    shape = (*q.shape[:3], k.shape[2]) if bias_needs_grad else (0,)
    grad_bias = torch.empty(shape, device=q.device, dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), grad_bias


def _varlen_forward_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, *scalars):
    total_q, heads, _ = q.shape
    return q.new_empty(total_q, heads, v.shape[2]), torch.empty(2, heads, total_q, device=q.device, dtype=torch.float32)


def _varlen_backward_fake(grad_out, q, k, v, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _patch_embed_forward_fake(images, weight, bias, cls_token, pos_embed):
    patch = weight.shape[-1]
    n_patches = (images.shape[2] // patch) * (images.shape[3] // patch)
    n_prefix = 0 if cls_token is None else cls_token.shape[1]
    return images.new_empty((images.shape[0], n_prefix + n_patches, weight.shape[0]))


def _fp8_forward_fake(q, k, v, descales, mask, scale, is_causal, out_dtype):
    from kernels.triton.launch import _dense_output

    return _dense_output(q, v, out_dtype)


def _fp8_varlen_forward_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, descales, scale,
                             is_causal, out_dtype):
    return torch.empty(q.shape[0], q.shape[1], v.shape[2], device=q.device, dtype=out_dtype)


_FAKES = {
    "attention_forward": _attention_forward_fake,
    "attention_fp8_forward": _fp8_forward_fake,
    "attention_fp8_varlen_forward": _fp8_varlen_forward_fake,
    "attention_backward": _attention_backward_fake,
    "attention_varlen_forward": _varlen_forward_fake,
    "attention_varlen_backward": _varlen_backward_fake,
    "patch_embed_forward": _patch_embed_forward_fake,
    "patch_embed_grad_weight": lambda patch_grads, images, weight: torch.empty_like(weight),
    "patch_embed_grad_images": lambda patch_grads, images, weight: torch.empty_like(images),
}
