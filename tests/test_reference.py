"""The einsum references against PyTorch, the tutorial's bugs caught, and the dispatch."""

import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import backend as backend_choice
from kernels import dispatch
from kernels.reference import attention_reference, patch_embed_reference
from tests.equivalence import DEVICE


def qkv(batch=2, heads=3, n_queries=7, n_keys=7, dim=16, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n_queries, dim, dtype=dtype, generator=generator)
    k = torch.randn(batch, heads, n_keys, dim, dtype=dtype, generator=generator)
    v = torch.randn(batch, heads, n_keys, dim, dtype=dtype, generator=generator)
    return q, k, v


# The tutorial's attention, bugs and all, to show the tests below would catch each bug.
def tutorial_attention_scaled_after_softmax(q, k, v, mask=None, scale=None):
    """Bug (a): the tutorial multiplied the softmax output by d**-0.5, not the logits."""
    energy = torch.einsum("bhqd, bhkd -> bhqk", q, k)
    att = F.softmax(energy, dim=-1) * q.shape[-1] ** -0.5
    return torch.einsum("bhal, bhlv -> bhav", att, v)


def tutorial_attention_mask_ignored(q, k, v, mask=None, scale=None):
    """Bug (b): `energy.mask_fill(~mask, ...)`; even spelled right, masked_fill's result was dropped."""
    energy = torch.einsum("bhqd, bhkd -> bhqk", q, k) * q.shape[-1] ** -0.5
    if mask is not None:
        energy.masked_fill(~mask, float("-inf"))  # not in place: the result is thrown away
    return torch.einsum("bhal, bhlv -> bhav", F.softmax(energy, dim=-1), v)


def matches_sdpa(implementation, mask=None) -> bool:
    q, k, v = qkv()
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return torch.allclose(implementation(q, k, v, mask), expected, atol=1e-12)


def test_reference_equals_the_plain_formula():
    q, k, v = qkv(n_queries=5, n_keys=9)
    scale = 0.3
    plain = F.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v
    torch.testing.assert_close(attention_reference(q, k, v, scale=scale), plain, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "bool-broadcast", "float-broadcast"])
def test_reference_equals_sdpa(mask_kind):
    q, k, v = qkv(n_queries=6, n_keys=11)
    generator = torch.Generator().manual_seed(1)
    mask = {
        "none": None,
        "bool": torch.rand(2, 3, 6, 11, generator=generator) > 0.3,
        "float": torch.randn(2, 3, 6, 11, generator=generator, dtype=torch.float64),
        "bool-broadcast": torch.rand(1, 1, 1, 11, generator=generator) > 0.3,
        "float-broadcast": torch.randn(2, 1, 6, 11, generator=generator, dtype=torch.float64),
    }[mask_kind]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(attention_reference(q, k, v, mask), expected, rtol=0, atol=1e-12)


def test_reference_causal_equals_sdpa():
    q, k, v = qkv(n_queries=9, n_keys=5)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(attention_reference(q, k, v, is_causal=True), expected, rtol=0, atol=1e-12)


def test_tutorial_bug_a_scale_after_softmax_is_caught():
    assert matches_sdpa(attention_reference)
    assert not matches_sdpa(tutorial_attention_scaled_after_softmax)


def test_tutorial_bug_b_ignored_mask_is_caught():
    mask = torch.rand(2, 3, 7, 7, generator=torch.Generator().manual_seed(2)) > 0.5
    mask[..., 0] = True  # every row keeps a key, so SDPA's answer is well defined
    assert matches_sdpa(attention_reference, mask)
    assert not matches_sdpa(tutorial_attention_mask_ignored, mask)
    assert not hasattr(torch.Tensor, "mask_fill")  # the tutorial's spelling does not exist


