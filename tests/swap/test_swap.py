"""kernels/swap/: our kernels inside timm, torchvision, Hugging Face and vit models, exactly.

Every model is built by its own library with random weights (nothing from a hub), at tiny sizes
so that the Triton interpreter runs them in seconds: 32x32 images, 16x16 patches, width 32,
2 heads, 2 blocks, a batch of 2. The rule: the swapped float32 model, through the kernels, is
as close to the original in float64 as the original in float32 is (``assert_close_to_reference``),
for the logits in eval mode and for the logits and every parameter's gradient in a training step.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import inspect
import pickle
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import kernels
import vit
from kernels import dispatch
from kernels.swap import (
    SwapEntry,
    SwapReport,
    register_transformers_attention,
    swap,
    unswap,
)
from kernels.swap.transformers import HF_ATTENTION_NAME
from tests.equivalence import (
    DEVICE,
    assert_close_to_reference,
    assert_training_step_matches,
)
from tests.robustness import one_line_error

# Triton runs the kernels (the interpreter on a CPU): about a second per model there, so slow.
BACKENDS = ["einsum", pytest.param("triton", marks=[pytest.mark.interpreter, pytest.mark.slow])]
WIDTH, HEADS, DEPTH, CLASSES, BATCH = 32, 2, 2, 10, 2


def _timm(name: str, image_size: int = 32, **kwargs) -> nn.Module:
    timm = pytest.importorskip("timm")
    return timm.create_model(
        name, pretrained=False, depth=DEPTH, img_size=image_size, embed_dim=WIDTH, num_heads=HEADS,
        num_classes=CLASSES, **kwargs,
    )


def _torchvision(image_size: int = 32, **kwargs) -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.VisionTransformer(
        image_size=image_size, patch_size=16, num_layers=DEPTH, num_heads=HEADS, hidden_dim=WIDTH,
        mlp_dim=2 * WIDTH, num_classes=CLASSES, **kwargs,
    )
    # torchvision zero-initialises the head, which would make every logit 0 and every gradient
    # but the head's vanish: a comparison of zeros proves nothing.
    nn.init.normal_(model.heads.head.weight, std=WIDTH**-0.5)
    return model


def _transformers_config(**kwargs):
    transformers = pytest.importorskip("transformers")
    return transformers.ViTConfig(
        image_size=32, patch_size=16, hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
        intermediate_size=2 * WIDTH, num_labels=CLASSES, **kwargs,
    )


def _transformers(**kwargs) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    return transformers.ViTForImageClassification(_transformers_config(**kwargs))


def _vit(**kwargs) -> nn.Module:
    return vit.ViT(
        fused=False, image_size=32, patch_size=16, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, num_classes=CLASSES,
        **kwargs,
    )


@dataclasses.dataclass
class Case:
    build: Callable[[], nn.Module]
    replaced: list[str]  # the paths the report must list as replaced, in order
    image_size: int = 32
    patch_embed_calls: int = 1  # kernel calls per forward
    attention_calls: int = DEPTH


TIMM_REPLACED = ["patch_embed", "blocks.0.attn", "blocks.1.attn"]
CASES = {
    "timm_vit_tiny_patch16_224": Case(lambda: _timm("vit_tiny_patch16_224"), TIMM_REPLACED),
    # 48 px: 9 patches and a class token, a token count that is no power of two.
    "timm_vit_tiny_patch16_384": Case(lambda: _timm("vit_tiny_patch16_384", image_size=48), TIMM_REPLACED, 48),
    "timm_avg_pool_no_class_token": Case(
        lambda: _timm("vit_tiny_patch16_224", class_token=False, global_pool="avg"), TIMM_REPLACED
    ),
    "timm_qk_norm": Case(lambda: _timm("vit_tiny_patch16_224", qk_norm=True), TIMM_REPLACED),
    "timm_no_embed_class": Case(lambda: _timm("vit_tiny_patch16_224", no_embed_class=True), TIMM_REPLACED),
    # Register tokens: the projection and the patches' positions in the kernel, the prefix concatenated.
    "timm_reg_tokens": Case(lambda: _timm("vit_tiny_patch16_224", reg_tokens=2), TIMM_REPLACED),
    "timm_embed_norm": Case(lambda: _timm("vit_tiny_patch16_224", embed_norm_layer="layernorm", reg_tokens=1), TIMM_REPLACED),
    "timm_reg_tokens_no_embed_class": Case(lambda: _timm("vit_tiny_patch16_224", reg_tokens=2, no_embed_class=True), TIMM_REPLACED),
    "torchvision_vit_b_16": Case(
        _torchvision,
        ["", "encoder.layers.encoder_layer_0.self_attention", "encoder.layers.encoder_layer_1.self_attention"],
    ),
    "transformers_vit": Case(
        _transformers, ["vit.embeddings", "vit.layers.0.attention", "vit.layers.1.attention"]
    ),
    "vit": Case(_vit, ["patch_embed", "blocks.0.attn", "blocks.1.attn"]),
}


def _build(name: str) -> tuple[nn.Module, torch.Tensor]:
    case = CASES[name]
    torch.manual_seed(0)
    model = case.build().to(DEVICE)
    images = torch.randn(BATCH, 3, case.image_size, case.image_size, device=DEVICE)
    return model, images


def _logits(model: nn.Module, images: torch.Tensor, **kwargs) -> torch.Tensor:
    out = model(images.to(next(model.parameters()).dtype), **kwargs)
    return out.logits if hasattr(out, "logits") else out


def _train_step(model: nn.Module, images: torch.Tensor, upstream: torch.Tensor):
    """Logits and every parameter's gradient for the loss sum(logits * upstream)."""
    model.train()
    model.zero_grad(set_to_none=True)
    logits = _logits(model, images)
    (logits * upstream.to(logits.dtype)).sum().backward()
    return logits.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls that reach kernels.attention and kernels.patch_embed, and their dropout_p."""
    calls = collections.Counter()
    dropouts = []
    for name in ("attention", "patch_embed"):
        original = getattr(dispatch, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            if _name == "attention":
                dropouts.append(kwargs.get("dropout_p", args[5] if len(args) > 5 else 0.0))
            return _original(*args, **kwargs)

        monkeypatch.setattr(dispatch, name, spy)  # what kernels/swap/ calls
        monkeypatch.setattr(kernels, name, spy)  # what vit/model.py calls
    calls.dropouts = dropouts
    return calls


# ---------------------------------------------------------------------------------------------
# The parity: before and after the swap, in eval mode and in a training step.


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_swapped_model_matches_the_original(name, backend, kernel_calls):
    model, images = _build(name)
    case = CASES[name]
    model64 = copy.deepcopy(model).double()
    swapped = copy.deepcopy(model)
    report = swap(swapped)
    assert [entry.path for entry in report.replaced] == case.replaced

    with torch.no_grad():
        reference64 = _logits(model64.eval(), images)
        reference_low = _logits(model.eval(), images)
        kernel_calls.clear()
        with kernels.use_backend(backend):
            actual = _logits(swapped.eval(), images)
    assert kernel_calls == {"attention": case.attention_calls, "patch_embed": case.patch_embed_calls}
    assert_close_to_reference(actual, reference64, reference_low, name=f"{name} eval logits")

    upstream = torch.randn(reference64.shape, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(1))
    assert_training_step_matches(_train_step, swapped, model64, model, images, upstream, backend, name)


def test_the_rule_fails_on_a_wrong_swap(monkeypatch):
    """The parity test can fail: a kernel that forgets the scale is caught."""
    model, images = _build("timm_vit_tiny_patch16_224")
    with torch.no_grad():
        reference64 = _logits(copy.deepcopy(model).double().eval(), images)
        reference_low = _logits(model.eval(), images)
    swapped = copy.deepcopy(model)
    swap(swapped)
    original = dispatch.attention
    monkeypatch.setattr(dispatch, "attention", lambda q, k, v, *args, **kwargs: original(q, k, v, *args, **{**kwargs, "scale": 1.0}))
    with torch.no_grad(), kernels.use_backend("einsum"):
        actual = _logits(swapped.eval(), images)
    with pytest.raises(AssertionError, match="max error"):
        assert_close_to_reference(actual, reference64, reference_low)


# ---------------------------------------------------------------------------------------------
# In place: the same parameters, the same state dict; the report; undo; twice.


@pytest.mark.parametrize("name", list(CASES))
def test_state_dict_and_parameters_are_untouched(name):
    model, _ = _build(name)
    before = model.state_dict()
    parameters = dict(model.named_parameters())
    swap(model)
    after = model.state_dict()
    assert list(after) == list(before)
    for key, tensor in after.items():
        assert tensor.data_ptr() == before[key].data_ptr() and torch.equal(tensor, before[key]), key
    assert all(p is parameters[n] for n, p in model.named_parameters())
    model.load_state_dict(before)  # a checkpoint of the original loads as it is, strictly
    assert all(p is parameters[n] for n, p in model.named_parameters())


@pytest.mark.parametrize("undo", ["report", "unswap"])
@pytest.mark.parametrize("name", list(CASES))
def test_undo_restores_the_original_forwards_exactly(name, undo, kernel_calls):
    model, images = _build(name)
    with torch.no_grad():
        before = _logits(model.eval(), images)
    report = swap(model)
    restored = report.undo() if undo == "report" else unswap(model)
    assert set(report_paths := [e.path for e in report.replaced]) <= set(restored), (report_paths, restored)
    for path, module in model.named_modules():
        assert "_vitriton_swap" not in module.__dict__, path
        assert not {"forward", "_pos_embed", "__prepare_scriptable__"} & module.__dict__.keys(), path
    assert all(not getattr(m, "fused", False) for m in model.modules() if isinstance(m, (vit.MultiHeadAttention, vit.PatchEmbedding)))
    if hasattr(model, "config") and hasattr(model.config, "_attn_implementation"):
        assert model.config._attn_implementation == "sdpa"
    kernel_calls.clear()
    with torch.no_grad(), kernels.use_backend("einsum"):
        after = _logits(model, images)
    assert torch.equal(after, before)
    assert kernel_calls.get("patch_embed", 0) == 0
    assert kernel_calls.get("attention", 0) == (DEPTH if name == "vit" else 0)  # vit's unfused path, as built


@pytest.mark.parametrize("name", list(CASES))
def test_swapping_twice_is_harmless_and_says_so(name):
    model, images = _build(name)
    first = swap(model)
    with torch.no_grad(), kernels.use_backend("einsum"):
        once = _logits(model.eval(), images)
        second = swap(model)
        twice = _logits(model, images)
    assert second.replaced == []
    assert [e.path for e in second.already_swapped] == [e.path for e in first.replaced]
    assert "already swapped" in str(second)
    assert torch.equal(once, twice)
    assert second.undo() == []  # the second swap replaced nothing, so its undo restores nothing
    assert {e.path for e in first.replaced} <= set(first.undo())
    assert unswap(model) == []


def test_report_prints_what_it_did():
    model, _ = _build("timm_vit_tiny_patch16_224")
    text = str(swap(model))
    # The patch embedding's patch also takes over the model's own _pos_embed: 4 modules patched, as undo() returns.
    assert text.splitlines()[0] == "swap(VisionTransformer): 3 replaced (4 modules patched), 0 already swapped, 0 left alone"
    assert re.search(r"replaced\s+blocks\.0-1\.attn \(2\)\s+timm Attention -> kernels\.attention", text)
    assert re.search(
        r"replaced\s+patch_embed\s+timm PatchEmbed \+ cls_token \+ pos_embed -> kernels\.patch_embed .*; also patched: \(model\)$",
        text, flags=re.MULTILINE,
    )
    assert len(text.splitlines()) == 3


def _report_lines(report: SwapReport) -> list[tuple[str, ...]]:
    """The report's lines after the head, as (status, paths, the rest), cut at runs of two spaces."""
    return [tuple(re.split(r"\s{2,}", line.strip(), maxsplit=2)) for line in str(report).splitlines()[1:]]


