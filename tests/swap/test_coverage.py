"""kernels.swap across the ViT families of timm, torchvision and Hugging Face transformers (issue 14).

Each family is built by its own library with random weights at a tiny size (32-64 px, width 32,
2 heads, depth 1-2). For each: the report replaces every attention module of the classes named,
a forward makes exactly one kernel call per attention module (EfficientViT-M: one per head), the swapped float32 model is as
close to the original in float64 as the original in float32 is (``assert_close_to_reference``),
for the eval output and for the output and every parameter gradient of a training step, and
``undo`` restores the original forwards exactly. One family per attention kind runs through the
Triton kernels too (the interpreter on a CPU machine).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
from collections.abc import Callable

import pytest
import torch
from torch import nn

import kernels
from kernels import dispatch
from kernels.swap import TARGETS, swap, swap_table
from tests.equivalence import (
    DEVICE,
    assert_close_to_reference,
    assert_training_step_matches,
)

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

BATCH, WIDTH, HEADS = 2, 32, 2


@dataclasses.dataclass
class Family:
    build: Callable[[], nn.Module]
    attention: tuple[str, ...]  # class names of the attention modules the report must replace
    image_size: int = 32
    inputs: Callable[[torch.Tensor], dict] | None = None  # the model's keyword arguments from images
    left_alone: tuple[str, ...] = ()  # class names left alone on purpose, each with its reason
    calls: Callable[[nn.Module], int] | None = None  # kernel calls per forward, when not one per attention module


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


def _timm_class(module: str, name: str):
    return getattr(getattr(timm.models, module), name)


def _maxxvit(blocks: tuple[str, str]) -> nn.Module:
    maxxvit = timm.models.maxxvit
    config = maxxvit.MaxxVitCfg(embed_dim=(32, 64), depths=(1, 1), block_type=blocks, stem_width=16,
                                transformer_cfg=maxxvit.MaxxVitTransformerCfg(dim_head=16))
    return maxxvit.MaxxVit(config, img_size=64, num_classes=10)


VIT = {"embed_dim": WIDTH, "depth": 2, "num_heads": HEADS}
HF_VIT = {
    "hidden_size": WIDTH, "num_hidden_layers": 2, "num_attention_heads": HEADS, "intermediate_size": 2 * WIDTH,
    "image_size": 32, "patch_size": 16,
}


def _hf(model: str, config: str, implementation: str = "sdpa", **kwargs) -> Callable[[], nn.Module]:
    def build():
        return getattr(transformers, model)._from_config(getattr(transformers, config)(**kwargs), attn_implementation=implementation)

    return build


def _torchvision_swin(version: int) -> Callable[[], nn.Module]:
    def build():
        from torchvision.models import swin_transformer as swin

        v2 = {"block": swin.SwinTransformerBlockV2, "downsample_layer": swin.PatchMergingV2} if version == 2 else {}
        return swin.SwinTransformer(patch_size=[4, 4], embed_dim=WIDTH, depths=[2, 1], num_heads=[2, 4], window_size=[4, 4],
                                    num_classes=10, stochastic_depth_prob=0.0, **v2)

    return build


def _torchvision_maxvit() -> nn.Module:
    import torchvision

    return torchvision.models.MaxVit(input_size=(64, 64), stem_channels=16, partition_size=2, block_channels=[32, 64],
                                     block_layers=[1, 1], head_dim=16, stochastic_depth_prob=0.0, num_classes=10)


def _mvitv2() -> nn.Module:
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

    return MultiScaleVit(MultiScaleVitCfg(depths=(1, 1), embed_dim=(32, 64), num_heads=(2, 4)), img_size=(64, 64), num_classes=10)


def _mae_inputs(images):
    noise = torch.rand(images.shape[0], 4, generator=torch.Generator().manual_seed(3)).to(images.device)
    return {"pixel_values": images, "noise": noise}


def _naflex_inputs(images):
    """SigLIP2's NaFlex input: patches of two images of different grids, padded to 6 patches."""
    patches = images.unfold(2, 16, 16).unfold(3, 16, 16).permute(0, 2, 3, 4, 5, 1).reshape(images.shape[0], 4, -1)
    patches = torch.cat([patches, patches[:, :2].flip(-1)], dim=1)  # (B, 6, 16 * 16 * 3)
    valid = torch.tensor([[1] * 6, [1] * 4 + [0] * 2], device=images.device)
    return {"pixel_values": patches, "pixel_attention_mask": valid, "spatial_shapes": torch.tensor([[2, 3], [2, 2]])}


