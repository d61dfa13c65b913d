"""vit/timm_weights.py: timm's VisionTransformer weights in and out of vit.ViT, exactly or not at all."""

from __future__ import annotations

import pytest
import torch

import vit
from vit.timm_weights import (
    config_from_timm,
    from_timm,
    from_timm_state_dict,
    load_timm_weights,
    to_timm_state_dict,
)

timm = pytest.importorskip("timm")


def _timm_model(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    options = {"pretrained": False, "depth": 2, **kwargs}
    model = timm.create_model("vit_tiny_patch16_224", **options).double().eval()
    # timm starts the class token near zero (std 1e-6) and the head at its own init: give every
    # tensor a visible value, so that a misplaced one changes the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in ("cls_token", "pos_embed") or name.endswith("bias"):
                p.normal_(std=0.02)
    return model


@pytest.mark.parametrize("form", ["conv", "linear"])
def test_converted_weights_give_timm_logits(form):
    theirs = _timm_model()
    ours = from_timm(theirs, form=form, fused=False)
    assert ours.patch_embed.pos_embed.dtype == torch.float64 and not ours.training
    assert ours.config == vit.ViTConfig(
        image_size=224, patch_size=16, embed_dim=192, depth=2, num_heads=3, patch_embedding=form
    )
    images = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        expected, actual = theirs(images), ours(images)
    assert actual.shape == (2, 1000)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-10)


def test_float32_logits_agree_tightly():
    theirs = _timm_model().float()
    ours = from_timm(theirs, fused=False)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), theirs(images), rtol=1e-5, atol=1e-5)


def test_average_pooling_without_fc_norm_is_ours_exactly():
    theirs = _timm_model(class_token=False, global_pool="avg", fc_norm=False, img_size=64)
    ours = from_timm(theirs, fused=False)
    assert (ours.config.pool, ours.config.class_token, ours.config.image_size) == ("mean", False, 64)
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), theirs(images), rtol=0, atol=1e-10)


@pytest.mark.parametrize("form", ["conv", "linear"])
def test_round_trip_gives_back_identical_tensors(form):
    state = _timm_model().state_dict()
    config = vit.ViTConfig(image_size=224, patch_size=16, embed_dim=192, depth=2, num_heads=3, patch_embedding=form)
    ours = from_timm_state_dict(state, config)
    assert "patch_embed.cls_token" in ours and "cls_token" not in ours
    if form == "linear":
        assert ours["patch_embed.proj.weight"].shape == (192, 16 * 16 * 3)
    back = to_timm_state_dict(ours, config)
    assert list(back) == list(state)
    for name, tensor in state.items():
        assert back[name].shape == tensor.shape and torch.equal(back[name], tensor), name


def test_our_weights_load_into_timm():
    torch.manual_seed(1)
    ours = vit.ViT(fused=False, image_size=32, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_classes=10)
    ours = ours.double().eval()
    theirs = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, embed_dim=64, depth=2, num_heads=2, num_classes=10
    ).double().eval()
    theirs.load_state_dict(to_timm_state_dict(ours.state_dict(), ours.config))  # strict
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(theirs(images), ours(images), rtol=0, atol=1e-10)


def test_load_timm_weights_fills_every_parameter():
    theirs = _timm_model(img_size=32, num_classes=10)
    ours = vit.ViT(fused=False, image_size=32, patch_size=16, embed_dim=192, depth=2, num_heads=3, num_classes=10)
    load_timm_weights(ours, theirs.state_dict())
    for name, tensor in to_timm_state_dict(ours.state_dict(), ours.config).items():
        assert torch.equal(tensor, theirs.state_dict()[name].float()), name
    with pytest.raises(TypeError, match="expected a vit.ViT, got Linear"):
        load_timm_weights(torch.nn.Linear(2, 2), theirs.state_dict())


@pytest.mark.parametrize(
    "options, option",
    [
        ({"global_pool": "avg"}, "global_pool='avg'"),  # fc_norm: the LayerNorm after the pooling
        ({"global_pool": "avg", "class_token": False}, "global_pool='avg'"),
        ({"reg_tokens": 4, "no_embed_class": True}, "reg_tokens"),
        ({"qk_norm": True}, "qk_norm=True"),
        ({"init_values": 1e-5}, "init_values"),
        ({"pre_norm": True}, "pre_norm=True"),
    ],
)
def test_options_vit_cannot_express_are_errors(options, option):
    theirs = _timm_model(**options)
    config = vit.ViTConfig(depth=2, embed_dim=192, num_heads=3)
    with pytest.raises(ValueError, match=f"from_timm_state_dict: timm's {option}.*no exact counterpart"):
        from_timm_state_dict(theirs.state_dict(), config)
    with pytest.raises(ValueError, match=f"config_from_timm: timm's {option}.*no exact counterpart"):
        config_from_timm(theirs)


@pytest.mark.parametrize(
    "options, option",
    [
        ({"no_embed_class": True}, "no_embed_class=True"),
        ({"drop_path_rate": 0.1}, "drop_path_rate"),
        ({"dynamic_img_size": True}, "dynamic_img_size"),
        ({"act_layer": "gelu_tanh"}, "act_layer"),
    ],
)
def test_options_invisible_in_the_weights_are_caught_on_the_model(options, option):
    with pytest.raises(ValueError, match=f"config_from_timm: timm's {option}"):
        config_from_timm(_timm_model(**options))


def test_no_embed_class_state_dict_is_an_error():
    state = _timm_model(no_embed_class=True).state_dict()
    with pytest.raises(ValueError, match=r"no_embed_class=True \(pos_embed \(1, 196, 192\)"):
        from_timm_state_dict(state, vit.ViTConfig(depth=2, embed_dim=192, num_heads=3))


def test_a_state_dict_for_another_shape_is_an_error():
    state = _timm_model().state_dict()
    with pytest.raises(ValueError, match=r"expected blocks.0.attn.qkv.weight of shape \(576, 192\), got \(1152, 384\)"):
        from_timm_state_dict({**state, "blocks.0.attn.qkv.weight": torch.zeros(1152, 384)}, vit.ViTConfig(depth=2, embed_dim=192, num_heads=3))
    with pytest.raises(ValueError, match=r"missing \['blocks.1.norm1.weight'"):
        from_timm_state_dict(
            {k: v for k, v in state.items() if not k.startswith("blocks.1.")},
            vit.ViTConfig(depth=2, embed_dim=192, num_heads=3),
        )
