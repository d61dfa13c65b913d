"""Swap for the vision towers that pack images into one sequence (issue 13): Qwen2-VL, Qwen2.5-VL
(full and windowed layers) and Qwen3-VL vision attention run one ``kernels.attention_varlen`` call
per layer instead of one SDPA call per image. Tiny random configs, float64, on the CPU: the
swapped tower's output and every parameter gradient equal the tower's own SDPA path, the report
names each replaced layer, and ``undo`` restores it.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import dispatch
from tests.equivalence import DEVICE

pytest.importorskip("transformers")

f64 = torch.float64
PATCH, MERGE, TEMPORAL = 4, 2, 2
GRID = torch.tensor([[1, 4, 6], [1, 2, 2], [1, 6, 4]])  # three images of different sizes (t, h, w)


def qwen2_vl():
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import (
        Qwen2VisionTransformerPretrainedModel,
    )

    config = Qwen2VLVisionConfig(depth=2, embed_dim=64, hidden_size=32, num_heads=4, patch_size=PATCH,
                                 spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL)
    return Qwen2VisionTransformerPretrainedModel._from_config(config, attn_implementation="sdpa")


def qwen2_5_vl():
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (
        Qwen2_5_VLVisionConfig,
    )
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionTransformerPretrainedModel,
    )

    # window_size 16 = windows of 4x4 patches (2x2 merged units): layer 0 attends within windows, layer 1 whole images.
    config = Qwen2_5_VLVisionConfig(depth=2, hidden_size=64, out_hidden_size=32, intermediate_size=96, num_heads=4,
                                    patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL,
                                    window_size=16, fullatt_block_indexes=[1])
    return Qwen2_5_VisionTransformerPretrainedModel._from_config(config, attn_implementation="sdpa")


def qwen3_vl():
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    config = Qwen3VLVisionConfig(depth=2, hidden_size=64, out_hidden_size=32, intermediate_size=96, num_heads=4,
                                 patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL,
                                 num_position_embeddings=64, deepstack_visual_indexes=[0])
    return Qwen3VLVisionModel._from_config(config, attn_implementation="sdpa")


def _output(model, pixels, grid=GRID):
    out = model(pixels, grid_thw=grid)
    return out.pooler_output if hasattr(out, "pooler_output") else out


@pytest.mark.parametrize("build", [qwen2_vl, qwen2_5_vl, qwen3_vl])
def test_qwen_vision_towers_run_varlen_with_equal_outputs_and_gradients(build, monkeypatch):
    torch.manual_seed(0)
    model = build().to(f64)
    pixels = torch.randn(int(GRID.prod(-1).sum()), 3 * TEMPORAL * PATCH * PATCH, dtype=f64)

    expected = _output(model, pixels)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    # Parameters the output does not depend on (Qwen3-VL's deepstack mergers) have no gradient.
    expected_grads = {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    report = kernels.swap(model)
    layers = [path for path, module in model.named_modules() if path.endswith(".attn")]
    assert [e.path for e in report.replaced] == layers and len(layers) == 2
    assert all("kernels.attention_varlen" in e.note for e in report.replaced)

    calls = []
    varlen = dispatch.attention_varlen
    monkeypatch.setattr(dispatch, "attention_varlen", lambda *a, **kw: calls.append(1) or varlen(*a, **kw))
    with kernels.use_backend("einsum"):
        actual = _output(model, pixels)
    assert len(calls) == len(layers)  # one call per layer, not one per image
    torch.testing.assert_close(actual, expected)
    actual.backward(grad)
    for name, p in model.named_parameters():
        if expected_grads[name] is None:
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, expected_grads[name], msg=name)

    assert set(report.undo()) == set(layers)
    assert all("forward" not in model.get_submodule(path).__dict__ for path in layers)


# ---------------------------------------------------------------------------------------------
# Pixtral: the block-diagonal mask over the packed images becomes one varlen call per layer.


def pixtral():
    from transformers import PixtralVisionConfig, PixtralVisionModel

    config = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 head_dim=16, image_size=64, patch_size=8)
    return PixtralVisionModel._from_config(config, attn_implementation="sdpa")


def _pixtral_inputs():
    # Three images padded into one batch tensor; image_sizes keeps each one's own size.
    pixels = torch.randn(3, 3, 48, 64, dtype=f64, generator=torch.Generator().manual_seed(1))
    return pixels, torch.tensor([[48, 64], [16, 40], [32, 24]])


def test_pixtral_block_mask_becomes_varlen_with_equal_outputs_and_gradients(monkeypatch):
    torch.manual_seed(0)
    model = pixtral().to(f64)
    pixels, sizes = _pixtral_inputs()
    expected = model(pixels, image_sizes=sizes).last_hidden_state
    grad = torch.randn_like(expected)
    expected.backward(grad)
    expected_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    report = kernels.swap(model)
    layers = [path for path, module in model.named_modules() if type(module).__name__ == "PixtralAttention"]
    assert [e.path for e in report.replaced] == ["", *layers] and len(layers) == 2
    assert all("attention_varlen" in e.note for e in report.replaced[1:])

    calls = []
    varlen, attention = dispatch.attention_varlen, dispatch.attention
    monkeypatch.setattr(dispatch, "attention_varlen", lambda *a, **kw: calls.append("varlen") or varlen(*a, **kw))
    monkeypatch.setattr(dispatch, "attention", lambda *a, **kw: calls.append("attention") or attention(*a, **kw))
    with kernels.use_backend("einsum"):
        actual = model(pixels, image_sizes=sizes).last_hidden_state
    assert calls == ["varlen"] * len(layers)  # no (N, N) mask, one call per layer
    torch.testing.assert_close(actual, expected)
    actual.backward(grad)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected_grads[name], msg=name)

    assert set(report.undo()) == {"", *layers}
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_pixtral_output_attentions_runs_the_original_with_its_mask():
    torch.manual_seed(0)
    model = pixtral().to(f64)
    model.set_attn_implementation("eager")
    pixels, sizes = _pixtral_inputs()
    expected = model(pixels, image_sizes=sizes, output_attentions=True)
    kernels.swap(model)  # switches nothing model-wide: Pixtral's attention is patched per layer
    actual = model(pixels, image_sizes=sizes, output_attentions=True)
    assert len(actual.attentions) == 2
    for got, want in zip(actual.attentions, expected.attentions):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state)


# ---------------------------------------------------------------------------------------------
# timm NaFlexViT: images of different sizes padded into one batch, a key-padding mask.


@pytest.mark.parametrize("key_only", [False, True], ids=["symmetric_mask", "key_only_mask"])
def test_naflexvit_padding_mask_runs_on_our_kernel(key_only, monkeypatch):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("naflexvit_base_patch16_gap", pretrained=False, num_classes=10, embed_dim=32, depth=2,
                              num_heads=2, use_key_only_attn_mask=key_only).to(f64)
    n = 6  # a 2x3 grid of 16-px patches; the second image has 4 of them, then 2 of padding
    coord = torch.stack(torch.meshgrid(torch.arange(2), torch.arange(3), indexing="ij"), -1).reshape(1, n, 2).expand(2, -1, -1)
    inputs = {"patches": torch.randn(2, n, 16 * 16 * 3, dtype=f64), "patch_coord": coord,
              "patch_valid": torch.tensor([[True] * 6, [True] * 4 + [False] * 2])}
    expected = model(dict(inputs))
    grad = torch.randn_like(expected)
    expected.backward(grad)
    expected_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    report = kernels.swap(model)
    blocks = [f"blocks.{i}.attn" for i in range(2)]
    assert blocks == [e.path for e in report.replaced if e.path.startswith("blocks")]
    embeds = [e for e in report.left_alone if e.kind == "timm NaFlexEmbeds"]
    assert len(embeds) == 1 and "pre-patchified tokens" in embeds[0].note  # said why, in one line
    masks = []
    attention = dispatch.attention
    monkeypatch.setattr(dispatch, "attention", lambda q, k, v, mask=None, **kw: masks.append(mask) or attention(q, k, v, mask, **kw))
    with kernels.use_backend("einsum"):
        actual = model(dict(inputs))
    assert len(masks) == 2 and all(m is not None for m in masks)  # the padding mask reached our kernel
    torch.testing.assert_close(actual, expected)
    actual.backward(grad)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected_grads[name], msg=name)


# ---------------------------------------------------------------------------------------------
# The same towers through the Triton varlen kernels (Triton's interpreter on a CPU).


@pytest.mark.interpreter
@pytest.mark.parametrize("build, inputs", [
    (qwen2_5_vl, lambda: (torch.randn(int(GRID.prod(-1).sum()), 3 * TEMPORAL * PATCH * PATCH, dtype=f64),)),
    (pixtral, _pixtral_inputs),
])
def test_towers_on_the_triton_varlen_kernels_equal_their_own_sdpa_path(build, inputs):
    """Qwen2.5-VL (window and full layers) and Pixtral, swapped, in float32 on the Triton path: the
    output and every parameter gradient against the unswapped tower in float64."""
    torch.manual_seed(0)
    model64 = build().to(f64)
    args = inputs()

    def run(model, dtype, device="cpu"):
        pixels = args[0].to(device, dtype)
        if build is pixtral:
            return model(pixels, image_sizes=args[1]).last_hidden_state
        return _output(model, pixels, GRID.to(device))  # the tower's cu_seqlens come from the grid, on its device

    expected = run(model64, f64)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    model32 = build().float()
    model32.load_state_dict(model64.state_dict())
    model32.to(DEVICE)  # CUDA tensors on a GPU, where the interpreter (which takes CPU ones) is off
    kernels.swap(model32)
    calls = []
    varlen = dispatch.attention_varlen
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dispatch, "attention_varlen", lambda *a, **kw: calls.append(kw.get("backend")) or varlen(*a, **kw))
        with kernels.use_backend("triton"):
            actual = run(model32, torch.float32, DEVICE)
            actual.backward(grad.float().to(DEVICE))
    assert len(calls) == 2  # one per layer, on the Triton path (use_backend)
    torch.testing.assert_close(actual.double().cpu(), expected, rtol=1e-4, atol=1e-4)
    for (name, p32), p64 in zip(model32.named_parameters(), model64.parameters()):
        if p64.grad is None:
            assert p32.grad is None, name
        else:
            torch.testing.assert_close(p32.grad.double().cpu(), p64.grad, rtol=1e-3, atol=1e-4, msg=name)


def _captured_call(module, run):
    """The positional and keyword arguments ``module`` is called with while ``run()`` runs."""
    seen = {}
    handle = module.register_forward_pre_hook(lambda _, args, kwargs: seen.update(args=args, kwargs=kwargs), with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen["args"], seen["kwargs"]


@pytest.mark.slow
@pytest.mark.parametrize("build", [qwen2_vl, qwen2_5_vl, qwen3_vl])
def test_swapped_qwen_towers_compile_fullgraph(build, compile_backend="aot_eager"):
    """Issue 19: the cu_seqlens checks read values on the host, a data-dependent break in the graph.

    Every swapped attention layer traces whole, with max_seqlen as the tower passes it and as a 0-d
    tensor (what ``cu_seqlens.diff().max()`` gives). Qwen2-VL and Qwen3-VL trace whole too;
    Qwen2.5-VL's own window indexing does not trace with fullgraph, swapped or not.
    """
    torch.manual_seed(0)
    model = build().to(f64)
    pixels = torch.randn(int(GRID.prod(-1).sum()), 3 * TEMPORAL * PATCH * PATCH, dtype=f64)
    kernels.swap(model)
    with kernels.use_backend("einsum"):
        expected = _output(model, pixels)
        attention = model.blocks[0].attn
        args, kwargs = _captured_call(attention, lambda: _output(model, pixels))
        longest = kwargs["cu_seqlens"].diff().max()
        for given in (kwargs.get("max_seqlen"), longest):
            torch._dynamo.reset()
            layer_kwargs = {**kwargs, "max_seqlen": given}
            compiled = torch.compile(attention, backend=compile_backend, fullgraph=True)
            torch.testing.assert_close(compiled(*args, **layer_kwargs), attention(*args, **layer_kwargs))
        if build is not qwen2_5_vl:
            torch._dynamo.reset()
            actual = _output(torch.compile(model, backend=compile_backend, fullgraph=True), pixels)
            torch.testing.assert_close(actual, expected)


def test_swapped_pixtral_compiles_fullgraph():
    """Issue 19 item 5, Pixtral: with image sizes as Python numbers (as a tensor, the original's own
    cropping by their values does not trace, swapped or not) the swapped tower traces whole."""
    torch.manual_seed(0)
    model = pixtral().to(f64)
    pixels, sizes = _pixtral_inputs()
    sizes = [tuple(size) for size in sizes.tolist()]
    kernels.swap(model)
    with kernels.use_backend("einsum"):
        expected = model(pixels, image_sizes=sizes).last_hidden_state
        torch._dynamo.reset()
        actual = torch.compile(model, backend="aot_eager", fullgraph=True)(pixels, image_sizes=sizes).last_hidden_state
    torch.testing.assert_close(actual, expected)