def test_fully_masked_rows_are_zero_with_zero_gradients():
    q, k, v = (t.requires_grad_() for t in qkv())
    mask = torch.ones(2, 3, 7, 7, dtype=torch.bool)
    mask[0, 1, 3] = False  # query 3 of batch 0, head 1 may attend nothing
    bias = torch.zeros(2, 3, 7, 7, dtype=torch.float64)
    bias[1, 2, 5] = float("-inf")
    for m in (mask, bias):
        out = attention_reference(q, k, v, m)
        out.sum().backward()
        row = (0, 1, 3) if m.dtype == torch.bool else (1, 2, 5)
        assert torch.equal(out[row], torch.zeros_like(out[row]))
        assert not any(t.grad.isnan().any() for t in (q, k, v))
        assert torch.equal(q.grad[row], torch.zeros_like(q.grad[row]))
        q.grad = k.grad = v.grad = None
    torch.testing.assert_close(
        attention_reference(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_bias_of_finfo_min_is_no_masked_row_as_in_sdpa(dtype):
    """Issue 19: a finite bias of finfo.min on every key of a row averages v (q k^T is lost beside
    it), as SDPA does, where -inf would empty the row; a row mixing finfo.min and 0 attends the 0
    keys alone. The oracle the fallback and the kernels are held to must itself get this right."""
    q, k, v = qkv(n_queries=4, n_keys=6, dtype=dtype)
    bias = torch.zeros(2, 3, 4, 6, dtype=dtype)
    bias[..., 0, :] = torch.finfo(dtype).min
    bias[..., 1, ::2] = torch.finfo(dtype).min
    out = attention_reference(q, k, v, bias)
    tolerance = {"rtol": 0, "atol": 1e-6 if dtype == torch.float32 else 1e-12}
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=bias), **tolerance)
    torch.testing.assert_close(out[:, :, 0], v.mean(-2), **tolerance)
    odd_keys = attention_reference(q, k[:, :, 1::2], v[:, :, 1::2])
    torch.testing.assert_close(out[:, :, 1], odd_keys[:, :, 1], **tolerance)


def test_dropout_mask_is_applied_and_rescaled():
    q, k, v = qkv()
    keep = torch.rand(2, 3, 7, 7, generator=torch.Generator().manual_seed(3)) > 0.25
    out = attention_reference(q, k, v, dropout_p=0.25, dropout_mask=keep)
    att = F.softmax(q @ k.transpose(-1, -2) * 16**-0.5, dim=-1) * keep / 0.75
    torch.testing.assert_close(out, att @ v, rtol=0, atol=1e-12)


def test_dropout_keep_rate():
    q, k, v = qkv(batch=4, heads=4, n_queries=64, n_keys=64)
    torch.manual_seed(0)
    ones = torch.ones_like(v)
    # With v = 1 every output is (kept weights) / (1 - p); its mean over many rows is 1.
    out = attention_reference(q, k, ones, dropout_p=0.5)
    assert abs(out.mean().item() - 1.0) < 0.05


@pytest.mark.parametrize("height, width", [(32, 48), (16, 16)])
def test_patch_embed_reference_equals_conv2d(height, width):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, height, width, generator=generator, dtype=torch.float64)
    weight = torch.randn(8, 3, 16, 16, generator=generator, dtype=torch.float64)
    bias = torch.randn(8, generator=generator, dtype=torch.float64)
    n = (height // 16) * (width // 16)
    cls_token = torch.randn(1, 1, 8, generator=generator, dtype=torch.float64)
    pos_embed = torch.randn(1, 1 + n, 8, generator=generator, dtype=torch.float64)
    conv = F.conv2d(images, weight, bias, stride=16).flatten(2).transpose(1, 2)  # (B, N, D)
    expected = torch.cat([cls_token.expand(2, -1, -1), conv], dim=1) + pos_embed
    actual = patch_embed_reference(images, weight, bias, cls_token, pos_embed)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(patch_embed_reference(images, weight, bias), conv, rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# Dispatch: who picks what, and the errors.


def test_auto_on_cpu_uses_einsum_and_says_so(monkeypatch):
    monkeypatch.setattr(backend_choice, "_warned", set())
    q, _, _ = qkv()
    with pytest.warns(UserWarning, match="einsum fallback.*cpu"):
        assert backend_choice.pick_backend("auto", "attention", [q]) == "einsum"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backend_choice.pick_backend("auto", "attention", [q])  # once only


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = qkv(dtype=torch.float32)
    with pytest.raises(RuntimeError, match="backend='triton' needs CUDA tensors, got tensors on cpu"):
        kernels.attention(q, k, v, backend="triton")


def test_triton_on_cpu_with_interpreter_is_allowed(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend_choice.pick_backend("triton", "attention", [torch.zeros(1)]) == "triton"


def test_triton_refuses_float64():
    # On DEVICE: on a GPU, where the interpreter is off, a CPU tensor would be refused for its device first.
    with pytest.raises(TypeError, match="float16, bfloat16 or float32, got torch.float64"):
        backend_choice.pick_backend("triton", "attention", [torch.zeros(1, dtype=torch.float64, device=DEVICE)])


def test_backend_names_are_checked():
    with pytest.raises(ValueError, match="backend must be one of"), kernels.use_backend("cuda"):
        pass
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.attention(*qkv(), backend="flash")


def test_use_backend_sets_and_restores():
    before = kernels.get_backend()
    with kernels.use_backend("einsum"):
        assert kernels.get_backend() == "einsum"
        assert not kernels.fused_by_default()
    assert kernels.get_backend() == before


def test_public_names_are_the_functions():
    # The function must win over any submodule of the same name (kernels.swap is a subpackage too).
    assert callable(kernels.attention) and kernels.attention is dispatch.attention
    assert kernels.patch_embed is dispatch.patch_embed
    assert kernels.swap is sys.modules["kernels.swap"].swap


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda q, k, v: (q[0], k, v, None), r"expected q of shape \(B, H, N, D\)"),
        (lambda q, k, v: (q, k[:, :2], v, None), "same batch and heads"),
        (lambda q, k, v: (q, k[..., :8], v, None), "same head dim"),
        (lambda q, k, v: (q, k, v[:, :, :3], None), "same length"),
        (lambda q, k, v: (q, k, v.float(), None), "one dtype"),
        (lambda q, k, v: (q, k, v, torch.ones(3, 7, dtype=torch.bool)), "mask broadcastable"),
        (lambda q, k, v: (q, k, v, torch.ones(7, 7, dtype=torch.int64)), "bool mask"),
        (lambda q, k, v: (q.long(), k.long(), v.long(), None), "floating-point q"),
    ],
)
def test_attention_input_errors(change, message):
    with pytest.raises((ValueError, TypeError), match=message):
        kernels.attention(*change(*qkv()), backend="einsum")


