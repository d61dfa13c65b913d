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


def _output(model, pixels):
    out = model(pixels, grid_thw=GRID)
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
