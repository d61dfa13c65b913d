"""vit/model.py: shapes, the tutorial's bugs, the flag, parameter counts against timm."""

import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

import kernels
import vit
from tests.equivalence import DEVICE, assert_close_to_reference
from vit.model import PRESETS, MultiHeadAttention, PatchEmbedding, ViT, ViTConfig

SMALL = {"image_size": 32, "patch_size": 16, "embed_dim": 64, "depth": 2, "num_heads": 2, "num_classes": 10}


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_runs_at_reduced_depth(name):
    torch.manual_seed(0)
    config = PRESETS[name]
    model = vit.create_model(name, fused=False, depth=1).eval()
    images = torch.rand(2, 3, config.image_size, config.image_size)
    with torch.no_grad():
        features = model.forward_features(images)
        logits = model.forward_head(features)
    assert features.shape == (2, 1 + config.num_patches, config.embed_dim)
    assert logits.shape == (2, 1000)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_counts_equal_timm(name):
    timm = pytest.importorskip("timm")
    config = PRESETS[name]
    with torch.device("meta"):
        ours = vit.create_model(name, fused=False)
        if name == "vit_tutorial_patch16_224":  # not in timm: the same net with 8 heads
            theirs = timm.create_model("vit_base_patch16_224", num_heads=8, pretrained=False, num_classes=1000)
        else:
            theirs = timm.create_model(name, pretrained=False, num_classes=1000)
    assert vit.count_parameters(ours) == vit.count_parameters(theirs)
    assert ours.config.num_heads == config.num_heads


def test_vit_base_patch16_224_has_timm_parameter_count():
    with torch.device("meta"):
        assert vit.count_parameters(vit.create_model("vit_base_patch16_224")) == 86_567_656


def test_tutorial_preset_has_eight_heads_of_96():
    config = PRESETS["vit_tutorial_patch16_224"]
    assert (config.embed_dim, config.num_heads, config.head_dim) == (768, 8, 96)


CONFIG_ERRORS = [
    ({"embed_dim": 100, "num_heads": 3}, ValueError, "embed_dim"),
    ({"image_size": 100}, ValueError, "image_size"),
    ({"depth": 0}, ValueError, "depth"),
    ({"depth": 2.0}, TypeError, "depth"),
    ({"patch_size": True}, TypeError, "patch_size"),
    ({"pool": "max"}, ValueError, "pool"),
    ({"pool": None}, TypeError, "pool"),
    ({"class_token": False}, ValueError, "pool='token' needs class_token"),
    ({"dropout": 1.0}, ValueError, "dropout"),
    ({"dropout": float("nan")}, ValueError, "dropout"),
    ({"dropout": "0.1"}, TypeError, "dropout"),
    ({"attn_dropout": float("nan")}, ValueError, "attn_dropout"),
    ({"attn_dropout": -0.1}, ValueError, "attn_dropout"),
    ({"attn_dropout": None}, TypeError, "attn_dropout"),
    ({"patch_embedding": "fft"}, ValueError, "patch_embedding"),
    ({"patch_embedding": 1}, TypeError, "patch_embedding"),
    ({"num_classes": -1}, ValueError, "num_classes"),
    ({"num_classes": True}, TypeError, "num_classes"),
    ({"num_classes": 10.0}, TypeError, "num_classes"),
    ({"mlp_ratio": float("nan")}, ValueError, "mlp_ratio"),
    ({"mlp_ratio": float("inf")}, ValueError, "mlp_ratio"),
    ({"mlp_ratio": 0.0}, ValueError, "mlp_ratio"),
    ({"mlp_ratio": 0.001}, ValueError, "mlp_ratio"),  # 768 * 0.001 is a hidden size of 0
    ({"mlp_ratio": "4"}, TypeError, "mlp_ratio"),
    ({"mlp_ratio": True}, TypeError, "mlp_ratio"),
    ({"layer_norm_eps": 0.0}, ValueError, "layer_norm_eps"),
    ({"layer_norm_eps": -1e-6}, ValueError, "layer_norm_eps"),
    ({"layer_norm_eps": float("nan")}, ValueError, "layer_norm_eps"),
    ({"layer_norm_eps": float("inf")}, ValueError, "layer_norm_eps"),
    ({"layer_norm_eps": "1e-6"}, TypeError, "layer_norm_eps"),
    ({"qkv_bias": 1}, TypeError, "qkv_bias"),
    ({"qkv_bias": "no"}, TypeError, "qkv_bias"),
    ({"class_token": 1}, TypeError, "class_token"),
]