def test_report_groups_consecutive_numbered_paths_with_the_same_note():
    report = SwapReport(nn.Identity(), token=object())
    attention = ("timm Attention", "-> kernels.attention")
    report.replaced += [SwapEntry(f"blocks.{i}.attn", *attention, (f"blocks.{i}.attn",)) for i in range(12)]
    report.replaced += [
        SwapEntry(path, "timm WindowAttention", note, (path,))
        for path, note in [
            ("layers.0.blocks.0.attn", "A"),
            ("layers.0.blocks.1.attn", "A"),
            ("layers.1.blocks.1.attn", "A"),  # counts up in another place: a run of its own
            ("layers.1.blocks.2.attn", "B"),  # another note
            ("layers.1.blocks.4.attn", "B"),  # not the next number
        ]
    ]
    report.left_alone += [
        SwapEntry(f"encoder.layers.encoder_layer_{i}.self_attention", "torch MultiheadAttention", "head dim 4") for i in range(3)
    ]
    assert str(report).splitlines()[0] == "swap(Identity): 17 replaced, 0 already swapped, 3 left alone"
    assert _report_lines(report) == [
        ("replaced", "blocks.0-11.attn (12)", "timm Attention -> kernels.attention"),
        ("replaced", "layers.0.blocks.0-1.attn (2)", "timm WindowAttention A"),
        ("replaced", "layers.1.blocks.1.attn", "timm WindowAttention A"),
        ("replaced", "layers.1.blocks.2.attn", "timm WindowAttention B"),
        ("replaced", "layers.1.blocks.4.attn", "timm WindowAttention B"),
        ("left alone", "encoder.layers.encoder_layer_0-2.self_attention (3)", "torch MultiheadAttention: head dim 4"),
    ]
    assert len(report.replaced) == 17 and len(report.left_alone) == 3  # the lists keep every entry


