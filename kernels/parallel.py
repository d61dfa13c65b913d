"""Tensor parallelism for ViTs whose attention computes q, k and v with one Linear (timm's, vit's).

    from torch.distributed.tensor.parallel import parallelize_module
    from kernels.parallel import vit_tensor_parallel_plan

    kernels.swap(model)
    parallelize_module(model, mesh, vit_tensor_parallel_plan(model))

Megatron's plan per block, with the heads sharded over the mesh: the fused qkv column-wise by
``FusedQKVColwise``, the attention's projection row-wise, the MLP's fc1 column-wise and fc2
row-wise. Attention then gets q, k, v as DTensors sharded by heads and runs the kernels on each
rank's heads with no communication (``kernels/triton/sharding.py``). Tested on CPU with gloo
against one process: tests/distributed/test_engines.py.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
from torch.distributed.tensor.placement_types import _StridedShard


class FusedQKVColwise(ColwiseParallel):
    """ColwiseParallel for one Linear that computes q, k and v together (out = 3 * H * D rows, q's
    first), as timm's ``Attention.qkv`` and vit's do. Plain ``Shard(0)`` would give rank 0 the
    first rows, all of q and part of k, and the model's (B, N, 3, H, D) reshape cannot be sharded
    ("Cannot unflatten unevenly sharded tensor"). ``_StridedShard(0, split_factor=3)`` (PyTorch's
    strided placement, private in torch 2.14) gives each rank its heads of each of q, k and v: the
    reshape is then sharded on H with no communication, and attention gets q, k, v as DTensors
    sharded by heads (``use_local_output=False``). The head count must divide by the mesh size."""

    def __init__(self):
        super().__init__(use_local_output=False)

    def _partition_linear_fn(self, name, module, device_mesh):
        for param_name, param in module.named_parameters():
            sharded = distribute_tensor(param.detach(), device_mesh, [_StridedShard(0, split_factor=3)])
            module.register_parameter(param_name, nn.Parameter(sharded))

    @staticmethod
    def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
        return outputs  # (B, N, 3 * H * D), _StridedShard(2, 3): left as it is for the reshape


def vit_tensor_parallel_plan(model: nn.Module, qkv=FusedQKVColwise) -> dict:
    """``parallelize_module``'s plan for a ViT with ``model.blocks[i].attn.qkv / .proj`` and
    ``.mlp.fc1 / .fc2`` (timm's VisionTransformer, vit.ViT): qkv and fc1 column-wise, proj and fc2
    row-wise (their outputs replicated, local tensors again), the rest replicated."""
    plan = {}
    for i in range(len(model.blocks)):
        plan.update({
            f"blocks.{i}.attn.qkv": qkv(),
            f"blocks.{i}.attn.proj": RowwiseParallel(input_layouts=Shard(-1)),
            f"blocks.{i}.mlp.fc1": ColwiseParallel(),
            f"blocks.{i}.mlp.fc2": RowwiseParallel(),
        })
    return plan
