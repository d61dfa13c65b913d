"""The patch projection's robustness: every bad input gets a clear one-line error, every edge shape a right answer.

1. Errors at the public boundary (``kernels.patch_embed``), on both backends: each bad input is
   one line naming what was expected and what came (a TypeError for a wrong type, a ValueError for
   a wrong shape, device or value).
2. Nothing to project (an empty batch, an image with no whole patch, D = 0): the reference's
   tokens and gradients, and no launch.
3. A property (hypothesis) over image sizes, patches, channels, dtypes and strides, through the
   Triton path (Triton's interpreter without a GPU) against the reference with the shared rule.

Attention's robustness tests are in tests/attention/test_robustness.py; the shared helpers in
tests/robustness.py.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from hypothesis import given
from hypothesis import strategies as st

import kernels
from kernels.reference import patch_embed_reference
from tests.equivalence import DEVICE, DTYPES, ON_GPU, assert_close_to_reference
from tests.robustness import examples, one_line_error, randn

f64 = torch.float64


# ---------------------------------------------------------------------------------------------
# 1. Errors at the public boundary.


def patch_arguments(**changes):
    arguments = {
        "images": randn(1, 3, 32, 32),
        "weight": randn(8, 3, 16, 16),
        "bias": randn(8),
        "cls_token": randn(1, 1, 8),
        "pos_embed": randn(1, 5, 8),
    }
    arguments.update(changes)
    return arguments


PATCH_EMBED_ERRORS = [
    ("images-list", {"images": [[0.0]]}, TypeError, "expected images to be a tensor, got list"),
    ("weight-none", {"weight": None}, TypeError, "expected weight to be a tensor, got NoneType"),
    ("bias-list", {"bias": [0.0] * 8}, TypeError, "expected bias to be a tensor, got list"),
    ("pos-numpy", {"pos_embed": np.zeros((1, 5, 8))}, TypeError, "expected pos_embed to be a tensor, got ndarray"),
    ("images-rank-3", {"images": randn(3, 32, 32)}, ValueError, r"images of shape \(B, C, H, W\), got \(3, 32, 32\)"),
    ("weight-rank-3", {"weight": randn(8, 3, 16)}, ValueError,
     r"Conv2d weight of shape \(D, C, P, P\) with P >= 1, got \(8, 3, 16\)"),
    ("weight-not-square", {"weight": randn(8, 3, 16, 8)}, ValueError,
     r"Conv2d weight of shape \(D, C, P, P\) with P >= 1, got \(8, 3, 16, 8\)"),
    ("patch-0", {"weight": randn(8, 3, 0, 0)}, ValueError,
     r"Conv2d weight of shape \(D, C, P, P\) with P >= 1, got \(8, 3, 0, 0\)"),
    ("channels", {"images": randn(1, 4, 32, 32)}, ValueError, r"images with 3 channels \(the weight's\), got 4"),
    ("sides", {"images": randn(1, 3, 30, 32)}, ValueError, "multiples of the patch size 16, got 30x32"),
    ("uint8", {"images": torch.zeros(1, 3, 32, 32, dtype=torch.uint8, device=DEVICE)}, TypeError,
     "expected a floating-point images, got torch.uint8"),
    ("mixed-dtypes", {"images": randn(1, 3, 32, 32, dtype=f64)}, TypeError,
     "one dtype, got images torch.float64, weight torch.float32, bias torch.float32"),
    ("bias-on-meta", {"bias": torch.zeros(8, device="meta")}, ValueError, r"one device, got images \S+, weight \S+, bias meta"),
    ("bias-shape", {"bias": randn(7)}, ValueError, r"bias of shape \(8,\), got \(7,\)"),
    ("cls-shape", {"cls_token": randn(1, 8)}, ValueError, r"cls_token of shape \(1, T, 8\), T >= 1 prefix tokens \(class, registers, distillation\), got \(1, 8\)"),
    ("pos-shape", {"pos_embed": randn(1, 4, 8)}, ValueError,
     r"pos_embed of shape \(1, 5, 8\) for a 32x32 image with patch 16 and 1 prefix token\(s\), got \(1, 4, 8\)"),
]


@pytest.mark.parametrize("backend", ["einsum", "triton"])
@pytest.mark.parametrize("changes, error, message", [pytest.param(*case[1:], id=case[0]) for case in PATCH_EMBED_ERRORS])
def test_patch_embed_bad_input_is_a_one_line_error(changes, error, message, backend):
    one_line_error(error, "^patch_embed: .*" + message, kernels.patch_embed, **patch_arguments(**changes), backend=backend)


# ---------------------------------------------------------------------------------------------
# 2. Nothing to project.


@pytest.mark.parametrize(
    "images_shape, weight_shape",
    [((0, 3, 16, 16), (8, 3, 8, 8)), ((2, 3, 0, 16), (8, 3, 8, 8)), ((2, 3, 16, 16), (0, 3, 8, 8))],
    ids=["B0", "no-patch", "D0"],
)
def test_patch_embed_nothing_to_project_launches_nothing(no_launches, images_shape, weight_shape):
    """An empty batch, an image with no whole patch or D = 0: the tokens (class tokens and position
    embeddings where they apply) and the gradients the reference gives, without a launch. Before,
    D = 0 launched an empty grid and an image with no patch launched the grad_weight kernel."""
    dim = weight_shape[0]
    n_tokens = (images_shape[2] // 8) * (images_shape[3] // 8) + 1
    inputs = {
        "images": randn(*images_shape),
        "weight": randn(*weight_shape, scale=0.1),
        "bias": randn(dim),
        "cls_token": randn(1, 1, dim),
        "pos_embed": randn(1, n_tokens, dim),
    }
    ours = {name: t.clone().requires_grad_() for name, t in inputs.items()}
    tokens = kernels.patch_embed(**ours, backend="triton")
    expected = patch_embed_reference(**inputs)
    assert tokens.shape == (images_shape[0], n_tokens, dim)
    torch.testing.assert_close(tokens, expected, rtol=0, atol=0)
    upstream = randn(*tokens.shape, seed=3)
    tokens.backward(upstream)
    reference = {name: t.clone().requires_grad_() for name, t in inputs.items()}
    patch_embed_reference(**reference).backward(upstream)
    for name in inputs:
        torch.testing.assert_close(ours[name].grad, reference[name].grad, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 3. Properties.


IMAGE_LAYOUTS = ("contiguous", "channels_last", "crop", "hw-transposed", "batch-broadcast")
WEIGHT_LAYOUTS = ("conv", "linear-view", "s-transposed")


def image_buffer(images: torch.Tensor, layout: str):
    """(buffer, view of it equal in value to ``images``) with the layout's strides."""
    if layout == "channels_last":
        return images.contiguous(memory_format=torch.channels_last), lambda b: b
    if layout == "crop":  # a crop of a bigger canvas: a storage offset and wider rows
        return F.pad(images, (2, 3, 1, 4)), lambda b: b[:, :, 1:-4, 2:-3]
    if layout == "hw-transposed":
        return images.transpose(2, 3).contiguous(), lambda b: b.transpose(2, 3)
    if layout == "batch-broadcast":
        batch = images.shape[0]
        return images[:1].contiguous(), lambda b: b.expand(batch, *b.shape[1:])
    return images, lambda b: b


