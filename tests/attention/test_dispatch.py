"""The dispatch's habits, as a PyTorch user expects them (issue 11).

- the backend is chosen per thread and per asyncio task, and by capability under "auto";
- the Triton path says what it cannot do (forward-mode AD, torch.func grad/jvp, double backward)
  in one line, while "auto" falls back to the einsum path, which can;
- ``kernels.attention``'s arguments after ``mask`` are keyword-only; scalars obey one rule on both
  backends; the SDPA drop-in takes grouped value heads as PyTorch does;
- the Triton output is not a view (in-place ops work), a swapped model is freed by ``del``, and
  ``patch_embed`` follows autocast's rules for Conv2d, cat and add.
"""

from __future__ import annotations

import asyncio
import fractions
import gc
import threading
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import backend as backend_choice
from kernels.checks import MAX_HEAD_DIM, MIN_HEAD_DIM
from kernels.reference import attention_reference
from tests.equivalence import DEVICE

f64 = torch.float64


def qkv(batch=1, heads=2, n=9, head_dim=16, dtype=torch.float32, device=DEVICE, n_keys=None):
    generator = torch.Generator().manual_seed(0)
    shapes = [(batch, heads, n, head_dim), (batch, heads, n_keys or n, head_dim), (batch, heads, n_keys or n, head_dim)]
    return [torch.randn(shape, generator=generator, dtype=f64).to(device, dtype) for shape in shapes]


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(backend_choice, "_warned", set())


# ---------------------------------------------------------------------------------------------
# Per thread, per task.


