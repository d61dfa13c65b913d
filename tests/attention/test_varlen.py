"""Packed sequences of different lengths: ``kernels.attention_varlen`` and the packed ``vit.ViT``.

The einsum path (a loop over the sequences through the fallback) against the plain reference run
on each sequence alone, in float64, forward and backward; the input checks; a packed ViT equal to
running each image alone. The Triton varlen kernels are tested in tests/attention/test_varlen_triton.py.
"""

from __future__ import annotations

import copy

import pytest
import torch

import kernels
from kernels.checks import MAX_HEAD_DIM, MIN_HEAD_DIM
from kernels.reference import attention_reference, attention_varlen_reference
from tests.equivalence import DEVICE, assert_close_to_reference
from vit.model import ViT

f64 = torch.float64
TRITON = pytest.param("triton", marks=pytest.mark.interpreter)  # runs the kernels: the interpreter on a CPU


def packed(lengths_q, lengths_k, heads=2, head_dim=16, head_dim_v=None, dtype=f64, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    total_q, total_k = sum(lengths_q), sum(lengths_k)

    def make(total, dim):
        return torch.randn(total, heads, dim, generator=generator, dtype=f64).to(device, dtype).requires_grad_()

    q, k, v = make(total_q, head_dim), make(total_k, head_dim), make(total_k, head_dim_v or head_dim)
    cu_q = torch.tensor([0, *torch.tensor(lengths_q).cumsum(0).tolist()], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, *torch.tensor(lengths_k).cumsum(0).tolist()], dtype=torch.int32, device=device)
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
    q, k, v, cu_q, cu_k = (t.to(DEVICE) for t in packed([3, 4], [3, 4], head_dim=8, dtype=torch.float16))
    with pytest.raises(ValueError, match=rf"^attention_varlen: head dim 8 is outside the Triton kernels' range, {MIN_HEAD_DIM} to {MAX_HEAD_DIM}; use backend="):
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
        (lambda a: {**a, "max_seqlen_q": 3}, ValueError, r"max_seqlen_q >= the longest sequence \(4\), got 3"),
        (lambda a: {**a, "max_seqlen_q": -1}, ValueError, "max_seqlen_q to be at least 0, got -1"),
        (lambda a: {**a, "max_seqlen_q": 4.0}, TypeError, "max_seqlen_q to be None, an int or a 0-d integer tensor, got float"),
        (lambda a: {**a, "max_seqlen_k": True}, TypeError, "max_seqlen_k to be None, an int or a 0-d integer tensor, got bool"),
        (lambda a: {**a, "max_seqlen_q": torch.tensor(4.0)}, TypeError, r"got a tensor of shape \(\) and dtype torch.float32"),
        (lambda a: {**a, "max_seqlen_q": torch.tensor([4])}, TypeError, r"got a tensor of shape \(1,\)"),
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


@pytest.mark.interpreter
def test_packed_vit_on_the_triton_path_equals_each_image_alone_on_the_reference():
    """The fused model's packed forward through the Triton varlen kernels (interpreted on a CPU)."""
    torch.manual_seed(0)
    model = ViT(fused=True, **SMALL).eval()
    images = [torch.rand(3, 32, 24), torch.rand(3, 8, 16)]
    with torch.no_grad():
        with kernels.use_backend("triton"):  # on DEVICE: the interpreter's CPU, or a GPU
            packed_logits = copy.deepcopy(model).to(DEVICE)([image.to(DEVICE) for image in images]).cpu()
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


@pytest.mark.parametrize("backend", ["einsum", TRITON])
def test_varlen_takes_max_seqlen_as_a_0d_integer_tensor(backend):
    """What Qwen's vision towers compute: ``cu_seqlens.diff().max()``, a 0-d tensor."""
    # On DEVICE: CUDA tensors on a GPU, where backend="triton" refuses CPU ones (the interpreter is off).
    q, k, v, cu_q, cu_k = packed([3, 4], [5, 2], dtype=torch.float32, device=DEVICE)
    wanted = kernels.attention_varlen(q, k, v, cu_q, cu_k, 4, 5, backend=backend)
    for dtype in (torch.int32, torch.int64):
        longest_q, longest_k = cu_q.diff().max().to(dtype), cu_k.diff().max().to(dtype)
        got = kernels.attention_varlen(q, k, v, cu_q, cu_k, longest_q, longest_k, backend=backend)
        torch.testing.assert_close(got, wanted, rtol=0, atol=0)


