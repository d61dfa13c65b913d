"""``kernels.attention`` inside PyTorch's ``context_parallel`` (issue 22, item 2), against one process.

Two gloo ranks on the CPU (``tests.distributed.launch``). q, k, v and the upstream gradient are
``context_parallel`` buffers (split along the sequence, permuted by PyTorch's load balancer); a
swapped model's attention, ``kernels.attention`` on those slices, must give each rank its rows of
the one-process output and of dq, dk, dv (``context_parallel_unshard`` puts them back in order),
through backend="triton" (the interpreter) and "einsum", and through ``kernels.scaled_dot_product_attention``.
With the detection switched off, the same call attends to its own rank's keys only, and differs: the
check has teeth. A mask or is_causal, and varlen, are one-line errors there; outside the block
nothing is gathered.
"""

from __future__ import annotations

import sys

import pytest
import torch

import kernels
from kernels import dispatch
from tests.distributed import launch, main

B, H, N, D = 2, 2, 8, 16  # N: 2 * WORLD chunks of 2 for the load balancer
ATOL, RTOL = 3e-5, 1e-5


def _inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, N, D, generator=g) for _ in range(4)]  # q, k, v, the upstream gradient


def _one_process(attend) -> list[torch.Tensor]:
    q, k, v, upstream = _inputs()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attend(*leaves)
    out.backward(upstream)
    return [out.detach(), *(t.grad for t in leaves)]


def _in_context_parallel(mesh, attend) -> list[torch.Tensor]:
    """attend on this rank's slices inside context_parallel; the output and dq, dk, dv, unsharded."""
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import (
        context_parallel_unshard,
    )

    buffers = _inputs()
    with context_parallel(mesh, buffers=buffers, buffer_seq_dims=[2] * 4, no_restore_buffers=set(buffers)):
        q, k, v, upstream = buffers
        assert q.shape[2] == N // mesh.size()
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attend(*leaves)
        out.backward(upstream)
        # Inside the block: it knows which load balancer permuted the rows.
        return context_parallel_unshard(mesh, [out.detach(), *(t.grad for t in leaves)], [2] * 4)


def _agree(name: str, actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for what, a, e in zip(("output", "dq", "dk", "dv"), actual, expected, strict=True):
        torch.testing.assert_close(a, e, atol=ATOL, rtol=RTOL, msg=lambda m, what=what: f"{name} {what}: {m}")


def check_attention(mesh, backend: str) -> None:
    def attend(q, k, v):
        return kernels.attention(q, k, v, backend=backend)

    def sdpa(q, k, v):
        return kernels.scaled_dot_product_attention(q, k, v, backend=backend)

    expected = _one_process(attend)
    _agree(f"attention {backend}", _in_context_parallel(mesh, attend), expected)
    _agree(f"scaled_dot_product_attention {backend}", _in_context_parallel(mesh, sdpa), expected)


def check_local_keys_differ(mesh) -> None:
    """Without the detection, each rank's queries see only its own keys: the answer is wrong."""
    def attend(q, k, v):
        return kernels.attention(q, k, v, backend="triton")

    expected = _one_process(attend)
    found = dispatch._context_parallel_mesh
    dispatch._context_parallel_mesh = lambda: None
    try:
        local = _in_context_parallel(mesh, attend)
    finally:
        dispatch._context_parallel_mesh = found
    assert not torch.allclose(local[0], expected[0], atol=1e-3), "attention on local keys matched one process"


def check_refusals(mesh) -> None:
    from torch.distributed.tensor.experimental import context_parallel

    q, k, v = _inputs()[:3]
    assert dispatch._context_parallel_mesh() is None
    with context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2] * 3):
        assert dispatch._context_parallel_mesh() is mesh
        for kwargs in ({"is_causal": True}, {"mask": torch.ones(q.shape[2], k.shape[2], dtype=torch.bool)}):
            with pytest.raises(NotImplementedError, match="context_parallel"):
                kernels.attention(q, k, v, backend="einsum", **kwargs)
        cu = torch.tensor([0, q.shape[2]], dtype=torch.int32)
        with pytest.raises(NotImplementedError, match="context_parallel"):
            kernels.attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu)
    assert dispatch._context_parallel_mesh() is None


CHECKS = {
    "triton": lambda mesh: check_attention(mesh, "triton"),
    "einsum": lambda mesh: check_attention(mesh, "einsum"),
    "local_keys_differ": check_local_keys_differ,
    "refusals": check_refusals,
}


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.interpreter
def test_attention_inside_context_parallel_equals_one_process():
    launch("tests.distributed.test_context_parallel", ["triton", "einsum", "local_keys_differ", "refusals"])


if __name__ == "__main__":
    main(sys.argv[1:], CHECKS)
