"""One rank of the engine checks in tests/distributed/test_engines.py (issue 22, item 3), and
``launch``, which starts the ranks (for those tests and ``bench.gpu_check``'s engine phase).

A rank is started as ``torchrun`` starts a worker, with ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT`` in the environment: ``python -m
tests.distributed.engines_worker OUT DEVICE CASE...``, DEVICE ``cpu`` (gloo, the Triton
interpreter) or ``cuda`` (NCCL, one GPU per rank).
Each case is ``engine:model:backend:compile`` (see ``ENGINES``, ``MODELS``; compile ``none``,
``eager``, ``aot_eager`` or ``inductor``). For each: a tiny model trained for ``STEPS`` SGD steps
under the engine on a gloo process group, on CPU, its loss and every parameter's gradient (the
whole tensor: ``full_tensor()`` of a DTensor) at each step held against the same model trained on
one process, by the rule of tests/equivalence.py: float64 on one process the reference, float32 on
one process with the same backend the error allowed. Every rank writes ``OUT/rank<r>.json``,
{"results": {case: "ok" or the failure in a few lines}, "seconds": {case: its time}}; a case that fails does not stop the others.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    parallelize_module,
)
from torch.distributed.tensor.placement_types import _StridedShard
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

import kernels
from kernels.parallel import FusedQKVColwise, vit_tensor_parallel_plan
from tests.distributed import run_ranks
from tests.equivalence import assert_close_to_reference

SIZE = {"image_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 10}
BATCH, STEPS, LR = 4, 2, 0.5
PREFIXES = ("_orig_mod.", "module.")  # torch.compile's and DDP's, taken off the parameter names
DEVICE = "cpu"  # this rank's device type: set by main


def build_timm() -> nn.Module:
    import timm

    config = {("img_size" if k == "image_size" else k): v for k, v in SIZE.items()}
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **config)
    kernels.swap(model)
    return model


def build_vit() -> nn.Module:
    from vit.model import ViT

    return ViT(fused=True, **SIZE)


MODELS = {"timm": build_timm, "vit": build_vit}


def build(model_name: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[model_name]().to(DEVICE, dtype)


def batches(dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same images in every dtype: drawn in float32 (randn draws other numbers in float64)."""
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(BATCH, 3, 32, 32, generator=generator).to(DEVICE, dtype),
         torch.randint(0, SIZE["num_classes"], (BATCH,), generator=generator).to(DEVICE))
        for _ in range(STEPS)
    ]


# ---------------------------------------------------------------------------------------------
# Tensor parallel: heads sharded over the mesh, attention on DTensors.


def tensor_parallel(model: nn.Module, mesh, qkv=FusedQKVColwise) -> None:
    """The package's plan (kernels.parallel): heads sharded, attention on DTensors."""
    parallelize_module(model, mesh, vit_tensor_parallel_plan(model, qkv))


def checkpointed(model: nn.Module) -> None:
    """Each block's forward under ``torch.utils.checkpoint`` (non-reentrant), names unchanged."""
    for block in model.blocks:
        forward = block.forward
        block.forward = lambda *args, _forward=forward, **kwargs: checkpoint(_forward, *args, use_reentrant=False, **kwargs)


# ---------------------------------------------------------------------------------------------
# The engines: each wraps the model and says which slice of the batch this rank trains on.


def ddp(model, world, rank):
    return DistributedDataParallel(model), rank, world