@pytest.mark.parametrize(
    "overrides, error, field",
    CONFIG_ERRORS,
    ids=[", ".join(f"{key}={value!r}" for key, value in overrides.items()) for overrides, _, _ in CONFIG_ERRORS],
)
def test_config_errors_name_the_field(overrides, error, field):
    with pytest.raises(error) as raised:
        ViTConfig(**overrides)
    message = str(raised.value)
    assert message.startswith(f"ViTConfig.{field}") and "\n" not in message, message
    if field in overrides:
        assert repr(overrides[field]) in message, message  # what came


def test_config_takes_numbers_of_any_real_type():
    config = ViTConfig(mlp_ratio=4, dropout=0, attn_dropout=np.float32(0.1), layer_norm_eps=np.float64(1e-5))
    assert ViT(config, fused=False, **SMALL).blocks[0].mlp.fc1.out_features == 4 * 64


def test_vit_config_must_be_a_vit_config():
    with pytest.raises(TypeError, match=r"^ViT: expected config to be a ViTConfig, got dict$"):
        ViT({"depth": 2})


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'vit_gigantic'"):
        vit.create_model("vit_gigantic")


def test_linear_and_conv_patch_embeddings_are_equal():
    torch.manual_seed(0)
    conv = PatchEmbedding(32, 16, 3, 24, form="conv", fused=False)
    linear = PatchEmbedding(32, 16, 3, 24, form="linear", fused=False)
    torch.nn.init.normal_(conv.pos_embed)
    torch.nn.init.normal_(conv.cls_token)
    # The Linear's columns are the patch flattened in (s1 s2 c) order; the Conv2d's weight is (E, C, s1, s2).
    with torch.no_grad():
        linear.proj.weight.copy_(rearrange(conv.proj.weight, "e c s1 s2 -> e (s1 s2 c)"))
        linear.proj.bias.copy_(conv.proj.bias)
        linear.cls_token.copy_(conv.cls_token)
        linear.pos_embed.copy_(conv.pos_embed)
    images = torch.rand(2, 3, 32, 48)
    torch.testing.assert_close(linear(images), conv(images), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear.conv_weight(), conv.proj.weight)
    # A wrong column order, (c s1 s2), must not pass.
    with torch.no_grad():
        linear.proj.weight.copy_(rearrange(conv.proj.weight, "e c s1 s2 -> e (c s1 s2)"))
    assert not torch.allclose(linear(images), conv(images), atol=1e-3)


def test_tutorial_bug_d_position_embedding_out_of_place_and_broadcast():
    torch.manual_seed(0)
    embedding = PatchEmbedding(32, 16, 3, 24, fused=False)
    torch.nn.init.normal_(embedding.pos_embed)
    seen = {}
    embedding.flatten.register_forward_hook(lambda module, inputs, output: seen.update(projected=output))
    images = torch.rand(3, 3, 32, 32)
    tokens = embedding(images)
    # The projection's output is left as it was: `x += positions` would have bumped its version.
    assert seen["projected"]._version == 0
    without_positions = torch.cat([embedding.cls_token.expand(3, -1, -1), seen["projected"]], dim=1)
    for b in range(3):  # the same position embedding added to every image of the batch
        torch.testing.assert_close(tokens[b] - without_positions[b], embedding.pos_embed[0])