def test_report_names_what_else_a_patch_reaches_and_counts_it():
    # nn.TransformerEncoderLayer: its self_attn is what the report names, the layer is patched too.
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(WIDTH, HEADS, 2 * WIDTH, batch_first=True), 3)
    report = swap(model)
    assert str(report).splitlines()[0] == "swap(TransformerEncoder): 3 replaced (6 modules patched), 0 already swapped, 0 left alone"
    ((status, paths, rest),) = _report_lines(report)
    assert (status, paths) == ("replaced", "layers.0-2.self_attn (3)")
    assert rest.endswith("; also patched: layers.0-2 (3)")
    assert sorted(report.undo()) == sorted(f"layers.{i}{part}" for i in range(3) for part in ("", ".self_attn"))


@pytest.mark.parametrize("name", list(CASES))
def test_report_counts_what_undo_restores(name):
    # Before: "13 replaced" for a timm ViT, while undo() returned 14 paths (the model's own _pos_embed).
    model, _ = _build(name)
    report = swap(model)
    counted = re.match(r"swap\(\w+\): (\d+) replaced(?: \((\d+) modules patched\))?,", str(report))
    patched = [path for entry in report.replaced for path in entry.patched]
    assert all(entry.path in entry.patched for entry in report.replaced)
    assert int(counted[1]) == len(report.replaced)
    restored = report.undo()
    assert sorted(patched) == sorted(restored)
    assert int(counted[2] or counted[1]) == len(restored)


