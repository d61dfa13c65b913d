"""The Triton varlen kernels (``kernels.attention_varlen`` on the Triton path) against the float64
reference run on each packed sequence alone: the output and every gradient.

The packed kernels are the attention kernels with VARLEN on: one program per (block, sequence,
head), each sequence's rows found through ``cu_seqlens``. Lengths of 0 and 1, lengths that are no
multiple of any block size, sequences longer than one block, Nq != Nk per sequence, Dv != D,
causal, dropout (with the very keep masks the kernels drew), q, k, v as views of a fused qkv
projection, and ``max_seqlen`` larger than the longest sequence. On a CPU the kernels run in
Triton's interpreter (tests/conftest.py) at small shapes; on a GPU the same tests compile them.
Each comparison uses the rule of ``tests.equivalence`` with one upstream gradient.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from kernels.reference import attention_varlen_reference
from kernels.triton.attention_ops import attention_varlen_triton
from tests.equivalence import DEVICE, ON_GPU, assert_close_to_reference

f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
# Every test here runs the kernels (in the interpreter on a CPU) but the one of empty packs.
pytestmark = pytest.mark.interpreter


def cu_seqlens(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def packed_inputs(lengths_q, lengths_k, heads, head_dim, dtype, *, head_dim_v=None, fused_qkv=False, seed=0):
    """q (total_q, H, D), k, v (total_k, H, D or Dv) of ``dtype`` on DEVICE with O(1) entries.
    ``fused_qkv`` (lengths_q == lengths_k): views of one (total, 3, H, D) tensor, as a ViT makes them."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(DEVICE, dtype)

    if fused_qkv:
        assert list(lengths_q) == list(lengths_k) and head_dim_v is None
        return list(randn(sum(lengths_q), 3, heads, head_dim).unbind(1))
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    return [randn(sum(lengths_q), heads, head_dim), randn(sum(lengths_k), heads, head_dim),
            randn(sum(lengths_k), heads, head_dim_v)]


def check_varlen(lengths_q, lengths_k, tensors, *, is_causal=False, dropout_p=0.0, scale=None, extra_max=0):
    """The Triton output and q, k, v gradients against the reference in float64 and in the inputs' dtype."""
    cu_q, cu_k = cu_seqlens(lengths_q), cu_seqlens(lengths_k)
    max_q, max_k = max(lengths_q, default=0) + extra_max, max(lengths_k, default=0) + extra_max
    ours = [t.detach().clone().requires_grad_() for t in tensors]
    options = {"scale": scale, "dropout_p": dropout_p, "is_causal": is_causal}
    out, keeps = attention_varlen_triton(*ours, cu_q, cu_k, max_q, max_k, **options, return_dropout_mask=True)
    masks = keeps if dropout_p > 0.0 else None
    exact = [t.detach().double().requires_grad_() for t in tensors]
    low = [t.detach().clone().requires_grad_() for t in tensors]
    reference64 = attention_varlen_reference(*exact, cu_q, cu_k, **options, dropout_masks=masks)
    reference_low = attention_varlen_reference(*low, cu_q, cu_k, **options, dropout_masks=masks)
    assert_close_to_reference(out, reference64, reference_low)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(DEVICE)
    for result, grad in ((out, grad_out.to(out.dtype)), (reference64, grad_out), (reference_low, grad_out.to(out.dtype))):
        if result.requires_grad:  # the reference's result for no scores at all is a constant
            result.backward(grad)
    for name, mine, wanted, wanted_low in zip("qkv", ours, exact, low):
        zeros = torch.zeros_like(wanted)
        assert_close_to_reference(
            mine.grad, zeros if wanted.grad is None else wanted.grad, zeros.to(mine.dtype) if wanted_low.grad is None
            else wanted_low.grad, name=f"d{name}",
        )
    return out, keeps


# Lengths of 0 and 1, block-size misses (17, 33, 65 against blocks of 16 to 128), a sequence longer
# than one block in every config the interpreter runs, and cross-attention lengths.
LENGTHS = [
    ([5, 1, 0, 17, 70], [5, 1, 0, 17, 70]),
    ([3, 40, 2], [33, 1, 11]),
    ([4, 2, 0], [0, 6, 3]),  # queries with no keys: zeros, and keys with no queries: zero gradients
    ([1], [1]),
]