def _strided_cu_seqlens(values, device="cpu"):
    """Three views on ``device`` holding ``values`` that are not plain contiguous tensors, with junk in between
    (made there: a copy to another device would be contiguous)."""
    n = len(values)
    every_other = torch.full((2 * n,), 10**6, dtype=torch.int32, device=device)
    every_other[::2] = torch.tensor(values, dtype=torch.int32, device=device)
    offset = torch.full((n + 3,), 10**6, dtype=torch.int32, device=device)
    offset[3:] = torch.tensor(values, dtype=torch.int32, device=device)
    # expanded: a (2, n) view of one row, read down a column of stride 0 would repeat one value
    expanded = torch.tensor(values, dtype=torch.int32, device=device)[None].expand(2, n)[1]
    return {"every_other": every_other[::2], "offset": offset[3:], "expanded": expanded}


@pytest.mark.parametrize("which", ["every_other", "offset", "expanded"])
@pytest.mark.parametrize("backend", ["einsum", TRITON])
def test_varlen_reads_the_values_of_a_strided_cu_seqlens(which, backend):
    """Issue 19: a strided view's values were checked on the host, then read as if contiguous."""
    lengths_q, lengths_k = [4, 6, 3], [5, 2, 7]
    q, k, v, cu_q, cu_k = packed(lengths_q, lengths_k, dtype=torch.float32)  # the references' inputs, on the CPU
    # The call under test on DEVICE: CUDA tensors on a GPU, where backend="triton" refuses CPU ones.
    ours = [t.detach().to(DEVICE).requires_grad_() for t in (q, k, v)]
    view_q = _strided_cu_seqlens(cu_q.tolist(), DEVICE)[which]
    view_k = _strided_cu_seqlens(cu_k.tolist(), DEVICE)[which]
    assert which == "expanded" or not view_q.is_contiguous() or view_q.storage_offset() > 0
    grad = torch.randn(sum(lengths_q), 2, 16)
    wanted = attention_varlen_reference(*(t.detach().double().requires_grad_() for t in (q, k, v)), cu_q, cu_k)
    got = kernels.attention_varlen(*ours, view_q, view_k, backend=backend)
    assert_close_to_reference(got.cpu(), wanted, wanted.float())
    grads = torch.autograd.grad(got, ours, grad.to(DEVICE))
    wanted_grads = torch.autograd.grad(
        kernels.attention_varlen(q, k, v, cu_q, cu_k, backend="einsum"), (q, k, v), grad
    )
    for mine, theirs in zip(grads, wanted_grads):
        torch.testing.assert_close(mine.cpu(), theirs, rtol=1e-4, atol=1e-5)


def test_varlen_cache_of_checked_cu_seqlens_is_not_fooled_by_reused_storage():
    """Issue 19: facts cached by (data pointer, version) served a new tensor placed where an old one was.

    A stand-in for the caching allocator: a second tensor over the same storage, same count and
    total, different values (one invalid: a length of -1 must be refused, not served stale facts).
    """
    q, k, v, _, _ = packed([3, 4], [3, 4], dtype=torch.float32)
    import numpy as np

    memory = np.array([0, 3, 7], dtype=np.int32)
    first = torch.from_numpy(memory)
    kernels.attention_varlen(q, k, v, first, first, backend="einsum")  # checked and cached
    memory[:] = [0, 8, 7]  # new values where the first tensor's were, no version bump
    reused = torch.from_numpy(memory)
    assert (reused.data_ptr(), reused._version, reused.numel()) == (first.data_ptr(), first._version, first.numel())
    with pytest.raises(ValueError, match="non-decreasing, got 8 then 7"):
        kernels.attention_varlen(q, k, v, reused, reused, backend="einsum")


