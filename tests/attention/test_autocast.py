"""``torch.autocast`` as PyTorch's SDPA follows it (issue 19): attention, the SDPA drop-in and varlen.

Attention is one of autocast's lower-precision ops: every floating-point input but a float64 one
(q, k, v, a float mask) runs in the autocast dtype, so float32 inputs give an output in that
dtype, a bfloat16 q with float32 k and v runs, and float64 stays float64. Gradients reach the
inputs in their own dtypes. Checked against SDPA under the same autocast (dtype, device, value)
and against our own function called on the inputs cast by hand (bit for bit).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import kernels
from tests.equivalence import DEVICE

f32, f64 = torch.float32, torch.float64
AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _quiet_fallback():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _inputs(dtypes, shape=(2, 3, 9, 16), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).to(DEVICE, dtype).requires_grad_() for dtype in dtypes]


# The Triton cases (18 of half a second each in the interpreter) are slow; varlen's below stay fast.
@pytest.mark.parametrize("backend", ["einsum", pytest.param("triton", marks=[pytest.mark.interpreter, pytest.mark.slow])])
@pytest.mark.parametrize("low", AUTOCAST_DTYPES)
@pytest.mark.parametrize("dtypes", [(f32, f32, f32), (torch.bfloat16, f32, f32), (torch.float16, f32, torch.bfloat16)])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float32"])
def test_attention_runs_in_the_autocast_dtype_as_sdpa(backend, low, dtypes, mask_kind):
    q, k, v = _inputs(dtypes)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(9, 9, generator=torch.Generator().manual_seed(1)).to(DEVICE) > 0.3
    elif mask_kind == "float32":
        mask = torch.randn(9, 9, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.autocast(DEVICE, dtype=low):
        ours = kernels.attention(q, k, v, mask, backend=backend)
        drop_in = kernels.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend)
        theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert ours.dtype == drop_in.dtype == theirs.dtype == low
    by_hand = kernels.attention(
        *(t.detach().to(low) for t in (q, k, v)), None if mask is None else mask if mask.dtype == torch.bool else mask.to(low),
        backend=backend,
    )
    torch.testing.assert_close(ours, by_hand, rtol=0, atol=0)
    torch.testing.assert_close(drop_in, by_hand, rtol=0, atol=0)
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=0, atol=2e-2 if low == torch.bfloat16 else 3e-3)
    grads = torch.autograd.grad(ours.float().sum(), (q, k, v))
    wanted = torch.autograd.grad(theirs.float().sum(), (q, k, v))
    for t, mine, their in zip((q, k, v), grads, wanted):
        assert mine.dtype == their.dtype == t.dtype
        torch.testing.assert_close(mine.float(), their.float(), rtol=0, atol=6e-2 if low == torch.bfloat16 else 1e-2)


@pytest.mark.parametrize("low", AUTOCAST_DTYPES)
def test_float64_stays_float64_under_autocast(low):
    q, k, v = _inputs((f64, f64, f64))
    with torch.autocast(DEVICE, dtype=low):
        ours = kernels.attention(q, k, v)
        theirs = F.scaled_dot_product_attention(q, k, v)
    assert ours.dtype == theirs.dtype == f64
    torch.testing.assert_close(ours, kernels.attention(q, k, v))


@pytest.mark.parametrize("backend", ["einsum", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("low", AUTOCAST_DTYPES)
def test_varlen_runs_in_the_autocast_dtype(backend, low):
    lengths = [4, 9, 2]
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(sum(lengths), 2, 16, generator=generator).to(DEVICE).requires_grad_() for _ in range(3))
    cu = torch.tensor([0, 4, 13, 15], dtype=torch.int32, device=DEVICE)
    with torch.autocast(DEVICE, dtype=low):
        ours = kernels.attention_varlen(q, k.to(torch.bfloat16), v, cu, cu, 9, 9, backend=backend)
    assert ours.dtype == low
    by_hand = kernels.attention_varlen(
        *(t.detach().to(low) for t in (q, k.to(torch.bfloat16), v)), cu, cu, 9, 9, backend=backend
    )
    torch.testing.assert_close(ours, by_hand, rtol=0, atol=0)
    assert torch.autograd.grad(ours.float().sum(), q)[0].dtype == f32


def test_autocast_off_keeps_mixed_dtypes_an_error_naming_the_drop_in():
    q, k, v = _inputs((torch.bfloat16, f32, f32))
    with pytest.raises(TypeError, match="^scaled_dot_product_attention: expected every tensor on one dtype"):
        kernels.scaled_dot_product_attention(q, k, v)
    with pytest.raises(TypeError, match="^attention: expected every tensor on one dtype"):
        kernels.attention(q, k, v)