def test_use_backend_in_one_thread_does_not_change_another():
    inside, seen_by_other = threading.Event(), []
    done = threading.Event()

    def holds_einsum():
        with kernels.use_backend("einsum"):
            inside.set()
            done.wait(5)

    def reads():
        inside.wait(5)
        seen_by_other.append(kernels.get_backend())
        done.set()

    with kernels.use_backend("triton"):
        threads = [threading.Thread(target=holds_einsum), threading.Thread(target=reads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert kernels.get_backend() == "triton"
    assert seen_by_other == [backend_choice._PROCESS_BACKEND]


def test_use_backend_is_per_asyncio_task():
    async def task(name, started, release):
        with kernels.use_backend(name):
            started.set()
            await release.wait()
            return kernels.get_backend()

    async def main():
        started = [asyncio.Event(), asyncio.Event()]
        release = asyncio.Event()
        tasks = [asyncio.create_task(task(name, s, release)) for name, s in zip(("einsum", "triton"), started)]
        for s in started:
            await s.wait()
        release.set()
        return await asyncio.gather(*tasks)

    assert asyncio.run(main()) == ["einsum", "triton"]


def test_there_is_no_global_setter():
    assert not hasattr(kernels, "set_backend")


# ---------------------------------------------------------------------------------------------
# "auto" by capability; "triton" says why not.


def test_auto_falls_back_for_a_head_dim_the_kernels_cannot_take():
    q, k, v = (torch.empty(1, 2, 9, 8, device="meta") for _ in range(3))
    with pytest.warns(UserWarning, match=rf"head dim 8 is outside the Triton kernels' range, {MIN_HEAD_DIM} to {MAX_HEAD_DIM}"):
        assert backend_choice.pick_backend("auto", "attention", [q, k, v], lambda: f"head dim 8 is outside the Triton kernels' range, {MIN_HEAD_DIM} to {MAX_HEAD_DIM}") == "einsum"
    out = kernels.attention(q, k, v, backend="auto")  # the warning was given once: no second one
    assert out.shape == (1, 2, 9, 8)
    q64 = torch.empty(1, 2, 9, 64, device="meta")
    assert backend_choice.pick_backend("auto", "attention", [q64, q64, q64], lambda: None) == "triton"


@pytest.mark.parametrize("head_dim", [8, 300])
def test_explicit_triton_names_the_head_dim(head_dim):
    q, k, v = qkv(head_dim=head_dim)
    with pytest.raises(ValueError, match=rf"^attention: head dim {head_dim} is outside .* use backend='einsum'"):
        kernels.attention(q, k, v, backend="triton")


def test_auto_with_a_head_dim_out_of_range_gives_the_reference():
    q, k, v = qkv(head_dim=8, dtype=f64)
    with pytest.warns(UserWarning):
        out = kernels.attention(q, k, v, backend="auto")
    torch.testing.assert_close(out, attention_reference(q, k, v))


# ---------------------------------------------------------------------------------------------
# Autograd modes on the Triton path.


def _triton_attention(q, k, v):
    return kernels.attention(q, k, v, backend="triton")


def test_forward_ad_on_triton_is_a_one_line_error_naming_einsum():
    q, k, v = qkv()
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(q, torch.ones_like(q))
        with pytest.raises(NotImplementedError, match=r"forward-mode derivative.*backend='einsum'") as error:
            _triton_attention(dual, k, v)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("transform", ["jvp", "grad", "vjp"])
def test_func_transforms_on_triton_are_one_line_errors(transform):
    q, k, v = qkv()
    run = {
        "jvp": lambda: torch.func.jvp(lambda q: _triton_attention(q, k, v), (q,), (torch.ones_like(q),)),
        "grad": lambda: torch.func.grad(lambda q: _triton_attention(q, k, v).sum())(q),
        "vjp": lambda: torch.func.vjp(lambda q: _triton_attention(q, k, v), q),
    }[transform]
    with pytest.raises(NotImplementedError, match=r"^attention: the Triton kernels have no torch\.func\..*backend='einsum'"):
        run()


@pytest.mark.interpreter
def test_vmap_on_triton_is_correct():
    q, k, v = qkv()
    stacked = torch.stack([q, q.flip(-1), 2 * q])  # (3, B, H, N, D)
    out = torch.func.vmap(lambda q: _triton_attention(q, k, v))(stacked)
    expected = torch.stack([attention_reference(x.double(), k.double(), v.double()) for x in stacked])
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_einsum_path_computes_jvp_where_auto_falls_back():
    q, k, v = (t.to(f64) for t in qkv())
    tangent = torch.randn_like(q)
    with pytest.warns(UserWarning, match="einsum fallback"):
        # float64 picks einsum anyway; the point is the value: use float32 on the GPU below.
        _, out_tangent = torch.func.jvp(lambda q: kernels.attention(q, k, v, backend="auto"), (q,), (tangent,))
    _, expected = torch.func.jvp(lambda q: attention_reference(q, k, v), (q,), (tangent,))
    torch.testing.assert_close(out_tangent, expected)
    assert out_tangent.abs().max() > 0


def test_auto_names_forward_ad_as_its_reason_on_a_device_the_kernels_take():
    q = torch.empty(1, 2, 9, 16, device="meta")
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(q, torch.empty_like(q))
        with pytest.warns(UserWarning, match="forward-mode derivative"):
            assert backend_choice.pick_backend("auto", "attention", [dual, q, q]) == "einsum"


@pytest.mark.interpreter
def test_double_backward_on_triton_is_a_one_line_error():
    q, k, v = qkv()
    q.requires_grad_(True)
    (grad_q,) = torch.autograd.grad(_triton_attention(q, k, v).pow(2).sum(), q, create_graph=True)
    with pytest.raises(NotImplementedError, match=r"double backward.*backend='einsum'"):
        torch.autograd.grad(grad_q.sum(), q)


def test_patch_embed_forward_ad_on_triton_is_a_one_line_error():
    images, weight = torch.randn(1, 3, 16, 16, device=DEVICE), torch.randn(8, 3, 8, 8, device=DEVICE)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(weight, torch.ones_like(weight))
        with pytest.raises(NotImplementedError, match=r"^patch_embed: .*forward-mode.*backend='einsum'"):
            kernels.patch_embed(images, dual, backend="triton")
    with pytest.raises(NotImplementedError, match=r"^patch_embed: .*torch\.func\.jvp"):
        torch.func.jvp(lambda w: kernels.patch_embed(images, w, backend="triton"), (weight,), (weight,))


@pytest.mark.interpreter
def test_patch_embed_double_backward_on_triton_is_a_one_line_error():
    images = torch.randn(1, 3, 16, 16, device=DEVICE, requires_grad=True)
    weight = torch.randn(8, 3, 8, 8, device=DEVICE, requires_grad=True)
    (grad_images,) = torch.autograd.grad(kernels.patch_embed(images, weight, backend="triton").pow(2).sum(), images, create_graph=True)
    with pytest.raises(NotImplementedError, match=r"^patch_embed: .*double backward"):
        torch.autograd.grad(grad_images.sum(), weight)


# ---------------------------------------------------------------------------------------------
# The output, the arguments.


@pytest.mark.interpreter
def test_triton_output_is_not_a_view_and_takes_in_place_ops():
    q, k, v = qkv()
    q.requires_grad_(True)
    out = _triton_attention(q, k, v)
    assert out._base is None
    assert out.stride() == (9 * 2 * 16, 16, 2 * 16, 1)  # (B, N, H, D) memory, read by the projection as is
    expected = out.detach().clone() + 1
    out.add_(1)  # SDPA and einsum accept this; so do we
    torch.testing.assert_close(out.detach(), expected)


def test_attention_arguments_after_mask_are_keyword_only():
    q, k, v = qkv(dtype=f64)
    with pytest.raises(TypeError, match="positional"):
        kernels.attention(q, k, v, None, 0.1)


@pytest.mark.parametrize("backend", ["einsum", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_scale_rule_is_the_same_on_both_backends(backend):
    q, k, v = qkv()
    expected = attention_reference(q.double(), k.double(), v.double(), scale=0.125)
    for scale in (fractions.Fraction(1, 8), np.float32(0.125), np.float64(0.125)):
        out = kernels.attention(q, k, v, scale=scale, backend=backend)
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"^attention: expected scale to be None or a finite number, got a int too large for a float$"):
        kernels.attention(q, k, v, scale=10**400, backend=backend)


def test_numpy_bool_is_a_bool_and_other_types_are_named():
    q, k, v = qkv(dtype=f64)
    torch.testing.assert_close(
        kernels.attention(q, k, v, is_causal=np.bool_(True), backend="einsum"),
        attention_reference(q, k, v, is_causal=True),
    )
    with pytest.raises(TypeError, match=r"expected is_causal to be a bool \(True or False\), got numpy\.int64"):
        kernels.attention(q, k, v, is_causal=np.int64(1), backend="einsum")


def test_sdpa_gqa_takes_value_heads_that_differ_from_key_heads():
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(2, 8, 5, 16, generator=generator, dtype=f64)
    key = torch.randn(2, 2, 7, 16, generator=generator, dtype=f64)
    value = torch.randn(2, 4, 7, 16, generator=generator, dtype=f64)
    expected = F.scaled_dot_product_attention(query, key, value, enable_gqa=True)
    out = kernels.scaled_dot_product_attention(query, key, value, enable_gqa=True, backend="einsum")
    torch.testing.assert_close(out, expected)


def test_sdpa_gqa_error_shows_the_callers_shapes():
    query, key, value = torch.randn(2, 8, 5, 16), torch.randn(2, 3, 7, 16), torch.randn(2, 3, 7, 16)
    with pytest.raises(ValueError, match=r"divisible by key heads and by value heads, got 8, 3 and 3 .*\(2, 3, 7, 16\)"):
        kernels.scaled_dot_product_attention(query, key, value, enable_gqa=True, backend="einsum")
    with pytest.raises(ValueError, match=r"same leading dims, got \(1, 4, 5, 16\), \(2, 2, 7, 16\)"):
        kernels.scaled_dot_product_attention(
            torch.randn(1, 4, 5, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16), enable_gqa=True, backend="einsum"
        )


# ---------------------------------------------------------------------------------------------
# Swap: no reference cycle; shapes the kernels cannot take are left alone.


def test_del_frees_a_swapped_model_without_the_garbage_collector():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, depth=2)
    kernels.swap(model)
    parameter = weakref.ref(model.blocks[0].attn.qkv.weight)
    enabled = gc.isenabled()
    gc.disable()
    try:
        del model
        assert parameter() is None
    finally:
        if enabled:
            gc.enable()


def test_swap_leaves_alone_attention_whose_head_dim_the_kernels_cannot_take():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, depth=1, num_heads=24)
    report = kernels.swap(model)  # embed 192 / 24 heads = head dim 8
    assert [e.path for e in report.left_alone] == ["blocks.0.attn"]
    assert f"head dim 8: the Triton kernels take {MIN_HEAD_DIM} to {MAX_HEAD_DIM}" in report.left_alone[0].note
    assert "forward" not in model.blocks[0].attn.__dict__
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True)  # head dim 4
    assert "head dim 4" in kernels.swap(mha).left_alone[0].note