def weight_buffer(weight: torch.Tensor, layout: str):
    if layout == "linear-view":  # vit's Linear weight (D, P*P*C), columns in (s1 s2 c) order, viewed as Conv2d
        dim, channels, patch, _ = weight.shape
        return rearrange(weight, "d c s1 s2 -> d (s1 s2 c)").contiguous(), (
            lambda b: b.view(dim, patch, patch, channels).permute(0, 3, 1, 2)
        )
    if layout == "s-transposed":
        return weight.transpose(2, 3).contiguous(), lambda b: b.transpose(2, 3)
    return weight, lambda b: b


def check_patch_embed(buffers: dict, views: dict, seed=1):
    """kernels.patch_embed(backend="triton") against the reference: tokens and every gradient."""

    def run(function, dtype=None):
        leaves = {
            name: None if b is None else b.detach().to(dtype or b.dtype).clone().requires_grad_()
            for name, b in buffers.items()
        }
        arguments = {name: None if t is None else views.get(name, lambda x: x)(t) for name, t in leaves.items()}
        return function(**arguments), leaves

    tokens, ours = run(lambda **a: kernels.patch_embed(**a, backend="triton"))
    tokens64, exact = run(patch_embed_reference, f64)
    tokens_low, low = run(patch_embed_reference)
    upstream = randn(*tokens.shape, dtype=f64, seed=seed)
    for output in (tokens, tokens64, tokens_low):
        output.backward(upstream.to(output.dtype))
    assert_close_to_reference(tokens, tokens64, tokens_low, name="tokens")
    for name, leaf in ours.items():
        if leaf is not None:
            assert_close_to_reference(leaf.grad, exact[name].grad, low[name].grad, name=f"grad {name}")
    return tokens


@pytest.mark.interpreter
@examples(14)
@given(
    dtype=st.sampled_from(DTYPES),
    batch=st.integers(0, 2),
    channels=st.sampled_from([1, 2, 3, 4]),
    patch=st.sampled_from([1, 2, 5, 8, 16] if ON_GPU else [1, 2, 5, 8]),  # P = 14, 16 in the interpreter: tests/patch_embed/test_triton.py
    patches_down=st.integers(0, 3),
    patches_across=st.integers(1, 3),
    dim=st.sampled_from([1, 16, 40, 80]),
    bias=st.booleans(),
    cls=st.booleans(),
    pos=st.booleans(),
    image_layout=st.sampled_from(IMAGE_LAYOUTS),
    weight_layout=st.sampled_from(WEIGHT_LAYOUTS),
    seed=st.integers(0, 2**16),
)
def test_property_patch_embed_matches_reference(
    dtype, batch, channels, patch, patches_down, patches_across, dim, bias, cls, pos, image_layout, weight_layout, seed
):
    """Through kernels.patch_embed(backend="triton"): empty batches and images without a patch,
    P = 1, D = 1, any channel count, non-square grids, any image and weight strides."""
    height, width = patch * patches_down, patch * patches_across
    n_tokens = patches_down * patches_across + cls
    images = randn(batch, channels, height, width, dtype=dtype, seed=seed)
    weight = randn(dim, channels, patch, patch, dtype=dtype, seed=seed + 1, scale=(channels * patch * patch) ** -0.5)
    buffers, views = {}, {}
    buffers["images"], views["images"] = image_buffer(images, image_layout)
    buffers["weight"], views["weight"] = weight_buffer(weight, weight_layout)
    buffers["bias"] = randn(dim, dtype=dtype, seed=seed + 2, scale=0.5) if bias else None
    buffers["cls_token"] = randn(1, 1, dim, dtype=dtype, seed=seed + 3) if cls else None
    buffers["pos_embed"] = randn(1, n_tokens, dim, dtype=dtype, seed=seed + 4, scale=0.5) if pos else None
    tokens = check_patch_embed(buffers, views, seed=seed)
    assert tokens.shape == (batch, n_tokens, dim)
