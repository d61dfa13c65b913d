"""A swapped model under PyTorch's distributed engines on CPU, against the same model on one process
(issue 22, item 3).

A swapped timm ViT and the tutorial ViT built ``fused=True``, tiny (32 px, patch 8, width 32, 2
heads, depth 2, batch 4), trained 2 SGD steps on gloo process groups of 2 (4 for the 2 x 2 mesh)
under DDP, FSDP2 (``fully_shard`` per block and on the root), FSDP2 with every block under
``torch.utils.checkpoint`` (non-reentrant), tensor parallel (``parallelize_module``: qkv and fc1
column-wise, proj and fc2 row-wise, heads sharded, q, k, v reaching attention as DTensors) and
FSDP2 x TP; through the einsum backend and the Triton kernels (the interpreter). ``torch.compile``
(eager, aot_eager, Inductor) over DDP and FSDP2 runs the einsum backend only: under Triton's
interpreter the kernels cannot run on fake tensors (see tests/vit/test_compile.py). The loss and
every gradient at each step must match one process by the rule of tests/equivalence.py.

The ranks are started as torchrun starts them (environment variables, one Python each) once per
group size, running every selected case of that size (tests/distributed/engines_worker.py); each
test reads its own case's result. On a 2-core CPU: about 2.5 minutes with Inductor's cache warm,
nearly 5 cold."""

from __future__ import annotations

import pytest

from tests.distributed.engines_worker import launch

pytest.importorskip("timm")

TIMEOUT_S = 450  # per group of ranks: the 2-rank group takes 1-4 minutes (Inductor's cache warm or cold), the 4-rank one 1
MODELS = ("timm", "vit")


def _cases(engines, backends, compilers=("none",)):
    return [f"{e}:{m}:{b}:{c}" for e in engines for m in MODELS for b in backends for c in compilers]


TWO = (
    _cases(("ddp", "fsdp2", "fsdp2_checkpoint", "tp"), ("einsum", "triton"))
    + _cases(("ddp", "fsdp2"), ("einsum",), ("eager", "aot_eager", "inductor"))
)
FOUR = _cases(("fsdp2_tp",), ("einsum", "triton"))
UNSYNCED, PLAIN_QKV = "unsynced:timm:einsum:none", "tp_plain_qkv:timm:einsum:none"  # wrong on purpose


def _group(world: int, cases: list[str]):
    @pytest.fixture(scope="module")
    def group(request, tmp_path_factory):
        selected = [item.callspec.params["case"] for item in request.session.items
                    if hasattr(item, "callspec") and item.callspec.params.get("case") in cases]
        return launch(world, selected, tmp_path_factory.mktemp(f"ranks{world}"), TIMEOUT_S)

    return group


two_ranks = _group(2, [*TWO, UNSYNCED, PLAIN_QKV])
four_ranks = _group(4, FOUR)


def _params(cases):
    return [pytest.param(case, marks=[pytest.mark.interpreter] if ":triton:" in case else [], id=case) for case in cases]


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("case", _params(TWO))
def test_two_ranks_match_one_process(case, two_ranks):
    assert two_ranks[case] == "ok", f"{case} (engine:model:backend:compile):\n{two_ranks[case]}"


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("case", _params(FOUR))
def test_fsdp2_x_tp_on_a_2x2_mesh_matches_one_process(case, four_ranks):
    assert four_ranks[case] == "ok", f"{case} (engine:model:backend:compile):\n{four_ranks[case]}"


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("case", [UNSYNCED])
def test_the_check_fails_when_ranks_do_not_average_gradients(case, two_ranks):
    assert "grad" in two_ranks[case] and "max error" in two_ranks[case], two_ranks[case]


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("case", [PLAIN_QKV])
def test_plain_colwise_fused_qkv_cannot_be_split_into_heads(case, two_ranks):
    """Why FusedQKVColwise: Shard(0) on the fused qkv weight gives rank 0 q and half of k."""
    assert "Cannot unflatten unevenly sharded tensor" in two_ranks[case], two_ranks[case]