# ---------------------------------------------------------------------------------------------
# patch_embed under autocast: autocast's rules exactly.


def test_patch_embed_under_autocast_leaves_float64_alone():
    images, weight = torch.randn(1, 3, 16, 16, dtype=f64), torch.randn(8, 3, 8, 8, dtype=f64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = kernels.patch_embed(images, weight, backend="einsum")
        conv = F.conv2d(images, weight, stride=8)
    assert conv.dtype == tokens.dtype == f64
    torch.testing.assert_close(tokens, conv.flatten(2).transpose(1, 2))


def test_patch_embed_under_autocast_refuses_mixed_float32_and_float64_as_conv2d_does():
    images, weight = torch.randn(1, 3, 16, 16), torch.randn(8, 3, 8, 8, dtype=f64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError):
            F.conv2d(images, weight, stride=8)
        with pytest.raises(TypeError, match=r"^patch_embed \(under autocast.*expected every tensor on one dtype, got images torch.bfloat16, weight torch.float64"):
            kernels.patch_embed(images, weight, backend="einsum")


def test_patch_embed_under_autocast_promotes_like_cat_and_add():
    images, weight = torch.randn(2, 3, 16, 16), torch.randn(8, 3, 8, 8)
    cls_token, pos_embed = torch.randn(1, 1, 8), torch.randn(1, 5, 8, dtype=f64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = kernels.patch_embed(images, weight, None, cls_token, pos_embed, backend="einsum")
        conv = F.conv2d(images, weight, stride=8).flatten(2).transpose(1, 2)
        expected = torch.cat([cls_token.expand(2, -1, -1), conv], dim=1) + pos_embed
    assert tokens.dtype == expected.dtype == f64
    torch.testing.assert_close(tokens, expected, atol=0.1, rtol=0.02)


@pytest.mark.parametrize(
    "value, expected",
    [("EINSUM", "einsum"), ("Triton", "triton"), ("", "auto"), (" auto ", "auto"), (None, "auto"), ("bogus", None)],
)
def test_process_backend_takes_any_case_and_empty_as_unset(value, expected):
    assert backend_choice._process_backend(value) == expected


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("value", ["bogus", "EINSUM", ""])
def test_a_bad_process_backend_fails_at_the_first_call_not_at_import(value):
    import os
    import subprocess
    import sys

    script = (
        "import torch, kernels\n"
        "q = torch.randn(1, 1, 3, 4)\n"
        "try:\n"
        "    kernels.attention(q, q, q)\n"
        "except ValueError as error:\n"
        "    print('ERROR', error)\n"
        "else:\n"
        "    print('OK', kernels.get_backend())\n"
    )
    env = {**os.environ, "VITRITON_BACKEND": value}
    done = subprocess.run([sys.executable, "-c", script], check=False, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1
    if value == "bogus":
        assert lines[0].startswith("ERROR VITRITON_BACKEND: expected one of") and "'bogus'" in lines[0]
    else:
        assert lines[0] == f"OK {value.lower() or 'auto'}"