def _video(images):  # (B, T=2, C, H, W): two frames
    return {"pixel_values": torch.stack([images, images.flip(-1)], dim=1)}


FAMILIES = {
    # timm: the library's own forward with its SDPA call on our kernels.
    "timm_eva02": Family(_timm("eva02_tiny_patch14_224", img_size=28, patch_size=14, **VIT), ("EvaAttention",), 28),
    "timm_vit_rope": Family(_timm("vit_small_patch16_rope_224", img_size=32, **VIT), ("AttentionRope",)),
    "timm_pe_core": Family(_timm("vit_pe_core_tiny_patch16_384", img_size=32, **VIT, attn_pool_num_heads=HEADS),
                           ("AttentionRope", "AttentionPoolLatent")),
    "timm_beit": Family(_timm("beit_base_patch16_224", img_size=32, **VIT), ("Attention",)),
    "timm_vit_relpos": Family(_timm("vit_relpos_small_patch16_224", img_size=32, **VIT), ("RelPosAttention",)),
    "timm_swin": Family(
        _timm("swin_tiny_patch4_window7_224", img_size=32, embed_dim=WIDTH, depths=(2, 1), num_heads=(2, 4), window_size=4),
        ("WindowAttention",),
    ),
    "timm_cait": Family(
        _timm("cait_xxs24_224", img_size=32, embed_dim=WIDTH, depth=1, depth_token_only=1, num_heads=HEADS),
        ("ClassAttn",), left_alone=("TalkingHeadAttn",),
    ),
    "timm_xcit": Family(
        _timm("xcit_nano_12_p16_224", img_size=32, embed_dim=WIDTH, depth=1, num_heads=HEADS), ("ClassAttn",), left_alone=("XCA",)
    ),
    "timm_pvt_v2": Family(
        _timm("pvt_v2_b0", embed_dims=(32, 64), depths=(1, 1), num_heads=(2, 4), sr_ratios=(2, 1), mlp_ratios=(2, 2)), ("Attention",)
    ),
    "timm_twins_svt": Family(
        _timm("twins_svt_small", img_size=32, embed_dims=(32, 64), depths=(1, 1), num_heads=(2, 4), sr_ratios=(2, 1),
              wss=(2, 2), mlp_ratios=(2, 2)),
        ("LocallyGroupedAttn", "GlobalSubSampleAttn"),
    ),
    "timm_sam": Family(
        _timm("samvit_base_patch16", img_size=64, **VIT, window_size=2, global_attn_indexes=(1,), neck_chans=16),
        ("Attention",), 64,
    ),
    "timm_tiny_vit": Family(
        _timm("tiny_vit_5m_224", embed_dims=(32, 32, 32, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_sizes=(2, 2, 2, 2)),
        ("Attention",),
    ),
    "timm_davit": Family(
        _timm("davit_tiny", embed_dims=(32, 32, 32, 64), depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 4), window_size=2),
        ("WindowAttention",),
    ),
    "timm_fastvit": Family(
        _timm("fastvit_sa12", layers=(1, 1, 1, 1), embed_dims=(16, 16, 32, 32), mlp_ratios=(2, 2, 2, 2)), ("Attention",), 64
    ),
    "timm_hiera": Family(_timm("hiera_tiny_224", img_size=64, embed_dim=WIDTH, num_heads=1, stages=(1, 1, 1, 1)),
                         ("MaskUnitAttention",), 64),
    "timm_sam2_hiera": Family(
        lambda: _timm_class("hieradet_sam2", "HieraDet")(embed_dim=WIDTH, num_heads=1, global_pos_size=(4, 4), num_classes=10,
                                                         stages=(1, 1, 1, 1), global_att_blocks=(), window_spec=(4, 2, 2, 1), q_pool=2),
        ("MultiScaleAttention",), 64,
    ),
    "timm_visformer": Family(_timm("visformer_tiny", img_size=64, embed_dim=64, depth=(1, 1, 1), num_heads=2), ("Attention",), 64),
    "timm_nest": Family(lambda: _timm_class("nest", "Nest")(img_size=32, embed_dims=(32, 64, 64), depths=(1, 1, 1),
                                                             num_heads=(2, 4, 4), patch_size=2, num_classes=10), ("Attention",)),
    "timm_maxvit": Family(lambda: _maxxvit(("M", "M")), ("AttentionCl",), 64),
    "timm_coatnet": Family(lambda: _maxxvit(("C", "T")), ("Attention2d",), 64),
    # timm: attention its library writes out, copied with our kernel in the middle.
    "timm_swinv2": Family(
        _timm("swinv2_tiny_window8_256", img_size=32, embed_dim=WIDTH, depths=(2, 1), num_heads=(2, 4), window_size=4),
        ("WindowAttention",),
    ),
    "timm_crossvit": Family(
        _timm("crossvit_tiny_240", img_size=(32, 48), patch_size=(8, 16), embed_dim=(32, 32), depth=((1, 1, 0),),
              num_heads=(2, 2), mlp_ratio=(2, 2, 1)),
        ("Attention", "CrossAttention"), 48,
    ),
    "timm_convit": Family(
        _timm("convit_tiny", img_size=32, embed_dim=WIDTH * 2, depth=2, num_heads=HEADS * 2, local_up_to_layer=1),
        ("MHSA",), left_alone=("GPSA",),
    ),
    "timm_levit": Family(
        _timm("levit_128s", img_size=64, embed_dim=(32, 48), key_dim=16, num_heads=(2, 3), depth=(1, 1), attn_ratio=(2, 2),
              mlp_ratio=(2, 2)),
        ("Attention", "AttentionDownsample"), 64,
    ),
    "timm_levit_conv": Family(
        _timm("levit_conv_128s", img_size=64, embed_dim=(32, 48), key_dim=16, num_heads=(2, 3), depth=(1, 1), attn_ratio=(2, 2),
              mlp_ratio=(2, 2)),
        ("Attention", "AttentionDownsample"), 64,
    ),
    "timm_mvitv2": Family(lambda: _mvitv2(), ("MultiScaleAttention",), 64),
    "timm_efficientvit_m": Family(
        _timm("efficientvit_m0", img_size=64, embed_dim=(32, 48, 64), depth=(1, 1, 1), num_heads=(2, 3, 4), key_dim=(16, 16, 16),
              window_size=(4, 4, 4)),
        ("CascadedGroupAttention",), 64, calls=lambda model: sum(len(m.qkvs) for m in model.modules() if hasattr(m, "qkvs")),
    ),
    "timm_siglip_map": Family(_timm("vit_base_patch16_siglip_224", img_size=32, **VIT), ("Attention", "AttentionPoolLatent")),
    "timm_reg_tokens": Family(_timm("vit_small_patch14_reg4_dinov2", img_size=28, **VIT), ("Attention",), 28),
    "timm_deit_distilled": Family(_timm("deit_tiny_distilled_patch16_224", img_size=32, **VIT), ("Attention",)),
    # torchvision.
    "torchvision_swin_t": Family(_torchvision_swin(1), ("ShiftedWindowAttention",)),
    "torchvision_swin_v2_t": Family(_torchvision_swin(2), ("ShiftedWindowAttentionV2",)),
    "torchvision_maxvit": Family(_torchvision_maxvit, ("RelativePositionalMultiHeadAttention",), 64),
    # transformers: the attention interface switched to "vitriton", and the modules that bypass it.
    "hf_deit": Family(_hf("DeiTForImageClassification", "DeiTConfig", **HF_VIT), ("DeiTAttention",)),
    "hf_vit_mae": Family(_hf("ViTMAEModel", "ViTMAEConfig", **HF_VIT, mask_ratio=0.5), ("ViTMAEAttention",), inputs=_mae_inputs),
    "hf_ijepa": Family(_hf("IJepaModel", "IJepaConfig", **HF_VIT), ("IJepaAttention",)),
    "hf_clip": Family(_hf("CLIPVisionModel", "CLIPVisionConfig", **HF_VIT), ("CLIPAttention",)),
    "hf_siglip": Family(_hf("SiglipVisionModel", "SiglipVisionConfig", **HF_VIT), ("SiglipAttention", "MultiheadAttention")),
    "hf_siglip2_naflex": Family(
        _hf("Siglip2VisionModel", "Siglip2VisionConfig", **HF_VIT, num_patches=16), ("Siglip2Attention", "MultiheadAttention"),
        inputs=_naflex_inputs,
    ),
    "hf_internvl": Family(_hf("InternVLVisionModel", "InternVLVisionConfig", **{**HF_VIT, "image_size": [32, 32], "patch_size": [16, 16]}),
                          ("InternVLVisionAttention",)),
    "hf_idefics3": Family(_hf("Idefics3VisionTransformer", "Idefics3VisionConfig", **HF_VIT), ("Idefics3VisionAttention",)),
    "hf_dinov2": Family(_hf("Dinov2Model", "Dinov2Config", **HF_VIT), ("Dinov2Attention",)),
    "hf_dinov2_registers": Family(
        _hf("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", **HF_VIT, num_register_tokens=2),
        ("Dinov2WithRegistersAttention",),
    ),
    "hf_dinov3": Family(_hf("DINOv3ViTModel", "DINOv3ViTConfig", **HF_VIT), ("DINOv3ViTAttention",)),
    "hf_beit": Family(
        _hf("BeitModel", "BeitConfig", **HF_VIT, use_relative_position_bias=True, drop_path_rate=0.0), ("BeitAttention",)
    ),
    "hf_data2vec_vision": Family(
        _hf("Data2VecVisionModel", "Data2VecVisionConfig", **HF_VIT, use_relative_position_bias=True, drop_path_rate=0.0),
        ("Data2VecVisionSdpaSelfAttention",),
    ),
    # Data2VecVision picks its attention class when built: the eager one is swapped all the same.
    "hf_data2vec_vision_eager": Family(
        _hf("Data2VecVisionModel", "Data2VecVisionConfig", "eager", **HF_VIT, use_relative_position_bias=True, drop_path_rate=0.0),
        ("Data2VecVisionSelfAttention",),
    ),
    "hf_aimv2": Family(_hf("Aimv2VisionModel", "Aimv2VisionConfig", **HF_VIT, use_head=True),
                       ("Aimv2Attention", "Aimv2AttentionPoolingHead")),
    "hf_mlcd": Family(_hf("MLCDVisionModel", "MLCDVisionConfig", **HF_VIT), ("MLCDAttention",)),
    "hf_videomae": Family(
        _hf("VideoMAEModel", "VideoMAEConfig", **HF_VIT, num_frames=2, tubelet_size=2), ("VideoMAESelfAttention",), inputs=_video
    ),
    "hf_vivit": Family(
        _hf("VivitModel", "VivitConfig", **HF_VIT, num_frames=2, tubelet_size=[2, 16, 16]), ("VivitAttention",), inputs=_video
    ),
}

