"""Packed sequences of different lengths: ``kernels.attention_varlen`` and the packed ``vit.ViT``.

The einsum path (a loop over the sequences through the fallback) against the plain reference run
on each sequence alone, in float64, forward and backward; the input checks; a packed ViT equal to
running each image alone. The Triton varlen kernels are tested in tests/test_varlen_triton.py.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels.reference import attention_reference, attention_varlen_reference
from tests.equivalence import assert_close_to_reference
from vit.model import ViT

f64 = torch.float64


def packed(lengths_q, lengths_k, heads=2, head_dim=16, head_dim_v=None, dtype=f64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    total_q, total_k = sum(lengths_q), sum(lengths_k)

    def make(total, dim):
        return torch.randn(total, heads, dim, generator=generator, dtype=f64).to(dtype).requires_grad_()

    q, k, v = make(total_q, head_dim), make(total_k, head_dim), make(total_k, head_dim_v or head_dim)
    cu_q = torch.tensor([0, *torch.tensor(lengths_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lengths_k).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu_q, cu_k


def one_by_one(q, k, v, cu_q, cu_k, is_causal=False):
    """Each sequence alone through attention_reference, written out here, not borrowed."""
    outs = []
    for i in range(len(cu_q) - 1):
        q_i, k_i, v_i = q[cu_q[i]:cu_q[i + 1]], k[cu_k[i]:cu_k[i + 1]], v[cu_k[i]:cu_k[i + 1]]
        if len(k_i) == 0:
            outs.append(torch.zeros(len(q_i), q.shape[1], v.shape[2], dtype=v.dtype))
            continue
        out = attention_reference(*(t.transpose(0, 1)[None] for t in (q_i, k_i, v_i)), is_causal=is_causal)
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize(
    "lengths_q, lengths_k",
    [([5, 1, 0, 17], [5, 1, 0, 17]), ([3, 9, 2], [7, 1, 11]), ([4, 2], [0, 6]), ([65, 33], [65, 33])],
)
@pytest.mark.parametrize("is_causal", [False, True])
def test_varlen_einsum_equals_each_sequence_alone_forward_and_backward(lengths_q, lengths_k, is_causal):
    q, k, v, cu_q, cu_k = packed(lengths_q, lengths_k, head_dim_v=24)
    out = kernels.attention_varlen(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), is_causal=is_causal, backend="einsum")
    expected = one_by_one(q, k, v, cu_q, cu_k, is_causal)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    actual_grads = torch.autograd.grad(out, (q, k, v), grad)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    for actual, wanted in zip(actual_grads, expected_grads):
        torch.testing.assert_close(actual, wanted)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_varlen_einsum_in_low_precision_follows_the_rule(dtype):
    q, k, v, cu_q, cu_k = packed([7, 30, 1], [7, 30, 1], dtype=dtype)
    out = kernels.attention_varlen(q, k, v, cu_q, cu_k, backend="einsum")
    assert out.dtype == dtype
    reference64 = attention_varlen_reference(q.double(), k.double(), v.double(), cu_q, cu_k)
    reference_low = attention_varlen_reference(q, k, v, cu_q, cu_k)
    assert_close_to_reference(out, reference64, reference_low)


def test_the_rule_catches_a_sequence_leaking_into_another():
    q, k, v, cu_q, cu_k = packed([6, 6], [6, 6])
    leaky = attention_reference(*(t.transpose(0, 1)[None] for t in (q, k, v)))[0].transpose(0, 1)  # one sequence of 12
    with pytest.raises(AssertionError):
        torch.testing.assert_close(leaky, one_by_one(q, k, v, cu_q, cu_k))


def test_varlen_triton_refuses_a_head_dim_beyond_it_in_one_line():
    q, k, v, cu_q, cu_k = packed([3, 4], [3, 4], head_dim=8, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"^attention_varlen: head dim 8 is outside the Triton kernels' range, 16 to 256; use backend="):
        kernels.attention_varlen(q, k, v, cu_q, cu_k, backend="triton")


def _cu(values):
    return torch.tensor(values, dtype=torch.int32)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda a: {**a, "cu_seqlens_q": a["cu_seqlens_q"].long()}, TypeError, "cu_seqlens_q of dtype torch.int32, got torch.int64"),
        (lambda a: {**a, "cu_seqlens_q": _cu([1, 3, 7])}, ValueError, "cu_seqlens_q to start at 0, got 1"),
        (lambda a: {**a, "cu_seqlens_k": _cu([0, 8, 7])}, ValueError, "cu_seqlens_k non-decreasing, got 8 then 7 at 1"),
        (lambda a: {**a, "cu_seqlens_q": _cu([0, 3, 6])}, ValueError, r"cu_seqlens_q\[-1\] to be the packed length 7, got 6"),
        (lambda a: {**a, "cu_seqlens_k": _cu([0, 7])}, ValueError, "as many query as key sequences"),
        (lambda a: {**a, "cu_seqlens_q": a["cu_seqlens_q"].to("meta")}, ValueError, "on one device"),
        (lambda a: {**a, "q": a["q"][None]}, ValueError, r"q of shape \(total, H, D\)"),
        (lambda a: {**a, "max_seqlen_q": 3}, ValueError, r"max_seqlen_q to be None or an int >= the longest sequence \(4\), got 3"),
    ],
)
def test_varlen_bad_input_is_one_line(change, error, message):
    q, k, v, cu_q, cu_k = packed([3, 4], [3, 4])
    arguments = {"q": q, "k": k, "v": v, "cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k, "max_seqlen_q": None, "max_seqlen_k": None}
    with pytest.raises(error, match=message) as raised:
        kernels.attention_varlen(**change(arguments), backend="einsum")
    assert "\n" not in str(raised.value)


SMALL = {"image_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 5}


@pytest.mark.parametrize("pool, class_token", [("token", True), ("mean", False)])
def test_packed_vit_equals_each_image_alone(pool, class_token):
    torch.manual_seed(0)
    model = ViT(fused=True, pool=pool, class_token=class_token, **SMALL).double().eval()
    images = [torch.rand(3, 32, 32, dtype=f64), torch.rand(1, 3, 16, 40, dtype=f64), torch.rand(3, 8, 8, dtype=f64)]
    with kernels.use_backend("einsum"):
        packed_logits = model(images)
        alone = torch.cat([model(image if image.dim() == 4 else image[None]) for image in images])
    assert packed_logits.shape == (3, 5)
    torch.testing.assert_close(packed_logits, alone)


def test_packed_vit_on_the_triton_path_equals_each_image_alone_on_the_reference():
    """The fused model's packed forward through the Triton varlen kernels (interpreted on a CPU)."""
    torch.manual_seed(0)
    model = ViT(fused=True, **SMALL).eval()
    images = [torch.rand(3, 32, 24), torch.rand(3, 8, 16)]
    with torch.no_grad():
        with kernels.use_backend("triton"):
            packed_logits = model(images)
        model64 = ViT(fused=False, **SMALL).double().eval()
        model64.load_state_dict(model.state_dict())
        alone = torch.cat([model64(image[None].double()) for image in images])
    torch.testing.assert_close(packed_logits.double(), alone, rtol=1e-4, atol=1e-4)


