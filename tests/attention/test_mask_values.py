"""Float masks at the edges of their values, every backend as PyTorch's SDPA (issue 19).

A NaN in a float mask is NaN in that query row's output and in the gradients it reaches (its row
of dq and of the bias gradient, every row of dk and dv of that batch and head), never read as a
masked key; a -inf on every key of a row gives zeros, as SDPA's math path.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import kernels
from tests.equivalence import DEVICE

B, H, N, D = 2, 2, 7, 16
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
TRITON = pytest.param("triton", marks=pytest.mark.interpreter)  # runs the kernels: the interpreter on a CPU


def _nan_pattern(run, dtype, bias, device="cpu"):
    """Where ``run(q, k, v, bias)`` and its gradients are NaN (bool tensors on the CPU), from one draw
    of inputs on ``device``."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=generator).to(device, dtype).requires_grad_() for _ in range(3))
    bias = bias.to(device, dtype).requires_grad_()
    out = run(q, k, v, bias)
    out.backward(torch.ones_like(out))
    return [t.isnan().cpu() for t in (out, q.grad, k.grad, v.grad, bias.grad)]


def _sdpa(q, k, v, bias):
    # SDPA's math backend is the one defined for every input; fp16/bf16 through float32 on the CPU.
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias.float()).to(q.dtype)


@pytest.mark.parametrize("backend", ["einsum", TRITON])
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_nan_in_a_float_mask_is_nan_where_sdpa_has_nan(backend, dtype):
    """Issue 19: the Triton kernel read a NaN bias as a masked key (a finite row, hiding the NaN)."""
    bias = torch.zeros(B, H, N, N)
    bias[1, 0, 3, 5] = float("nan")  # one key of one row of one (batch, head)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Ours on DEVICE (a GPU's CUDA tensors: the interpreter, which takes CPU ones, is off there); SDPA on the CPU.
        ours = _nan_pattern(lambda q, k, v, b: kernels.attention(q, k, v, b, backend=backend), dtype, bias, DEVICE)
    theirs = _nan_pattern(_sdpa, dtype, bias)
    for name, mine, wanted in zip(["out", "dq", "dk", "dv", "dbias"], ours, theirs):
        assert wanted.any(), name  # the check has teeth: SDPA has NaN in each of them
        assert torch.equal(mine, wanted), f"{name}: NaN at {mine.nonzero().tolist()[:4]}, SDPA at {wanted.nonzero().tolist()[:4]}"


@pytest.mark.parametrize("backend", ["einsum", TRITON])
def test_a_nan_mask_row_does_not_reach_other_rows(backend):
    """The NaN stays in its row: the other rows equal the answer without it."""
    bias = torch.zeros(B, H, N, N, device=DEVICE)  # on DEVICE: CUDA tensors on a GPU, where the interpreter is off
    with_nan = bias.clone()
    with_nan[0, 1, 2, 4] = float("nan")
    q, k, v = (torch.randn(B, H, N, D).to(DEVICE) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = kernels.attention(q, k, v, with_nan, backend=backend)
        clean = kernels.attention(q, k, v, bias, backend=backend)
    row = torch.zeros(B, H, N, dtype=torch.bool, device=DEVICE)
    row[0, 1, 2] = True
    assert out[row].isnan().all()
    torch.testing.assert_close(out[~row], clean[~row])