def test_varlen_masked_form_equals_each_sequence_alone():
    """The form torch.compile runs (no host read of cu_seqlens), causal and not, with empty sequences."""
    from kernels.reference import attention_varlen_masked

    for is_causal in (False, True):
        q, k, v, cu_q, cu_k = packed([3, 0, 5, 2], [4, 2, 5, 0])
        wanted = attention_varlen_reference(q, k, v, cu_q, cu_k, is_causal=is_causal)
        got = attention_varlen_masked(q, k, v, cu_q, cu_k, is_causal=is_causal)
        torch.testing.assert_close(got, wanted)
        grads = torch.autograd.grad(got.sum(), (q, k, v))
        wanted_grads = torch.autograd.grad(wanted.sum(), (q, k, v))
        for mine, theirs in zip(grads, wanted_grads):
            torch.testing.assert_close(mine, theirs)


@pytest.mark.parametrize(
    "compile_backend, given",
    [("eager", "int"), ("aot_eager", "int"), ("aot_eager", "tensor"), ("aot_eager", "none"), ("inductor", "tensor")],
)
def test_varlen_compiles_fullgraph_with_no_host_read(compile_backend, given):
    """Issue 19: the cu_seqlens checks read values on the host, which no traced graph holds."""
    torch._dynamo.reset()
    q, k, v, cu_q, cu_k = packed([3, 4, 1], [5, 2, 2], dtype=torch.float32)
    longest = {"int": (4, 5), "tensor": (cu_q.diff().max(), cu_k.diff().max()), "none": (None, None)}[given]

    def attend(q, k, v, cu_q, cu_k):
        return kernels.attention_varlen(q, k, v, cu_q, cu_k, *longest, is_causal=True, backend="einsum")

    compiled = torch.compile(attend, backend=compile_backend, fullgraph=True)
    got = compiled(q, k, v, cu_q, cu_k)
    wanted = attend(q, k, v, cu_q, cu_k)
    torch.testing.assert_close(got, wanted)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), q)[0], torch.autograd.grad(wanted.sum(), q)[0])
    # The checks still hold in the graph, as a device-side assert.
    bad = torch.tensor([0, 8, 8, 7], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="cu_seqlens_q to start at 0, be non-decreasing"):
        compiled(q.detach(), k.detach(), v.detach(), bad, cu_k)


@pytest.mark.parametrize("backend", ["einsum", TRITON])
def test_varlen_causal_is_top_left_aligned_not_flash_attns_bottom_right(backend):
    """Issue 19 item 7: query i sees keys j <= i of its sequence (SDPA's convention, as the README
    says), which differs from flash-attn >= 2.1 (j <= i + Nk - Nq) whenever Nq != Nk."""
    lengths_q, lengths_k = [3, 5], [6, 2]
    q, k, v, cu_q, cu_k = packed(lengths_q, lengths_k, dtype=torch.float32)
    # On DEVICE (CUDA tensors on a GPU, where backend="triton" refuses CPU ones), compared on the CPU.
    got = kernels.attention_varlen(*(t.to(DEVICE) for t in (q, k, v, cu_q, cu_k)), is_causal=True, backend=backend).cpu()
    starts_q, starts_k = [0, 3], [0, 6]
    for (nq, nk), sq, sk in zip(zip(lengths_q, lengths_k), starts_q, starts_k):
        one = [t[s:s + n].transpose(0, 1)[None] for t, s, n in ((q, sq, nq), (k, sk, nk), (v, sk, nk))]
        rows, cols = torch.arange(nq)[:, None], torch.arange(nk)[None, :]
        top_left = attention_reference(*one, cols <= rows)[0].transpose(0, 1)
        bottom_right = attention_reference(*one, cols <= rows + nk - nq)[0].transpose(0, 1)
        torch.testing.assert_close(got[sq:sq + nq], top_left.float(), rtol=1e-4, atol=1e-5)
        assert (got[sq:sq + nq] - bottom_right).abs().max() > 0.1