def test_packed_vit_calls_varlen_once_per_layer(monkeypatch):
    calls = []
    varlen = kernels.attention_varlen
    monkeypatch.setattr(kernels, "attention_varlen", lambda *a, **kw: calls.append(a[3].tolist()) or varlen(*a, **kw))
    model = ViT(fused=False, **SMALL).eval()
    with torch.no_grad():
        model([torch.rand(3, 16, 16), torch.rand(3, 24, 8)])
    assert calls == [[0, 5, 9]] * SMALL["depth"]  # (1 + 2*2) and (1 + 3*1) tokens


def test_packed_vit_gradients_equal_each_image_alone():
    torch.manual_seed(0)
    model = ViT(fused=False, **SMALL).double()
    images = [torch.rand(3, 16, 24, dtype=f64), torch.rand(3, 32, 8, dtype=f64)]
    model(images).square().sum().backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    sum(model(image[None]).square().sum() for image in images).backward()
    for packed_grad, p in zip(packed_grads, model.parameters()):
        torch.testing.assert_close(packed_grad, p.grad)


def test_packed_vit_refuses_sides_that_are_not_patch_multiples():
    model = ViT(fused=False, **SMALL)
    with pytest.raises(ValueError, match=r"image 1's sides to be multiples of the patch size 8, got \(12, 16\)"):
        model([torch.rand(3, 16, 16), torch.rand(3, 12, 16)])