def test_sdpa_drop_in_matches_torch():
    q, k, v = qkv(n_queries=5, n_keys=8)
    mask = torch.rand(5, 8, generator=torch.Generator().manual_seed(4)) > 0.4
    for kwargs in ({}, {"attn_mask": mask}, {"is_causal": True}, {"scale": 0.5}, {"attn_mask": mask.double()}):
        expected = F.scaled_dot_product_attention(q, k, v, **kwargs)
        actual = kernels.scaled_dot_product_attention(q, k, v, backend="einsum", **kwargs)
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)
    # Other ranks: (L, E), (B, L, E), (B, X, H, L, E).
    for shape in ((5, 16), (2, 5, 16), (2, 2, 3, 5, 16)):
        q3, k3, v3 = (torch.randn(*shape, dtype=torch.float64) for _ in range(3))
        torch.testing.assert_close(
            kernels.scaled_dot_product_attention(q3, k3, v3, backend="einsum"),
            F.scaled_dot_product_attention(q3, k3, v3),
            rtol=0,
            atol=1e-12,
        )
    with pytest.raises(ValueError, match="attn_mask or is_causal"):
        kernels.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)


def test_sdpa_drop_in_gqa():
    q = torch.randn(2, 6, 5, 16, dtype=torch.float64)
    k, v = torch.randn(2, 2, 5, 16, dtype=torch.float64), torch.randn(2, 2, 5, 16, dtype=torch.float64)
    expected = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    actual = kernels.scaled_dot_product_attention(q, k, v, enable_gqa=True, backend="einsum")
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"images": torch.zeros(1, 4, 32, 32)}, "expected images with 3 channels"),
        ({"images": torch.zeros(1, 3, 30, 32)}, "multiples of the patch size 16, got 30x32"),
        ({"images": torch.zeros(3, 32, 32)}, r"images of shape \(B, C, H, W\)"),
        ({"bias": torch.zeros(7)}, r"bias of shape \(8,\)"),
        ({"pos_embed": torch.zeros(1, 4, 8)}, r"pos_embed of shape \(1, 5, 8\)"),
        ({"cls_token": torch.zeros(1, 8)}, r"cls_token of shape \(1, T, 8\)"),
    ],
)
def test_patch_embed_input_errors(kwargs, message):
    arguments = {
        "images": torch.zeros(1, 3, 32, 32),
        "weight": torch.zeros(8, 3, 16, 16),
        "bias": torch.zeros(8),
        "cls_token": torch.zeros(1, 1, 8),
        "pos_embed": torch.zeros(1, 5, 8),
    }
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        kernels.patch_embed(**arguments, backend="einsum")