@pytest.mark.parametrize("lengths_q, lengths_k", LENGTHS)
@pytest.mark.parametrize("dtype", [f16, bf16, f32])
def test_varlen_forward_and_backward_equal_each_sequence_alone(lengths_q, lengths_k, dtype):
    tensors = packed_inputs(lengths_q, lengths_k, 2, 16, dtype, head_dim_v=24)
    check_varlen(lengths_q, lengths_k, tensors)


@pytest.mark.parametrize("lengths_q, lengths_k", LENGTHS[:2])
def test_varlen_causal(lengths_q, lengths_k):
    tensors = packed_inputs(lengths_q, lengths_k, 2, 32, f16)
    check_varlen(lengths_q, lengths_k, tensors, is_causal=True)


@pytest.mark.parametrize("head_dim", [72, 80])
def test_varlen_fused_qkv_views_at_vlm_head_dims(head_dim):
    """SigLIP's 72 and Qwen2.5-VL's 80: views of one qkv projection, rows 3 * H * D elements apart."""
    lengths = [20, 7, 36]
    check_varlen(lengths, lengths, packed_inputs(lengths, lengths, 2, head_dim, bf16, fused_qkv=True), scale=0.3)


def test_varlen_max_seqlen_above_the_longest_changes_nothing():
    lengths = [9, 30]
    tensors = packed_inputs(lengths, lengths, 2, 16, f32)
    out, _ = check_varlen(lengths, lengths, tensors, extra_max=40)
    exact_max = attention_varlen_triton(*tensors, cu_seqlens(lengths), cu_seqlens(lengths), 30, 30)
    torch.testing.assert_close(out.detach(), exact_max, rtol=0, atol=0)


@pytest.mark.parametrize("is_causal", [False, True])
def test_varlen_dropout_uses_the_masks_it_reports(is_causal):
    lengths_q, lengths_k = [19, 1, 40], [19, 5, 40]
    _, keeps = check_varlen(
        lengths_q, lengths_k, packed_inputs(lengths_q, lengths_k, 2, 16, f16), dropout_p=0.3, is_causal=is_causal
    )
    assert [tuple(keep.shape) for keep in keeps] == [(2, q, k) for q, k in zip(lengths_q, lengths_k)]
    kept = torch.cat([keep.flatten() for keep in keeps]).float().mean().item()
    assert 0.55 < kept < 0.85, kept
    assert not torch.equal(keeps[0][0], keeps[0][1]), "each head draws its own mask"


def test_varlen_dropout_through_the_dispatch_is_reproducible_from_torch_seed():
    lengths = [12, 30]
    q, k, v = packed_inputs(lengths, lengths, 2, 16, f32)
    cu = cu_seqlens(lengths)
    torch.manual_seed(3)
    first = kernels.attention_varlen(q, k, v, cu, cu, dropout_p=0.5, backend="triton")
    torch.manual_seed(3)
    again, keeps = attention_varlen_triton(q, k, v, cu, cu, 30, 30, dropout_p=0.5, return_dropout_mask=True)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    expected = attention_varlen_reference(q.double(), k.double(), v.double(), cu, cu, dropout_p=0.5, dropout_masks=keeps)
    torch.testing.assert_close(first.double(), expected, rtol=1e-5, atol=1e-5)


def test_varlen_with_no_sequences_or_no_rows():
    q, k, v = packed_inputs([], [], 2, 16, f32)
    for lengths in ([], [0, 0]):
        cu = cu_seqlens(lengths)
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = kernels.attention_varlen(*leaves, cu, cu, backend="triton")
        assert out.shape == (0, 2, 16)
        out.sum().backward()
        assert all(t.grad is not None and t.grad.shape == t.shape for t in leaves)


@pytest.mark.slow
@settings(max_examples=6 if not ON_GPU else 40, deadline=None)
@given(
    lengths=st.lists(st.tuples(st.integers(0, 48), st.integers(0, 48)), min_size=1, max_size=4),
    head_dim=st.sampled_from([16, 24, 40]),
    is_causal=st.booleans(),
)
def test_varlen_random_lengths(lengths, head_dim, is_causal):
    lengths_q, lengths_k = [q for q, _ in lengths], [k for _, k in lengths]
    check_varlen(lengths_q, lengths_k, packed_inputs(lengths_q, lengths_k, 2, head_dim, f16), is_causal=is_causal)


@pytest.mark.gpu(reason="VLM-sized packs: minutes in the interpreter, compiled on a GPU")
def test_varlen_at_a_qwen_sized_pack():
    lengths = [1024, 256, 64, 3000, 729]
    check_varlen(lengths, lengths, packed_inputs(lengths, lengths, 16, 80, bf16, fused_qkv=True))