def fsdp2(model, world, rank, *, checkpoint_blocks=False):
    if checkpoint_blocks:
        checkpointed(model)
    mesh = init_device_mesh(DEVICE, (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, rank, world


def tp(model, world, rank, *, qkv=FusedQKVColwise):
    tensor_parallel(model, init_device_mesh(DEVICE, (world,)), qkv)
    return model, 0, 1  # every rank the whole batch


def fsdp2_tp(model, world, rank):
    mesh = init_device_mesh(DEVICE, (2, world // 2), mesh_dim_names=("dp", "tp"))
    tensor_parallel(model, mesh["tp"])
    for block in model.blocks:
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return model, mesh.get_local_rank("dp"), 2


ENGINES = {
    "ddp": ddp,
    "fsdp2": fsdp2,
    "fsdp2_checkpoint": lambda model, world, rank: fsdp2(model, world, rank, checkpoint_blocks=True),
    "tp": tp,
    "fsdp2_tp": fsdp2_tp,
    # Wrong on purpose, for the tests that show the checks have teeth: each rank its half of the
    # batch and no gradient averaging; and plain Shard(0) on the fused qkv.
    "unsynced": lambda model, world, rank: (model, rank, world),
    "tp_plain_qkv": lambda model, world, rank: tp(model, world, rank, qkv=lambda: ColwiseParallel(use_local_output=False)),
}


# ---------------------------------------------------------------------------------------------
# Training, on one process and under an engine.


def whole(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """The whole tensor on every rank; a DTensor gathered.

    FSDP2 over the fused qkv's strided TP shard places it (_StridedShard(0, sf=2),
    _StridedShard(0, sf=3)) on the (dp, tp) mesh, and ``full_tensor()`` of that gathers its rows
    in the wrong order (torch 2.14; training is right, the step-1 loss shows it). So: FSDP2's
    contiguous pieces gathered over dp first, then the TP shard as a 1-D DTensor."""
    if not isinstance(tensor, DTensor):
        return tensor
    placements, mesh = tensor.placements, tensor.device_mesh
    if len(placements) == 2 and all(isinstance(p, _StridedShard) and p.dim == 0 for p in placements):
        local = tensor.to_local().contiguous()
        pieces = [torch.empty_like(local) for _ in range(mesh.size(0))]
        dist.all_gather(pieces, local, group=mesh.get_group(0))
        tp_mesh = mesh[mesh.mesh_dim_names[1]]
        return DTensor.from_local(torch.cat(pieces), tp_mesh, [placements[1]], run_check=False).full_tensor()
    return tensor.full_tensor()


def train(model: nn.Module, step_model, data, part: int, parts: int, *, reduce_loss: bool):
    """STEPS SGD steps on this rank's part of each batch; per step the loss on the whole batch (the
    mean over the ranks: those of a tensor-parallel group hold the same one) and {name: whole gradient}."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    trajectory = []
    for images, labels in data:
        share = BATCH // parts
        images, labels = images[part * share:(part + 1) * share], labels[part * share:(part + 1) * share]
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(step_model(images), labels)
        loss.backward()
        loss = whole(loss).detach().clone()
        if reduce_loss:
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        grads = {name: whole(p.grad) for name, p in model.named_parameters()}
        trajectory.append((loss, grads))
        optimizer.step()
    return trajectory


def one_process(model_name: str, backend: str, dtype: torch.dtype):
    model = build(model_name, dtype)
    with kernels.use_backend(backend):
        return train(model, model, batches(dtype), 0, 1, reduce_loss=False)


def strip(name: str) -> str:
    for prefix in PREFIXES:
        name = name.replace(prefix, "")
    return name


def run_case(case: str, world: int, rank: int, references: dict) -> None:
    engine, model_name, backend, compiler = case.split(":")
    if (model_name, "float64") not in references:
        references[model_name, "float64"] = one_process(model_name, "einsum", torch.float64)
    if (model_name, backend) not in references:
        references[model_name, backend] = one_process(model_name, backend, torch.float32)
    model = build(model_name, torch.float32)
    wrapped, part, parts = ENGINES[engine](model, world, rank)
    if compiler != "none":
        torch._dynamo.reset()
        wrapped = torch.compile(wrapped, backend=compiler)
    with kernels.use_backend(backend):
        trajectory = train(model, wrapped, batches(torch.float32), part, parts, reduce_loss=True)
    for step, ((loss, grads), (loss64, grads64), (loss32, grads32)) in enumerate(
        zip(trajectory, references[model_name, "float64"], references[model_name, backend])
    ):
        assert_close_to_reference(loss, loss64, loss32, name=f"step {step} loss")
        names = {strip(name): grad for name, grad in grads.items()}
        assert list(names) == list(grads64), f"parameter names {list(names)} != {list(grads64)}"
        for name, grad in names.items():
            assert grad is not None, f"step {step}: no gradient for {name}"
            assert_close_to_reference(grad, grads64[name], grads32[name], name=f"step {step} grad {name}")


def main(out: Path, device: str, cases: list[str]) -> None:
    global DEVICE
    rank, world, DEVICE = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), device
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=datetime.timedelta(seconds=60))
    results, seconds, references = {}, {}, {}
    for case in cases:
        start = time.perf_counter()
        try:
            run_case(case, world, rank, references)
            results[case] = "ok"
        except Exception as error:  # noqa: BLE001 - every case reports, the next one runs
            lines = traceback.format_exception_only(error)
            results[case] = "".join(lines).strip()[-1500:] + "\n" + "".join(traceback.format_tb(error.__traceback__)[-3:])
        with contextlib.suppress(Exception):
            dist.barrier()
        seconds[case] = round(time.perf_counter() - start, 1)
        (out / f"rank{rank}.json").write_text(json.dumps({"results": results, "seconds": seconds}, indent=1))
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Starting the ranks.


def launch(world: int, cases: list[str], out: Path, timeout_s: float, device: str = "cpu") -> dict[str, str]:
    """``world`` ranks of this module (``tests.distributed.run_ranks``); {case: "ok" or each failing
    rank's failure}. Past ``timeout_s`` the ranks are killed and TimeoutError says what was done."""
    argv = ["-m", "tests.distributed.engines_worker", str(out), device, *cases]
    try:
        ranks = run_ranks(argv, world, timeout_s, interpret=device == "cpu")
    except subprocess.TimeoutExpired:
        first = out / "rank0.json"
        done = json.loads(first.read_text())["seconds"] if first.exists() else {}
        raise TimeoutError(
            f"{world} ranks ran past {timeout_s:.0f} s; done (seconds): {done}; not done: {sorted(set(cases) - set(done))}"
        ) from None
    results = {}
    for rank, (status, log) in enumerate(ranks):
        path = out / f"rank{rank}.json"
        found = json.loads(path.read_text())["results"] if path.exists() else {}
        for case in cases:
            result = found.get(case, f"rank {rank} exited {status} before it; its output ends:\n{log[-3000:]}")
            if result != "ok":
                results[case] = results.get(case, "") + f"[rank {rank}] {result}\n"
            results.setdefault(case, "ok")
    return results


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
