"""Context parallelism: inside ``torch.distributed.tensor.experimental.context_parallel(mesh, ...)``
each rank holds a slice of q, k and v along the sequence, and PyTorch swaps F.scaled_dot_product_attention
for its ring attention. A swapped model calls ``attention`` instead, on those slices: it would
attend to its own rank's keys only, a silent wrong answer. So ``attention`` detects the block
and gathers k and v from every rank of the mesh (a differentiable all-gather of PyTorch's
functional collectives: the backward reduce-scatters dK and dV, each rank's share summed to the
rank that holds those rows), then runs its own queries against all keys on the chosen backend:
the "all-gather keys and values" form of context parallelism (PyTorch's own for flex_attention),
not a ring. Its cost per call: every rank receives (W - 1) / W of K and V and holds all of them
(2 B H N D elements), the backward one reduce-scatter of dK and dV of that size, with no overlap
of transfer and compute; the compute per rank is the ring's (its N / W queries against N keys).
The keys' order (PyTorch's load balancer permutes the sequence) does not matter without a mask; a mask
or is_causal (their positions are permuted and split) is refused in one line, as is varlen.

``kernels.dispatch`` calls these; tests/distributed/test_context_parallel.py runs them on gloo ranks.
"""

from __future__ import annotations

import inspect
import sys

import torch

_TORCH_SDPA = torch._C._nn.scaled_dot_product_attention  # F.scaled_dot_product_attention when unpatched
_CP_MODULE = "torch.distributed.tensor.experimental._context_parallel._attention"


def _context_parallel_mesh():
    """The device mesh of the ``context_parallel`` block this runs in, or None outside one.

    Inside one, PyTorch has replaced F.scaled_dot_product_attention by a wrapper it lists in its
    ``_replaced_functions``, with the mesh in that wrapper's closure (as torch 2.14 does).
    """
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if sdpa is _TORCH_SDPA:
        return None
    context_parallel = sys.modules.get(_CP_MODULE)
    if context_parallel is None or sdpa not in getattr(context_parallel, "_replaced_functions", {}):
        return None
    mesh = inspect.getclosurevars(sdpa).nonlocals.get("device_mesh")
    if mesh is None or mesh.ndim != 1:
        raise RuntimeError(
            "attention: inside torch's context_parallel, but its 1-D device mesh was not found where this "
            f"PyTorch ({torch.__version__}) keeps it; call F.scaled_dot_product_attention there instead"
        )
    return mesh


def _keys_of_every_rank(op: str, mesh, q, k, v, mask, is_causal: bool):
    """k and v (B, H, N / W, D) of each of the mesh's W ranks, joined along the sequence: (B, H, N, D)."""
    from torch.distributed.tensor import DTensor

    if isinstance(q, DTensor):  # DTensors say what they hold: kernels/triton/sharding.py
        return k, v
    if mask is not None or is_causal:
        raise NotImplementedError(
            f"{op}: inside torch's context_parallel the sequence is split (and permuted) over the ranks, so a "
            "mask or is_causal=True cannot be applied here; call F.scaled_dot_product_attention (PyTorch's ring)"
        )
    from torch.distributed._functional_collectives import all_gather_single

    return tuple(all_gather_single(t.contiguous(), 2, mesh) for t in (k, v))  # differentiable: dK, dV reduce-scattered