def test_kernels_swap_the_function_carries_its_modules_names():
    # kernels/__init__.py binds kernels.swap to the function, over the module's name; before, the
    # README's kernels.swap.TARGETS and kernels.swap.swap_table() were AttributeErrors.
    module = sys.modules["kernels.swap"]
    assert kernels.swap is module.swap
    for name in ("TARGETS", "SwapTarget", "SwapReport", "SwapEntry", "swap_table", "register_transformers_attention", "unswap"):
        assert getattr(kernels.swap, name) is getattr(module, name), name
    assert kernels.swap.swap_table().startswith("| library | module | becomes |")


def test_a_model_with_nothing_known_raises():
    with pytest.raises(ValueError, match=r"swap: found no attention or patch-embedding module it knows in Sequential; it knows timm"):
        swap(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    with pytest.raises(TypeError, match="expected a torch.nn.Module, got dict"):
        swap({})


def test_attention_false_leaves_attention_alone():
    model, _ = _build("timm_vit_tiny_patch16_224")
    report = swap(model, attention=False)
    assert [e.path for e in report.replaced] == ["patch_embed"]
    assert [(e.path, e.note) for e in report.left_alone] == [
        ("blocks.0.attn", "not asked (attention=False or patch_embed=False)"),
        ("blocks.1.attn", "not asked (attention=False or patch_embed=False)"),
    ]


@pytest.mark.parametrize(
    "options, reason",
    [
        ({"dynamic_img_size": True}, "dynamic_img_size=True"),
    ],
)
def test_timm_patch_embedding_it_cannot_fuse_exactly_is_left_alone(options, reason, kernel_calls):
    torch.manual_seed(0)
    model = _timm("vit_tiny_patch16_224", **options).to(DEVICE).eval()
    images = torch.randn(BATCH, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        reference64 = _logits(copy.deepcopy(model).double(), images)
        reference_low = _logits(model, images)
    report = swap(model)
    assert [e.path for e in report.replaced] == ["blocks.0.attn", "blocks.1.attn"]
    [left] = report.left_alone
    assert left.path == "patch_embed" and reason in left.note
    kernel_calls.clear()
    with torch.no_grad(), kernels.use_backend("einsum"):
        actual = _logits(model, images)
    assert kernel_calls == {"attention": DEPTH}
    assert_close_to_reference(actual, reference64, reference_low)


# Bad input: one line (tests/*/test_robustness.py hold the other public functions to the same).


def test_swap_bad_input_is_a_one_line_error():
    one_line_error(TypeError, "^swap: expected a torch.nn.Module, got list", kernels.swap, [])
    message = one_line_error(ValueError, "^swap: found no attention or patch-embedding module it knows in Linear",
                             kernels.swap, nn.Linear(2, 2))
    assert "; it knows timm " in message and "timm Attention," in message and "vit MultiHeadAttention" in message


# ---------------------------------------------------------------------------------------------
# timm Attention: the signature, masks, causal, dropout.


def test_timm_attention_mirrors_the_forward_signature():
    pytest.importorskip("timm")
    from timm.layers.attention import Attention

    from kernels.swap.timm import timm_attention_forward

    assert list(inspect.signature(Attention.forward).parameters) == list(inspect.signature(timm_attention_forward).parameters)


@pytest.mark.parametrize("mask_kind", ["bool", "float", "causal"])
def test_timm_attention_honours_attn_mask_and_is_causal(mask_kind, kernel_calls):
    model, images = _build("timm_vit_tiny_patch16_224")
    model.eval()
    n = 5  # 4 patches and the class token
    generator = torch.Generator(DEVICE).manual_seed(2)
    if mask_kind == "bool":
        mask = torch.rand(BATCH, 1, n, n, generator=generator, device=DEVICE) > 0.4
        mask |= torch.eye(n, dtype=torch.bool, device=DEVICE)  # every query keeps one key
        arguments = {"attn_mask": mask}
    elif mask_kind == "float":
        arguments = {"attn_mask": torch.randn(BATCH, 1, n, n, generator=generator, device=DEVICE)}
    else:
        arguments = {"is_causal": True}
    with torch.no_grad():
        arguments64 = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in arguments.items()}
        reference64 = _logits(copy.deepcopy(model).double(), images, **arguments64)
        reference_low = _logits(model, images, **arguments)
        unmasked = _logits(model, images)
        swap(model)
        with kernels.use_backend("einsum"):
            actual = _logits(model, images, **arguments)
    assert_close_to_reference(actual, reference64, reference_low)
    assert not torch.allclose(actual, unmasked, atol=1e-4)  # the mask changed something
    with pytest.raises(ValueError, match="either attn_mask or is_causal=True, got both"):
        model.blocks[0].attn(torch.randn(1, n, WIDTH, device=DEVICE), attn_mask=torch.ones(n, n, dtype=torch.bool, device=DEVICE), is_causal=True)


@pytest.mark.parametrize(
    "build",
    [
        lambda: _timm("vit_tiny_patch16_224", attn_drop_rate=0.25),
        lambda: _torchvision(attention_dropout=0.25),
        lambda: _transformers(attention_probs_dropout_prob=0.25),
        lambda: _vit(attn_dropout=0.25),
    ],
    ids=["timm", "torchvision", "transformers", "vit"],
)
def test_attention_dropout_probability_in_training_only(build, kernel_calls):
    torch.manual_seed(0)
    model = build().to(DEVICE)
    swap(model)
    images = torch.randn(BATCH, 3, 32, 32, device=DEVICE)
    with kernels.use_backend("einsum"):
        model.train()(images)
        model.eval()(images)
    assert kernel_calls.dropouts == [0.25] * DEPTH + [0.0] * DEPTH


# ---------------------------------------------------------------------------------------------
# torch.nn.MultiheadAttention: the kernel for torchvision's call, the original for any other.


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_self_attention_goes_through_the_kernel(batch_first, kernel_calls):
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(WIDTH, HEADS, batch_first=batch_first).to(DEVICE).eval()
    x = torch.randn(BATCH, 5, WIDTH, device=DEVICE)
    x = x if batch_first else x.transpose(0, 1)
    with torch.no_grad():
        reference64, _ = copy.deepcopy(attention).double()(x.double(), x.double(), x.double(), need_weights=False)
        reference_low, _ = attention(x, x, x, need_weights=False)
        swap(attention)
        with kernels.use_backend("einsum"):
            actual, weights = attention(x, x, x, need_weights=False)
    assert weights is None and kernel_calls == {"attention": 1}
    assert_close_to_reference(actual, reference64, reference_low)


def test_multihead_attention_calls_that_want_weights_run_the_original(kernel_calls):
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True).to(DEVICE).eval()
    original = copy.deepcopy(attention)
    x = torch.randn(BATCH, 5, WIDTH, device=DEVICE)
    swap(attention)
    with torch.no_grad():
        for args, kwargs in [
            ((x, x, x), {}),  # need_weights=True by default: the weights come back
            ((x[0], x[0], x[0]), {"need_weights": False}),  # unbatched
        ]:
            for got, want in zip(attention(*args, **kwargs), original(*args, **kwargs)):
                assert (got is None and want is None) or torch.equal(got, want)
    assert kernel_calls == {}


