"""The Triton patch projection against the float64 references: tokens and every gradient.

On a machine without a GPU the kernels run in Triton's interpreter (tests/conftest.py) at small
shapes; on a GPU the same tests compile them and add the full ViT sizes.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from kernels.reference import patch_embed_reference
from kernels.triton.patch_embed import _grad_weight, patch_embed_triton
from tests.equivalence import DEVICE, assert_close_to_reference

# The module, not the function `kernels.patch_embed` that the package binds over its name.
patch_embed_module = importlib.import_module("kernels.triton.patch_embed")

NAMES = ("images", "weight", "bias", "cls_token", "pos_embed")
f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
needs_gpu = pytest.mark.gpu(reason="full ViT sizes: minutes in the interpreter, compiled on a GPU")
# Every test here runs the kernels (in the interpreter on a CPU) but the few that check arguments.
pytestmark = pytest.mark.interpreter


def make_inputs(
    batch, channels, height, width, patch, dim, dtype,
    *, bias=True, cls=True, pos=True, channels_last=False, seed=0,
) -> dict:
    """Inputs of patch_embed in ``dtype`` on DEVICE, O(1) tokens; the absent ones None."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(DEVICE, dtype)

    n_tokens = (height // patch) * (width // patch) + int(cls)  # cls: a bool, or the number of prefix tokens
    images = randn(batch, channels, height, width)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return {
        "images": images,
        "weight": randn(dim, channels, patch, patch, scale=(channels * patch * patch) ** -0.5),
        "bias": randn(dim, scale=0.5) if bias else None,
        "cls_token": randn(1, int(cls), dim) if cls else None,
        "pos_embed": randn(1, n_tokens, dim, scale=0.5) if pos else None,
    }


def leaves(inputs: dict, dtype=None) -> dict:
    """Fresh leaf copies that require grad, in ``dtype`` (default: their own), strides kept."""
    return {
        name: None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_()
        for name, t in inputs.items()
    }


def check_against_reference(inputs: dict, run=patch_embed_triton, reference=patch_embed_reference, seed=1):
    """``run`` vs ``reference`` in float64 and in the inputs' dtype: tokens, then each input's grad
    for one upstream gradient. Returns the tokens and our leaves (their .grad filled)."""
    ours = leaves(inputs)
    tokens = run(**ours)
    generator = torch.Generator().manual_seed(seed)
    upstream = torch.randn(tokens.shape, generator=generator, dtype=torch.float64).to(DEVICE, tokens.dtype)
    tokens.backward(upstream)

    exact, low = leaves(inputs, torch.float64), leaves(inputs)
    tokens64, tokens_low = reference(**exact), reference(**low)
    tokens64.backward(upstream.double())
    tokens_low.backward(upstream)

    assert_close_to_reference(tokens, tokens64, tokens_low, name="tokens")
    for name in NAMES:
        if inputs[name] is not None:
            assert_close_to_reference(ours[name].grad, exact[name].grad, low[name].grad, name=f"grad {name}")
    return tokens, ours


# A covering set, not the cross product: each dtype, P in {8, 14, 16, 32}, C in {1, 3, 4},
# square/wide/tall images, every combination of bias/cls/pos seen, NCHW and channels_last,
# one D wider than the interpreter's 64-column tile, and a batch whose images start mid-tile.
# (batch, channels, height, width, patch, dim, dtype, bias, cls, pos, channels_last)
CASES = [
    pytest.param(2, 3, 32, 48, 16, 48, f32, True, True, True, False, id="f32-C3-P16-wide-all"),
    pytest.param(2, 3, 28, 42, 14, 32, f16, True, True, True, True, id="f16-C3-P14-channels_last-all"),
    pytest.param(3, 1, 16, 24, 8, 48, bf16, True, False, False, False, id="bf16-C1-P8-bias-only"),
    pytest.param(1, 4, 32, 64, 32, 32, f32, False, True, False, False, id="f32-C4-P32-cls-only"),
    pytest.param(2, 4, 24, 16, 8, 80, f16, True, False, True, True, id="f16-C4-P8-D80-pos-no-cls-channels_last"),
    pytest.param(2, 3, 48, 32, 16, 32, bf16, False, True, True, True, id="bf16-C3-P16-tall-channels_last"),
    pytest.param(3, 1, 14, 14, 14, 32, f32, False, False, False, False, id="f32-C1-P14-one-patch-bare"),
    pytest.param(3, 3, 40, 56, 8, 32, f16, True, True, True, False, id="f16-C3-P8-N35-rows-across-tiles"),
    # Several prefix tokens: a class token and 4 registers (DINOv2-reg), class + distillation (DeiT).
    pytest.param(3, 3, 40, 56, 8, 32, bf16, True, 5, True, False, id="bf16-C3-P8-5-prefix-tokens"),
    pytest.param(2, 3, 32, 48, 16, 48, f32, False, 2, True, True, id="f32-C3-P16-2-prefix-tokens-channels_last"),
    pytest.param(2, 3, 32, 32, 16, 48, f16, True, 3, False, False, id="f16-C3-P16-3-prefix-tokens-no-pos"),
    pytest.param(8, 3, 224, 224, 16, 768, f32, True, True, True, False, id="vit-b16-f32", marks=needs_gpu),
    pytest.param(8, 3, 224, 224, 16, 768, f16, True, True, True, True, id="vit-b16-f16-channels_last", marks=needs_gpu),
    pytest.param(8, 3, 224, 224, 16, 768, bf16, True, True, True, False, id="vit-b16-bf16", marks=needs_gpu),
    pytest.param(2, 3, 224, 224, 14, 1280, bf16, True, True, True, False, id="vit-h14-bf16", marks=needs_gpu),
    pytest.param(2, 4, 256, 384, 32, 1024, f16, False, False, True, False, id="P32-1024-wide-f16", marks=needs_gpu),
]


@pytest.mark.parametrize("batch, channels, height, width, patch, dim, dtype, bias, cls, pos, channels_last", CASES)
def test_tokens_and_gradients_match_reference(batch, channels, height, width, patch, dim, dtype, bias, cls, pos, channels_last):
    inputs = make_inputs(
        batch, channels, height, width, patch, dim, dtype, bias=bias, cls=cls, pos=pos, channels_last=channels_last
    )
    tokens, ours = check_against_reference(inputs)
    assert tokens.shape == (batch, (height // patch) * (width // patch) + int(cls), dim)
    if channels_last:  # grad_images comes back in the images' own layout
        assert ours["images"].grad.is_contiguous(memory_format=torch.channels_last)


def conv2d_reference(images, weight, bias=None, cls_token=None, pos_embed=None):
    """The same tokens the PyTorch way: a stride-P Conv2d, flattened, transposed, cat, add."""
    patch = weight.shape[-1]
    tokens = F.conv2d(images, weight, bias, stride=patch)  # (B, D, H/P, W/P)
    tokens = tokens.flatten(2).transpose(1, 2)  # (B, N, D), patches in (h w) order
    if cls_token is not None:
        tokens = torch.cat([cls_token.expand(images.shape[0], -1, -1), tokens], dim=1)  # (B, 1 + N, D)
    if pos_embed is not None:
        tokens = tokens + pos_embed
    return tokens


@pytest.mark.parametrize("dtype", [f32, bf16])
def test_matches_conv2d(dtype):
    inputs = make_inputs(2, 3, 32, 48, 16, 32, dtype)
    check_against_reference(inputs, reference=conv2d_reference)


def linear_form_reference(images, weight, bias=None, cls_token=None, pos_embed=None):
    """vit's Linear-form embedding: patches flattened in einops (s1 s2 c) order, @ weight (D, P*P*C)^T."""
    channels = images.shape[1]
    patch = round((weight.shape[1] // channels) ** 0.5)
    patches = rearrange(images, "b c (h s1) (w s2) -> b (h w) (s1 s2 c)", s1=patch, s2=patch)
    tokens = F.linear(patches, weight, bias)  # (B, N, D)
    if cls_token is not None:
        tokens = torch.cat([cls_token.expand(images.shape[0], -1, -1), tokens], dim=1)
    if pos_embed is not None:
        tokens = tokens + pos_embed
    return tokens


def linear_weight_as_conv(weight, patch):
    """The Linear weight (D, P*P*C), columns in (s1 s2 c) order, as a Conv2d-layout view (D, C, P, P)."""
    dim, columns = weight.shape
    return weight.view(dim, patch, patch, columns // (patch * patch)).permute(0, 3, 1, 2)


def run_with_linear_weight(images, weight, bias=None, cls_token=None, pos_embed=None):
    return patch_embed_triton(images, linear_weight_as_conv(weight, 8), bias, cls_token, pos_embed)


@pytest.mark.parametrize("dtype, channels_last", [(f16, False), (f32, True)])
def test_linear_weight_view_tokens_and_gradients(dtype, channels_last):
    inputs = make_inputs(2, 3, 16, 24, 8, 32, dtype, channels_last=channels_last)
    linear_weight = rearrange(inputs["weight"], "d c s1 s2 -> d (s1 s2 c)").contiguous()  # (D, P*P*C)
    tokens, ours = check_against_reference(
        {**inputs, "weight": linear_weight}, run=run_with_linear_weight, reference=linear_form_reference
    )
    # The same tokens as the Conv2d weight it was made from, and its gradient lands on the Linear
    # weight itself, in the Linear layout.
    assert_close_to_reference(
        tokens, patch_embed_reference(**leaves(inputs, torch.float64)), patch_embed_reference(**inputs)
    )
    assert ours["weight"].grad.shape == linear_weight.shape and ours["weight"].grad.is_contiguous()


def test_reads_images_and_weight_view_in_place(monkeypatch):
    """No copy of the image nor of the Linear weight's permuted view: the kernel gets their storage."""
    inputs = make_inputs(2, 3, 16, 24, 8, 32, f16, channels_last=True)
    linear_weight = rearrange(inputs["weight"], "d c s1 s2 -> d (s1 s2 c)").contiguous()
    weight_view = linear_weight_as_conv(linear_weight, 8)
    launches = []

    class RecordLaunch:  # stands in for wrap_triton(kernel)[grid](*args): records, runs nothing
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(args)

    monkeypatch.setattr(torch.library, "wrap_triton", RecordLaunch)
    patch_embed_triton(inputs["images"], weight_view, *(inputs[n] for n in NAMES[2:]))
    (images_arg, weight_arg, *_), = launches
    assert images_arg is inputs["images"]
    assert weight_arg.data_ptr() == linear_weight.data_ptr() and weight_arg.stride() == weight_view.stride()


def run_on_crop(images, weight, bias=None, cls_token=None, pos_embed=None):
    """The kernel fed a crop of a bigger canvas: a view with a storage offset and wider rows."""
    batch, channels, height, width = images.shape
    canvas = images.new_zeros(batch, channels + 1, height + 16, width + 13)
    canvas[:, 1:, 5 : 5 + height, 7 : 7 + width] = images
    crop = canvas[:, 1:, 5 : 5 + height, 7 : 7 + width]  # (B, C, H, W), not contiguous
    assert not crop.is_contiguous()
    return patch_embed_triton(crop, weight, bias, cls_token, pos_embed)


def test_strided_image_crop():
    check_against_reference(make_inputs(2, 4, 24, 32, 8, 32, f32), run=run_on_crop)


def transposed_order_reference(images, weight, bias=None, cls_token=None, pos_embed=None):
    """A wrong kernel's tokens: patches in (w h) order instead of (h w), each patch still right."""
    return patch_embed_reference(images.transpose(2, 3), weight.transpose(2, 3), bias, cls_token, pos_embed)


def channel_order_mixup_reference(images, weight, bias=None, cls_token=None, pos_embed=None):
    """A wrong kernel's tokens: the (s1 s2 c) Linear weight read as if its columns were (c s1 s2)."""
    linear_weight = rearrange(weight, "d c s1 s2 -> d (s1 s2 c)")
    return patch_embed_reference(images, linear_weight.reshape(weight.shape), bias, cls_token, pos_embed)


@pytest.mark.parametrize("wrong", [transposed_order_reference, channel_order_mixup_reference])
def test_rule_fails_a_wrong_patch_order(wrong):
    inputs = make_inputs(2, 3, 16, 24, 8, 32, f16)
    tokens64 = patch_embed_reference(**leaves(inputs, torch.float64))
    tokens_low = patch_embed_reference(**inputs)
    assert_close_to_reference(patch_embed_triton(**inputs), tokens64, tokens_low)
    with pytest.raises(AssertionError, match="max error"):
        assert_close_to_reference(wrong(**inputs), tokens64, tokens_low)


def test_dispatch_triton_end_to_end():
    inputs = make_inputs(2, 3, 16, 16, 8, 32, bf16, channels_last=True)

    def run(images, weight, bias, cls_token, pos_embed):
        return kernels.patch_embed(images, weight, bias, cls_token, pos_embed, backend="triton")

    tokens, _ = check_against_reference(inputs, run=run)
    assert torch.equal(tokens, patch_embed_triton(**inputs))


def test_only_the_gradients_asked_for(monkeypatch):
    """Frozen images (the usual case) never launch the grad_images GEMM; a frozen weight, never grad_weight."""
    inputs = make_inputs(2, 3, 16, 16, 8, 32, f32)

    def must_not_run(*args):
        raise AssertionError("computed a gradient nobody asked for")

    ours = leaves(inputs)
    ours["images"].requires_grad_(False)
    monkeypatch.setattr(patch_embed_module, "patch_embed_grad_images", must_not_run)
    patch_embed_triton(**ours).sum().backward()
    assert ours["images"].grad is None and ours["weight"].grad is not None
    monkeypatch.undo()

    ours = leaves(inputs)
    for name in NAMES[1:]:
        ours[name].requires_grad_(False)
    monkeypatch.setattr(patch_embed_module, "patch_embed_grad_weight", must_not_run)
    patch_embed_triton(**ours).sum().backward()
    assert ours["images"].grad is not None
    assert all(ours[name].grad is None for name in NAMES[1:])


def test_grad_weight_split_rows_add_up():
    """The row-split grad_weight (a GPU heuristic picks the split) equals the unsplit one."""
    inputs = make_inputs(600, 1, 8, 8, 8, 32, f32, bias=False, cls=False, pos=False)  # M = 600 rows
    upstream = torch.randn(600, 2, 32, generator=torch.Generator().manual_seed(2), dtype=f32).to(DEVICE)
    patch_grads = upstream[:, 1:]  # (B, N, D) view past the class-token row, as the backward passes it
    whole = _grad_weight(patch_grads, inputs["images"], inputs["weight"], splits=1)
    split = _grad_weight(patch_grads, inputs["images"], inputs["weight"], splits=3)  # 256 + 256 + 88 rows
    exact = torch.einsum("bnd, bcij -> dcij", patch_grads.double(), inputs["images"].double())
    low = torch.einsum("bnd, bcij -> dcij", patch_grads, inputs["images"])
    assert_close_to_reference(whole, exact, low, name="grad weight, 1 split")
    assert_close_to_reference(split, exact, low, name="grad weight, 3 splits")


def test_empty_batch():
    inputs = leaves(make_inputs(0, 3, 16, 16, 8, 32, f32))
    tokens = patch_embed_triton(**inputs)
    assert tokens.shape == (0, 5, 32)
    tokens.sum().backward()
    assert torch.equal(inputs["weight"].grad, torch.zeros_like(inputs["weight"]))


@pytest.mark.slow
@settings(max_examples=10, deadline=None)
@given(
    dtype=st.sampled_from([f16, bf16, f32]),
    channels=st.sampled_from([1, 3, 4]),
    patch=st.sampled_from([8, 14, 16]),
    patches_down=st.integers(1, 3),
    patches_across=st.integers(1, 3),
    batch=st.integers(1, 2),
    dim=st.sampled_from([16, 32, 48]),
    bias=st.booleans(),
    cls=st.booleans(),
    pos=st.booleans(),
    channels_last=st.booleans(),
)
def test_property_matches_reference(
    dtype, channels, patch, patches_down, patches_across, batch, dim, bias, cls, pos, channels_last
):
    inputs = make_inputs(
        batch, channels, patch * patches_down, patch * patches_across, patch, dim, dtype,
        bias=bias, cls=cls, pos=pos, channels_last=channels_last,
    )
    check_against_reference(inputs)


@pytest.mark.gpu(
    reason="torch.compile of a triton_op needs CUDA: under the CPU interpreter its fake tensors have no data pointer",
)
def test_compiles_fullgraph_forward_and_backward():
    inputs = make_inputs(4, 3, 64, 96, 16, 192, bf16, channels_last=True)
    check_against_reference(inputs, run=torch.compile(patch_embed_triton, fullgraph=True))

    def embed_with_linear_weight(images, weight, bias, cls_token, pos_embed):
        return patch_embed_triton(images, linear_weight_as_conv(weight, 16), bias, cls_token, pos_embed)

    linear_weight = rearrange(inputs["weight"], "d c s1 s2 -> d (s1 s2 c)").contiguous()
    check_against_reference(
        {**inputs, "weight": linear_weight},
        run=torch.compile(embed_with_linear_weight, fullgraph=True),
        reference=linear_form_reference,
    )


@pytest.mark.gpu(reason="opcheck's fake-tensor checks need CUDA: the CPU interpreter reads data pointers")
def test_custom_op_passes_opcheck():
    inputs = leaves(make_inputs(2, 3, 32, 48, 16, 64, f16))
    torch.library.opcheck(torch.ops.vitriton.patch_embed_forward.default, tuple(inputs[n] for n in NAMES))
    no_extras = (inputs["images"], inputs["weight"], None, None, None)
    torch.library.opcheck(torch.ops.vitriton.patch_embed_forward.default, no_extras)