# One family per attention kind also runs through the Triton kernels (the interpreter on a CPU).
TRITON = ["timm_eva02", "timm_cait", "timm_swinv2", "timm_levit", "hf_clip", "hf_siglip", "hf_data2vec_vision"]


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = collections.Counter()
    for name in ("attention", "attention_varlen", "patch_embed"):
        original = getattr(dispatch, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(dispatch, name, spy)
    return calls


def _build(family: Family) -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    model = family.build().to(DEVICE)
    images = torch.randn(BATCH, 3, family.image_size, family.image_size, device=DEVICE)
    return model, (family.inputs(images) if family.inputs else {"pixel_values": images} if _is_hf(model) else {"x": images})


def _is_hf(model: nn.Module) -> bool:
    return isinstance(model, transformers.PreTrainedModel)


def _output(model: nn.Module, inputs: dict) -> torch.Tensor:
    """The model's output as one tensor: logits, or the last hidden state and the pooled output."""
    dtype = next(model.parameters()).dtype
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    out = model(**inputs) if _is_hf(model) else model(*inputs.values())
    if isinstance(out, tuple):  # LeViT's distilled head in training: (class, distillation) logits
        out = torch.cat(out, dim=1)
    if torch.is_tensor(out):
        return out
    if getattr(out, "logits", None) is not None:
        return out.logits
    parts = [out.last_hidden_state] + [p for p in [getattr(out, "pooler_output", None)] if p is not None]
    return torch.cat([p.flatten(1) for p in parts], dim=1)


def _train_step(model: nn.Module, inputs: dict, upstream: torch.Tensor):
    model.train()
    model.zero_grad(set_to_none=True)
    out = _output(model, inputs)
    (out * upstream.to(out.dtype)).sum().backward()
    return out.detach(), {name: p.grad for name, p in model.named_parameters()}


def _attention_paths(model: nn.Module, family: Family) -> list[str]:
    return [path for path, m in model.named_modules() if type(m).__name__ in family.attention]


def _check_family(name: str, backend: str, kernel_calls) -> None:
    family = FAMILIES[name]
    model, inputs = _build(family)
    pristine = copy.deepcopy(model)  # for undo: training steps move BatchNorm statistics
    model64 = copy.deepcopy(model).double()
    swapped = copy.deepcopy(model)
    report = swap(swapped)

    attention = _attention_paths(swapped, family)
    assert attention, f"{name}: no module of {family.attention}"
    replaced = {e.path for e in report.replaced}
    assert set(attention) <= replaced, (sorted(set(attention) - replaced), str(report))
    left = {e.kind.split()[-1]: e.note for e in report.left_alone}
    for kind in family.left_alone:
        assert kind in left and "no swap target" not in left[kind], str(report)

    with torch.no_grad():
        reference64 = _output(model64.eval(), inputs)
        reference_low = _output(model.eval(), inputs)
        kernel_calls.clear()
        with kernels.use_backend(backend):
            actual = _output(swapped.eval(), inputs)
    calls = family.calls(swapped) if family.calls else len(attention)
    assert kernel_calls["attention"] + kernel_calls["attention_varlen"] == calls, (dict(kernel_calls), attention)
    assert_close_to_reference(actual, reference64, reference_low, name=f"{name} eval output")

    upstream = torch.randn(reference64.shape, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(1))
    assert_training_step_matches(_train_step, swapped, model64, model, inputs, upstream, backend, name)

    # Undo: the original forwards, exactly.
    restored = report.undo()
    assert replaced <= set(restored), (sorted(replaced - set(restored)), restored)
    assert sorted(p for e in report.replaced for p in e.patched) == sorted(restored), str(report)  # the report counts it all
    for path, module in swapped.named_modules():
        assert "_vitriton_swap" not in module.__dict__ and "forward" not in module.__dict__, path
    if _is_hf(swapped):
        assert swapped.config._attn_implementation == pristine.config._attn_implementation
    undone = copy.deepcopy(pristine)
    swap(undone).undo()
    kernel_calls.clear()
    with torch.no_grad():
        assert torch.equal(_output(undone.eval(), inputs), _output(pristine.eval(), inputs))
    assert kernel_calls["attention"] == 0 and kernel_calls["attention_varlen"] == 0


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_swapped_matches_the_original(name, kernel_calls):
    _check_family(name, "einsum", kernel_calls)


@pytest.mark.slow
@pytest.mark.interpreter
@pytest.mark.parametrize("name", TRITON)
def test_family_through_the_triton_kernels(name, kernel_calls):
    _check_family(name, "triton", kernel_calls)


def test_the_rule_fails_when_a_bias_is_dropped(kernel_calls, monkeypatch):
    """The family check can fail: our kernel without the relative-position bias and shift mask is caught."""
    original = dispatch.attention
    monkeypatch.setattr(dispatch, "attention", lambda q, k, v, mask=None, **kwargs: original(q, k, v, None, **kwargs))
    with pytest.raises(AssertionError, match="max error"):
        _check_family("timm_swin", "einsum", kernel_calls)


@pytest.mark.parametrize("name", ["timm_eva02", "torchvision_swin_v2_t"])
def test_library_forwards_with_our_kernel_pickle_and_compile(name, kernel_calls):
    """The forwards made at swap time (the library's, with SDPA or a helper on our kernel) pickle
    as the function they copy, and torch.compile traces them."""
    import pickle

    model, inputs = _build(FAMILIES[name])
    model.eval()
    swap(model)
    torch._dynamo.reset()
    with torch.no_grad(), kernels.use_backend("einsum"):
        eager = _output(model, inputs)
        assert torch.equal(_output(pickle.loads(pickle.dumps(model)), inputs), eager)
        compiled = _output(torch.compile(model, backend="eager", fullgraph=True), inputs)
    torch.testing.assert_close(compiled, eager)


# ---------------------------------------------------------------------------------------------
# What is left alone, and why; the report is complete.


@pytest.mark.parametrize(
    "build, kind, why",
    [
        (_timm("xcit_nano_12_p16_224", img_size=32, embed_dim=WIDTH, depth=1, num_heads=HEADS), "timm XCA", "softmax over channels"),
        (_timm("convit_tiny", img_size=32, embed_dim=WIDTH, depth=2, num_heads=HEADS, local_up_to_layer=1),
         "timm GPSA", "gated sum of two softmaxes"),
        (_timm("efficientvit_b0", widths=(8, 16, 32, 64, 128), depths=(1, 1, 1, 1, 1), head_dim=16),
         "timm LiteMLA", "ReLU linear attention"),
        (_timm("efficientformerv2_s0", img_size=64), "timm Attention2d", "no swap target knows this class"),
    ],
    ids=["xcit", "convit", "efficientvit_b", "efficientformerv2"],
)
def test_attention_it_cannot_or_does_not_compute_is_reported(build, kind, why):
    report = swap(build())
    assert any(e.kind == kind and why in e.note for e in report.left_alone), str(report)


def test_readme_swap_table_is_the_code_table():
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert swap_table() in readme, "README's swap table differs from kernels.swap.swap_table(); paste it again"
    assert len(swap_table().splitlines()) == len(TARGETS) + 2


# ---------------------------------------------------------------------------------------------
# transformers: output_attentions, and registration in any order.


def test_output_attentions_runs_the_models_eager_attention(kernel_calls):
    torch.manual_seed(0)
    model = _hf("CLIPVisionModel", "CLIPVisionConfig", "eager", **HF_VIT)().to(DEVICE).eval()
    images = torch.randn(BATCH, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        expected = model(images, output_attentions=True)
        swap(model)
        assert model.config._attn_implementation == "vitriton"
        kernel_calls.clear()
        actual = model(images, output_attentions=True)
        assert kernel_calls["attention"] == 0  # the weights were asked for: eager ran, not our kernel
        assert len(actual.attentions) == 2
        for got, want in zip(actual.attentions, expected.attentions):
            torch.testing.assert_close(got, want)
        torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state)
        with kernels.use_backend("einsum"):
            model(images)
    assert kernel_calls["attention"] == 2  # without output_attentions, the kernel


def test_registration_does_not_depend_on_order(monkeypatch):
    from transformers import AttentionInterface, AttentionMaskInterface

    monkeypatch.delitem(AttentionInterface._global_mapping, "vitriton", raising=False)
    monkeypatch.delitem(AttentionMaskInterface._global_mapping, "vitriton", raising=False)
    with pytest.raises(ValueError, match="found no attention or patch-embedding module"):
        swap(nn.Sequential(nn.Linear(4, 4)))  # nothing to swap, but "vitriton" is registered all the same
    model = transformers.CLIPVisionModel._from_config(transformers.CLIPVisionConfig(**HF_VIT), attn_implementation="vitriton")
    assert model.config._attn_implementation == "vitriton"


def test_a_model_whose_head_dim_the_kernels_cannot_take_is_left_whole():
    model = _hf("CLIPVisionModel", "CLIPVisionConfig", **{**HF_VIT, "num_attention_heads": 4})()  # head dim 8
    report = swap(model)
    assert report.replaced == [] and model.config._attn_implementation == "sdpa"
    assert {e.note for e in report.left_alone} == {"head dim 8: the Triton kernels take 16 to 256"}


def test_a_model_whose_logits_are_capped_is_left_whole():
    config = transformers.Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    model = transformers.Gemma2ForCausalLM(config)
    report = swap(model)
    assert report.replaced == [] and model.config._attn_implementation != "vitriton"
    assert ["attn_logit_softcapping" in e.note for e in report.left_alone] == [True]