@pytest.mark.parametrize("call", ["attn_mask_bool", "attn_mask_float_3d", "key_padding_mask", "both", "cross", "causal"])
def test_multihead_attention_masks_and_cross_attention_go_through_the_kernel(call, kernel_calls):
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(WIDTH, HEADS, batch_first=False).to(DEVICE).eval()
    x, y = torch.randn(5, BATCH, WIDTH, device=DEVICE), torch.randn(7, BATCH, WIDTH, device=DEVICE)
    key = y if call == "cross" else x
    n_k = key.shape[0]
    bool_mask = (torch.rand(5, n_k, device=DEVICE) > 0.5).fill_diagonal_(False)  # True = may NOT attend, here
    padding = torch.tensor([[False] * n_k, [False] * (n_k - 2) + [True] * 2], device=DEVICE)
    kwargs = {
        "attn_mask_bool": {"attn_mask": bool_mask},
        "attn_mask_float_3d": {"attn_mask": torch.randn(BATCH * HEADS, 5, n_k, device=DEVICE)},
        "key_padding_mask": {"key_padding_mask": padding},
        "both": {"attn_mask": bool_mask, "key_padding_mask": padding},
        "cross": {},
        "causal": {"attn_mask": nn.Transformer.generate_square_subsequent_mask(5, device=DEVICE), "is_causal": True},
    }[call]
    with torch.no_grad():
        as64 = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()}
        reference64, _ = copy.deepcopy(attention).double()(x.double(), key.double(), key.double(), need_weights=False, **as64)
        reference_low, _ = attention(x, key, key, need_weights=False, **kwargs)
        swap(attention)
        with kernels.use_backend("einsum"):
            actual, weights = attention(x, key, key, need_weights=False, **kwargs)
    assert weights is None and kernel_calls == {"attention": 1}
    assert_close_to_reference(actual, reference64, reference_low)