def test_gradients_reach_class_token_and_position_embedding():
    torch.manual_seed(0)
    model = ViT(fused=False, **SMALL)
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    for name in ("patch_embed.cls_token", "patch_embed.pos_embed", "patch_embed.proj.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_other_image_size_resamples_position_embedding():
    torch.manual_seed(0)
    model = ViT(fused=False, **SMALL).eval()
    with torch.no_grad():
        features = model.forward_features(torch.rand(1, 3, 48, 64))
    assert features.shape == (1, 1 + 3 * 4, 64)
    resized = vit.resample_pos_embed(model.patch_embed.pos_embed, (3, 4), num_prefix_tokens=1)
    assert torch.equal(resized[:, 0], model.patch_embed.pos_embed[:, 0])  # the class token's, untouched
    grid = rearrange(model.patch_embed.pos_embed[:, 1:], "() (h w) e -> () e h w", h=2)
    expected = F.interpolate(grid, size=(3, 4), mode="bicubic", align_corners=False)
    torch.testing.assert_close(resized[:, 1:], rearrange(expected, "() e h w -> () (h w) e"))
    with pytest.raises(ValueError, match="multiples of the patch size 16, got 40x64"):
        model(torch.rand(1, 3, 40, 64))



@pytest.mark.parametrize("fused", [False, True])
def test_an_image_without_rows_or_columns_is_one_line_naming_the_minimum(fused):
    """Before: a RuntimeError from inside F.interpolate (the position-embedding resampling),
    naming neither the image nor the size expected."""
    model = ViT(fused=fused, **SMALL).eval()
    for shape, got in (((2, 3, 0, 32), "0x32"), ((2, 3, 32, 0), "32x0"), ((1, 3, 0, 0), "0x0")):
        with pytest.raises(ValueError, match=rf"^PatchEmbedding: expected images of at least one patch, 16x16 pixels, got {got}$"):
            model(torch.rand(*shape))
    with pytest.raises(ValueError, match=r"^ViT: expected image 1 to be at least one patch, 16x16 pixels, got \(0, 16\)$"):
        model([torch.rand(3, 32, 32), torch.rand(3, 0, 16)])
    with pytest.raises(ValueError, match=r"^ViT: expected image 0 to be at least one patch, 16x16 pixels, got \(16, 0\)$"):
        model([torch.rand(1, 3, 16, 0)])
    with pytest.raises(ValueError, match=r"^resample_pos_embed: expected a grid of at least 1x1 patches, got 0x3$"):
        vit.resample_pos_embed(model.patch_embed.pos_embed, (0, 3), num_prefix_tokens=1)

def test_mean_pooling_without_class_token():
    model = ViT(fused=False, class_token=False, pool="mean", **SMALL).eval()
    assert model.patch_embed.cls_token is None
    with torch.no_grad():
        features = model.forward_features(torch.rand(2, 3, 32, 32))
        torch.testing.assert_close(model.forward_head(features), model.head(features.mean(dim=1)))
    assert features.shape == (2, 4, 64)


def test_attention_mask_reaches_the_kernel():
    torch.manual_seed(0)
    attention = MultiHeadAttention(32, 4, fused=False).eval()
    x = torch.randn(2, 5, 32)
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    mask[..., 3:] = False  # keys 3 and 4 are padding
    out = attention(x, mask)
    # Padding keys take no part: changing them changes nothing.
    x_changed = x.clone()
    x_changed[:, 3:] = torch.randn(2, 2, 32)
    torch.testing.assert_close(attention(x_changed, mask)[:, :3], out[:, :3])
    assert not torch.allclose(attention(x_changed)[:, :3], attention(x)[:, :3])


def test_fused_flag_is_a_module_attribute_defaulting_to_the_global_backend():
    with kernels.use_backend("einsum"):
        assert ViT(**SMALL).fused is False
        assert ViT(fused=True, **SMALL).blocks[0].attn.fused is True
    with kernels.use_backend("auto"):
        model = ViT(**SMALL)
        assert model.fused and model.patch_embed.fused and all(block.attn.fused for block in model.blocks)


@pytest.mark.parametrize("fused", [pytest.param(True, marks=pytest.mark.interpreter), False])
def test_flag_selects_the_path(monkeypatch, fused):
    """fused=True: kernels.attention and kernels.patch_embed with backend=None, so the thread's
    backend decides (Triton here); fused=False: kernels.attention(backend="einsum") and the
    patch embedding's own nn modules, whatever the thread's backend."""
    backends = {"attention": [], "patch_embed": []}
    launches = []
    attention_module = importlib.import_module("kernels.triton.attention_ops")
    triton_attention = attention_module.attention_triton

    def spy(name, function):
        def spied(*args, **kwargs):
            backends[name].append(kwargs.get("backend"))
            return function(*args, **kwargs)

        return spied

    def launch(*args, **kwargs):
        launches.append("attention")
        return triton_attention(*args, **kwargs)

    monkeypatch.setattr(kernels, "attention", spy("attention", kernels.attention))
    monkeypatch.setattr(kernels, "patch_embed", spy("patch_embed", kernels.patch_embed))
    monkeypatch.setattr(attention_module, "attention_triton", launch)
    model = ViT(fused=fused, **SMALL).to(DEVICE).eval()
    with kernels.use_backend("triton"), torch.no_grad():
        model(torch.rand(1, 3, 32, 32, device=DEVICE))
    if fused:
        assert backends == {"attention": [None, None], "patch_embed": [None]}
        assert launches == ["attention", "attention"]
    else:
        assert backends == {"attention": ["einsum", "einsum"], "patch_embed": []}
        assert launches == []


@pytest.mark.interpreter
@pytest.mark.parametrize("form", ["conv", "linear"])
def test_fused_model_equals_reference_forward_and_backward(form):
    torch.manual_seed(0)
    reference = ViT(fused=False, patch_embedding=form, **SMALL).double().to(DEVICE)
    low = ViT(fused=False, patch_embedding=form, **SMALL).to(DEVICE)
    fused = ViT(fused=True, patch_embedding=form, **SMALL).to(DEVICE)
    low.load_state_dict(reference.state_dict())
    fused.load_state_dict(reference.state_dict())
    images = torch.rand(2, 3, 32, 32, device=DEVICE)
    with kernels.use_backend("triton"):
        outputs = [model(images.to(next(model.parameters()).dtype)) for model in (fused, reference, low)]
    upstream = torch.randn_like(outputs[1])
    for output in outputs:
        output.backward(upstream.to(output.dtype))
    assert_close_to_reference(outputs[0], outputs[1], outputs[2], name="logits")
    for (name, p_fused), p_ref, p_low in zip(fused.named_parameters(), reference.parameters(), low.parameters()):
        assert_close_to_reference(p_fused.grad, p_ref.grad, p_low.grad, name=f"grad {name}")


@pytest.mark.interpreter
def test_fused_patch_embedding_under_autocast_projects_in_low_precision(monkeypatch):
    # As Conv2d + cat + add under autocast: the projection in bf16, the tokens in float32 (the
    # class token and position embedding are float32), so the residual stream stays float32.
    torch.manual_seed(0)
    fused = PatchEmbedding(32, 16, 3, 24, fused=True).to(DEVICE)
    plain = PatchEmbedding(32, 16, 3, 24, fused=False).to(DEVICE)
    plain.load_state_dict(fused.state_dict())
    patch_embed_module = importlib.import_module("kernels.triton.patch_embed")
    seen = []
    launch = patch_embed_module.patch_embed_triton

    def spy(images, weight, *args):
        seen.append((images.dtype, weight.dtype))
        return launch(images, weight, *args)

    monkeypatch.setattr(patch_embed_module, "patch_embed_triton", spy)
    images = torch.rand(2, 3, 32, 32, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16), kernels.use_backend("triton"):
        tokens, expected = fused(images), plain(images)
    assert seen == [(torch.bfloat16, torch.bfloat16)]
    assert tokens.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(tokens, expected, rtol=0, atol=2e-2)


# PyTorch 2.10+ marks torch.jit.script and torch.jit.load deprecated; they still work.
jit_deprecated = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning")


@jit_deprecated
@pytest.mark.parametrize(
    "overrides",
    [{}, {"patch_embedding": "linear"}, {"class_token": False, "pool": "mean", "num_classes": 0}],
    ids=["conv, token", "linear", "mean pool, no head"],
)
def test_torch_jit_script_of_the_reference_path_equals_eager(tmp_path, overrides):
    # Before: "Unknown type annotation: 'Final[bool]' at" and no location, then einops
    # functions, the dataclass config and kernels.attention, none of which TorchScript compiles.
    torch.manual_seed(0)
    model = ViT(fused=False, **{**SMALL, **overrides}).eval()
    images = torch.rand(2, 3, 32, 32)
    tokens = model.patch_embed.num_prefix_tokens + 4  # a 2 x 2 grid of patches
    mask = torch.rand(2, 1, tokens, tokens) > 0.3
    mask[:, :, 0] = False  # a query with every key masked: zeros, not NaN, on both paths
    bias = torch.randn(2, 1, tokens, tokens)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(images), model(images))
        torch.testing.assert_close(scripted(images, mask), model(images, mask))
        torch.testing.assert_close(scripted(images, bias), model(images, bias))
        # Another image size: the position embeddings are resampled in TorchScript too.
        other_size = torch.rand(1, 3, 48, 64)
        torch.testing.assert_close(scripted(other_size), model(other_size))
    path = tmp_path / "vit.pt"
    scripted.save(str(path))  # no Python calls left in the graph
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(path))(images), model(images))


@jit_deprecated
def test_torch_jit_script_of_a_preset_equals_eager():
    torch.manual_seed(0)
    model = vit.create_model("vit_tiny_patch16_224", fused=False, depth=2).eval()
    images = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(model)(images), model(images))


@jit_deprecated
@pytest.mark.parametrize(
    "build, name",
    [
        (lambda: ViT(fused=True, **SMALL), "ViT"),
        (lambda: MultiHeadAttention(32, 4, fused=True), "MultiHeadAttention"),
        (lambda: PatchEmbedding(32, 16, 3, 24, fused=True), "PatchEmbedding"),
    ],
    ids=["ViT", "MultiHeadAttention", "PatchEmbedding"],
)
def test_torch_jit_script_of_a_fused_module_is_one_clear_line(build, name):
    with pytest.raises(RuntimeError) as raised:
        torch.jit.script(build())
    assert str(raised.value) == (
        f"{name}(fused=True): torch.jit.script supports fused=False models; "
        "build with fused=False or use torch.compile"
    )