def test_transformer_encoder_layer_fast_path_runs_our_kernel(kernel_calls):
    """In eval under no_grad PyTorch's fused fast path would skip self_attn; swapped, it does not."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(WIDTH, HEADS, 2 * WIDTH, dropout=0.0, batch_first=True).to(DEVICE).eval()
    x = torch.randn(BATCH, 5, WIDTH, device=DEVICE)
    with torch.no_grad():
        reference64 = copy.deepcopy(layer).double()(x.double())
        reference_low = layer(x)
        report = swap(layer)
        assert [(e.path, e.kind) for e in report.replaced] == [("self_attn", "torch TransformerEncoderLayer")]
        with kernels.use_backend("einsum"):
            actual = layer(x)
    assert kernel_calls == {"attention": 1}
    assert_close_to_reference(actual, reference64, reference_low)
    report.undo()
    assert "activation_relu_or_gelu" not in layer.__dict__ or layer.activation_relu_or_gelu


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers.


def test_transformers_attn_implementation_vitriton_at_construction(kernel_calls):
    transformers = pytest.importorskip("transformers")
    assert register_transformers_attention() == HF_ATTENTION_NAME
    torch.manual_seed(0)
    reference = transformers.ViTForImageClassification(_transformers_config()).to(DEVICE).eval()
    model = transformers.ViTForImageClassification(_transformers_config(attn_implementation="vitriton")).to(DEVICE).eval()
    model.load_state_dict(reference.state_dict())
    assert model.config._attn_implementation == "vitriton"
    images = torch.randn(BATCH, 3, 32, 32, device=DEVICE)
    # A padding mask over the 5 tokens: transformers builds it with the "vitriton" mask interface.
    padding = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], device=DEVICE)
    with torch.no_grad(), kernels.use_backend("einsum"):
        for kwargs in ({}, {"attention_mask": padding}):
            reference64 = _logits(copy.deepcopy(reference).double(), images, **kwargs)
            reference_low = _logits(reference, images, **kwargs)
            kernel_calls.clear()
            assert_close_to_reference(_logits(model, images, **kwargs), reference64, reference_low)
            assert kernel_calls == {"attention": DEPTH}  # only attention: the embeddings were not swapped
        assert not torch.allclose(_logits(model, images, attention_mask=padding), _logits(model, images), atol=1e-4)


def test_transformers_interpolated_positions_run_the_original_embeddings(kernel_calls):
    model, _ = _build("transformers_vit")
    model.eval()
    images = torch.randn(BATCH, 3, 48, 64, device=DEVICE)
    with torch.no_grad():
        reference64 = _logits(copy.deepcopy(model).double(), images, interpolate_pos_encoding=True)
        reference_low = _logits(model, images, interpolate_pos_encoding=True)
        swap(model)
        kernel_calls.clear()
        with kernels.use_backend("einsum"):
            actual = _logits(model, images, interpolate_pos_encoding=True)
    assert kernel_calls == {"attention": DEPTH}
    assert_close_to_reference(actual, reference64, reference_low)
    with pytest.raises(ValueError, match=r"Input image size \(48\*64\) doesn't match model \(32\*32\)"):
        model(images)


def test_transformers_attention_rejects_what_it_cannot_compute():
    from kernels.swap.transformers import transformers_attention

    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="expected no softcap, got one"):
        transformers_attention(nn.Module(), q, q, q, None, softcap=30.0)


def test_transformers_is_not_fooled_by_our_kernels_package(tmp_path, monkeypatch):
    """transformers asks `is_kernels_available()` before using the Hub's `kernels` library; ours must not pass.

    Ours has the same import name, so transformers finds it; it then reads the version of the
    distribution that provides it and wants KERNELS_MIN_VERSION <= version < KERNELS_MAX_VERSION.
    Run from a checkout there is no distribution (version "N/A"); installed, it is vitriton's.
    """
    pytest.importorskip("transformers")
    from transformers.utils import import_utils

    def is_kernels_available() -> bool:
        import_utils.is_kernels_available.cache_clear()
        import_utils._package_distribution_mapping.cache_clear()
        return import_utils.is_kernels_available()

    try:
        assert not is_kernels_available()
        # Installed: a dist-info saying that vitriton (at setup.py's version) provides `kernels`.
        version = re.search(r'version="([^"]+)"', (Path(__file__).parents[2] / "setup.py").read_text())[1]
        info = tmp_path / f"vitriton-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vitriton\nVersion: {version}\n")
        (info / "top_level.txt").write_text("kernels\nvit\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        import_utils._package_distribution_mapping.cache_clear()
        assert import_utils._is_package_available("kernels", return_version=True) == (True, version)
        assert not is_kernels_available()
    finally:
        monkeypatch.undo()
        is_kernels_available()  # leave the caches as transformers would fill them


# ---------------------------------------------------------------------------------------------
# vit's own modules, copies, torch.compile.


def test_vit_built_fused_is_already_swapped():
    model = vit.ViT(fused=True, image_size=32, patch_size=16, embed_dim=WIDTH, depth=1, num_heads=HEADS)
    report = swap(model)
    assert report.replaced == []
    assert [(e.path, e.note) for e in report.already_swapped] == [
        ("patch_embed", "built with fused=True"),
        ("blocks.0.attn", "built with fused=True"),
    ]


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_swapped_model_copies_and_stays_swapped(how, kernel_calls):
    model, images = _build("timm_vit_tiny_patch16_224")
    swap(model)
    clone = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    # The copy's patch embedding reads the copy's class token, not the original's.
    assert clone.patch_embed.forward.module_ref() is clone
    with torch.no_grad(), kernels.use_backend("einsum"):
        assert torch.equal(_logits(clone.eval(), images), _logits(model.eval(), images))
    assert kernel_calls == {"attention": 2 * DEPTH, "patch_embed": 2}
    assert set(unswap(clone)) == {"", "patch_embed", "blocks.0.attn", "blocks.1.attn"}


@pytest.mark.parametrize("name", ["timm_vit_tiny_patch16_224", "torchvision_vit_b_16", "transformers_vit"])
def test_torch_compile_traces_the_swapped_forward(name):
    model, images = _build(name)
    model.eval()
    swap(model)
    torch._dynamo.reset()
    with torch.no_grad(), kernels.use_backend("einsum"):
        eager = _logits(model, images)
        compiled = _logits(torch.compile(model, backend="eager", fullgraph=True), images)
    torch.testing.assert_close(compiled, eager)


def _timm_scriptable() -> nn.Module:
    timm = pytest.importorskip("timm")
    with timm.layers.set_scriptable(True):  # as timm's own test_model_forward_torchscript builds them
        return _timm("vit_tiny_patch16_224")


SCRIPTABLE = {  # models whose unswapped form torch.jit.script compiles, and an input
    "timm_vit_tiny_patch16_224": (_timm_scriptable, (BATCH, 3, 32, 32)),
    "torchvision_vit_b_16": (_torchvision, (BATCH, 3, 32, 32)),
    "torch_transformer_encoder_layer": (
        lambda: nn.TransformerEncoderLayer(WIDTH, HEADS, 2 * WIDTH, dropout=0.0, batch_first=True), (BATCH, 5, WIDTH)
    ),
    "vit": (_vit, (BATCH, 3, 32, 32)),
}


@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning")
@pytest.mark.parametrize("name", list(SCRIPTABLE))
def test_torch_jit_script_of_a_swapped_model_says_why_and_what_instead(name):
    # Before: AttributeError: 'BoundForward' object has no attribute '__globals__', from inside
    # torch.jit. The swapped forwards call our Python dispatch, which TorchScript cannot compile.
    build, shape = SCRIPTABLE[name]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(shape)
    torch.jit.script(model)  # unswapped, it scripts
    report = swap(model)
    expected = r"swapped by kernels\.swap: torch\.jit\.script cannot compile .* use torch\.compile, or kernels\.unswap\(model\)"
    with pytest.raises(RuntimeError, match=expected) as error:
        torch.jit.script(model)
    assert "\n" not in str(error.value)
    with pytest.raises(RuntimeError, match=expected):  # a swapped part alone, too
        torch.jit.script(model.get_submodule(report.replaced[-1].path))
    unswap(model)
    assert all("__prepare_scriptable__" not in m.__dict__ for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(model)(x), model(x))


@pytest.mark.parametrize("is_causal", [False, True])
def test_transformers_attention_grouped_query_heads_match_sdpa(is_causal):
    # Text models in transformers pass fewer key/value heads (GQA); ours must answer as SDPA's wrapper.
    pytest.importorskip("transformers")
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from kernels.swap.transformers import transformers_attention

    module = nn.Module()
    module.is_causal, module.num_key_value_groups = is_causal, 3
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 6, 5, 16, dtype=torch.float64, generator=generator)
    key, value = (torch.randn(2, 2, 5, 16, dtype=torch.float64, generator=generator) for _ in range(2))
    ours, _ = transformers_attention(module, query, key, value, None, scaling=0.3)
    theirs, _ = sdpa_attention_forward(module, query, key, value, None, scaling=0.3)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
