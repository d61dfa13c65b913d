"""Real weights in the main job (vit/pretrained.py, ``python -m vit --pretrained / --weights``),
and the preprocessing they need (vit/image.py's ``load_image_center_crop`` and ``normalize``).

No network: the checkpoints are saved here from a random timm model, and ``--pretrained`` is
run once against an empty, offline hub cache. The logits the main job computes are compared
with timm's own on the shipped cat, prepared by timm's own transform.
"""

from __future__ import annotations

import importlib
import math
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from vit import pretrained
from vit.image import CAT_PATH, load_image, load_image_center_crop, normalize
from vit.model import PRESETS, ViT
from vit.timm_weights import to_timm_state_dict

timm = pytest.importorskip("timm")

vit_main = importlib.import_module("vit.__main__")
ROOT = Path(__file__).resolve().parents[2]
TINY = "vit_tiny_patch16_224"  # the smallest preset with timm weights (192 wide, 12 blocks)


def timm_transform(model: torch.nn.Module):
    """timm's documented inference preprocessing for ``model``."""
    return timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)


@pytest.fixture(scope="module")
def timm_tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(TINY, pretrained=False).eval()
    with torch.no_grad():
        # timm starts the class token near zero and every bias at zero: give each tensor a
        # visible value, so a misplaced one changes the logits; and a head wide enough that
        # the top-5 probabilities stand apart (random weights give ~0.001 each otherwise).
        for name, tensor in model.named_parameters():
            if name in ("cls_token", "pos_embed") or name.endswith("bias"):
                tensor.normal_(std=0.02)
        model.head.weight.mul_(100)
    return model


@pytest.fixture(scope="module")
def timm_logits(timm_tiny) -> torch.Tensor:
    """timm's logits for the cat, prepared by timm's transform: (1, 1000)."""
    with Image.open(CAT_PATH) as image:
        images = timm_transform(timm_tiny)(image.convert("RGB"))[None]  # (1, 3, 224, 224)
    with torch.no_grad():
        return timm_tiny(images)


def save_checkpoint(state_dict: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        safetensors_torch = pytest.importorskip("safetensors.torch")
        safetensors_torch.save_file(state_dict, path)
    else:
        torch.save(state_dict, path)
    return path


def run_main(monkeypatch, capsys, *arguments: str) -> tuple[int, str, str, list[torch.Tensor]]:
    """main() in this process: (exit status, stdout, stderr, the logits of each forward_head call)."""
    logits = []
    forward_head = ViT.forward_head

    def recording_forward_head(self, tokens):
        logits.append(forward_head(self, tokens))
        return logits[-1]

    monkeypatch.setattr(ViT, "forward_head", recording_forward_head)
    # main() runs on CUDA where it can: these checks are of the weights and the printout on the CPU path,
    # also on a GPU machine (where the logits would come from CUDA and the report would differ).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = vit_main.main([*arguments, "--backend", "einsum"])
    out, err = capsys.readouterr()
    return code, out, err, logits


def top5_lines(logits: torch.Tensor) -> list[tuple[float, str]]:
    names = timm.data.ImageNetInfo()
    top = logits.softmax(-1).topk(5)
    return [(p, names.index_to_description(i)) for p, i in zip(top.values.tolist(), top.indices.tolist())]


def printed_top5(out: str) -> list[tuple[float, str]]:
    block = out.split("top-5 ImageNet classes:\n")[1].splitlines()[:5]
    return [(float(line.split()[0]), line.split(maxsplit=1)[1]) for line in block]


# ---------------------------------------------------------------------------------------------
# 1. --weights: each format, timm's names or ours, gives timm's logits and names.


@pytest.mark.parametrize("filename", ["timm.safetensors", "timm.pth", "timm.bin", "vit.pth", "--pretrained"])
def test_real_weights_give_timms_logits_on_the_cat(monkeypatch, capsys, tmp_path, timm_tiny, timm_logits, filename):
    """A checkpoint in each format, and --pretrained with timm's model at hand (no download)."""
    if filename == "--pretrained":

        def create_model(name, pretrained):
            assert (name, pretrained) == (TINY, True)
            return timm_tiny

        monkeypatch.setattr(timm, "create_model", create_model)
        arguments, loaded = ["--pretrained"], "loaded timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k in "
    else:
        state_dict = timm_tiny.state_dict()
        if filename.startswith("vit"):  # ours: the class token and position embedding inside patch_embed
            state_dict = {("patch_embed." + k if k in ("cls_token", "pos_embed") else k): v for k, v in state_dict.items()}
        path = save_checkpoint(state_dict, tmp_path / filename)
        names = "timm's names" if filename.startswith("timm") else "vit's names"
        arguments, loaded = ["--weights", str(path)], f"loaded {path} ({names}) in "
    code, out, err, logits = run_main(monkeypatch, capsys, "--model", TINY, *arguments)
    assert code == 0 and err == "", err
    assert loaded in out
    assert "1. image " + str(CAT_PATH) + ": (1, 3, 224, 224)" in out
    torch.testing.assert_close(logits[0], timm_logits, rtol=1e-4, atol=1e-4)
    expected = top5_lines(timm_logits[0])
    printed = printed_top5(out)
    assert [name for _, name in printed] == [name for _, name in expected]
    assert [p for p, _ in printed] == pytest.approx([p for p, _ in expected], abs=1e-4)
    assert re.search(r"\ntime per forward \(batch 1, one forward on the CPU\): [\d.]+ ms\n", out)


def test_the_comparison_has_teeth_without_timms_normalisation(timm_tiny, timm_logits):
    """The tutorial's preparation (resize to [0, 1], no mean and std) moves timm's own logits far
    beyond the tolerance above: that test fails if --weights skips the pretrained preprocessing."""
    with torch.no_grad():
        plain = timm_tiny(load_image(CAT_PATH, 224))
    assert (plain - timm_logits).abs().max() > 1.0


def test_a_fused_top5_unlike_the_references_is_named():
    """The check the main job makes on CUDA with real weights, on made-up logits."""
    reference = torch.arange(10.0).repeat(3, 1)  # (3, 10): classes 9, 8, 7, 6, 5 in that order
    assert vit_main.top5_disagreement(reference.clone(), reference) is None
    swapped = reference.clone()
    swapped[2, [6, 5]] = swapped[2, [5, 6]]  # image 2 ranks class 5 above class 6
    assert vit_main.top5_disagreement(swapped, reference) == (
        "image 2 of the batch: the fused top-5 classes [9, 8, 7, 5, 6] differ from the reference's [9, 8, 7, 6, 5]"
    )


def test_packed_images_with_weights_print_names(monkeypatch, capsys, tmp_path, timm_tiny, timm_logits):
    """Two cats in one packed sequence, each prepared as the pretrained model expects: each gets timm's answer."""
    path = save_checkpoint(timm_tiny.state_dict(), tmp_path / "tiny.pth")
    code, out, err, _ = run_main(monkeypatch, capsys, str(CAT_PATH), str(CAT_PATH), "--model", TINY, "--weights", str(path))
    assert code == 0 and err == "", err
    expected = [name for _, name in top5_lines(timm_logits[0])]
    blocks = out.split("top-5 ImageNet classes:\n")[1:]
    assert len(blocks) == 2
    for block in blocks:
        assert [line.split(maxsplit=1)[1] for line in block.splitlines()[:5]] == expected


# ---------------------------------------------------------------------------------------------
# 2. Weights that cannot be had, or do not fit: one line on stderr, exit status 2.


@pytest.mark.slow
@pytest.mark.subprocess
def test_pretrained_without_the_hub_is_one_line(tmp_path):
    """An empty cache and HF_HUB_OFFLINE=1: what a machine without network sees, at once."""
    environment = {
        **os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path), "HF_HUB_CACHE": str(tmp_path / "hub"), "TORCH_HOME": str(tmp_path / "torch"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "vit", "--model", TINY, "--pretrained", "--backend", "einsum"],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("\n") == 1, result.stderr[-3000:]
    assert re.fullmatch(
        r"python -m vit: timm could not load its pretrained timm/vit_tiny_patch16_224\.augreg_in21k_ft_in1k "
        rf"\(LocalEntryNotFoundError: .*\); HF_HUB_OFFLINE is set and the hub cache {re.escape(str(tmp_path / 'hub'))} "
        r"has no copy: run once online without it, or give a checkpoint file \(--weights FILE\)\n",
        result.stderr,
    ), result.stderr
    assert result.stdout.startswith("loading timm's pretrained vit_tiny_patch16_224 ")


@pytest.mark.parametrize("flag", [["--pretrained"], ["--weights", "tiny.pth"]])
def test_real_weights_without_timm_is_one_line(monkeypatch, capsys, flag):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    code, _, err, _ = run_main(monkeypatch, capsys, "--model", TINY, *flag)
    assert code == 2
    assert err == (
        "python -m vit: real weights need timm (the hub download, each model's preprocessing and the ImageNet "
        "class names), which is not installed: pip install timm\n"
    )


@pytest.mark.parametrize(
    "model, message",
    [
        ("vit_tutorial_patch16_224", (r"timm has no pretrained weights for vit_tutorial_patch16_224; it has them for "
                                     r"vit_tiny_patch16_224, .*")),
        ("vit_huge_patch14_224", (r"timm's pretrained timm/vit_huge_patch14_224\.orig_in21k has 0 classes \(a backbone "
                                 r"without an ImageNet head\), vit_huge_patch14_224 has 1000: pick a preset with ImageNet weights")),
    ],
)
def test_presets_without_imagenet_weights_are_refused_before_any_download(monkeypatch, capsys, model, message):
    def no_download(*args, **kwargs):
        raise AssertionError("timm.create_model was called")

    monkeypatch.setattr(timm, "create_model", no_download)
    code, _, err, _ = run_main(monkeypatch, capsys, "--model", model, "--pretrained")
    assert code == 2
    assert re.fullmatch(f"python -m vit: {message}\n", err), err


def test_every_preset_with_imagenet_weights_is_timms_model(monkeypatch):
    """--pretrained refuses a timm model that differs from the preset in any option: none does.
    The models are built on the meta device, without weights (nothing is downloaded)."""
    create_model = timm.create_model

    def create_model_on_meta(name, pretrained):
        with torch.device("meta"):
            return create_model(name, pretrained=False)

    monkeypatch.setattr(timm, "create_model", create_model_on_meta)
    for name, config in PRESETS.items():
        pretrained_cfg = timm.models.get_pretrained_cfg(name)
        if pretrained_cfg is None or pretrained_cfg.num_classes != 1000:
            continue  # refused before any download: the test below
        weights = pretrained.load_pretrained(name)
        assert weights.source == pretrained_cfg.hf_hub_id
        assert weights.preprocessing.image_size == config.image_size
        assert len(weights.class_names) == config.num_classes


def test_weights_of_another_shape_name_the_first_mismatch(monkeypatch, capsys, tmp_path, timm_tiny):
    state_dict = {**timm_tiny.state_dict(), "blocks.3.mlp.fc1.weight": torch.zeros(10, 192)}
    path = save_checkpoint(state_dict, tmp_path / "odd.pth")
    code, _, err, _ = run_main(monkeypatch, capsys, "--model", TINY, "--weights", str(path))
    assert code == 2
    assert err == (
        f"python -m vit: checkpoint {path} (timm's names): expected blocks.3.mlp.fc1.weight of shape (768, 192), "
        "got (10, 192)\n"
    )
    # A one-block model's checkpoint: the names it lacks, the first three and a count, on one line.
    path = save_checkpoint(timm.create_model("vit_small_patch16_224", depth=1).state_dict(), tmp_path / "small.pth")
    code, _, err, _ = run_main(monkeypatch, capsys, "--model", TINY, "--weights", str(path))
    assert code == 2
    assert err == (
        f"python -m vit: checkpoint {path} (timm's names): the state dict does not fit this ViTConfig: missing "
        "['blocks.1.norm1.weight', 'blocks.1.norm1.bias', 'blocks.1.attn.qkv.weight'] and 129 more, unexpected none\n"
    )


def _write(path: Path, content) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    return path


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.pth", None, "no checkpoint file at {path}"),
        ("weights.npz", b"", "expected a checkpoint file ending in .safetensors, .pth, .pt, .bin, got {path}"),
        ("garbage.pth", b"not a pickle",
         (r"not a loadable checkpoint: {path} \(neither the zip archive nor the pickle that torch.save writes\); "
          r"expected a state dict of tensors saved by torch.save \(.pth, .pt, .bin\) or safetensors \(.safetensors\)")),
        ("empty.pth", b"", r"not a loadable checkpoint: {path} \(an empty file\); expected a state dict of tensors .*"),
        ("garbage.safetensors", b"\x00" * 16, r"not a .safetensors file safetensors can read: {path} \(.*\)"),
        ("training.pth", {"model": {}, "epoch": 3},
         r"expected a state dict \(parameter names to tensors\) in {path}, got a dict with keys \['model', 'epoch'\]"),
        ("other.pth", {"encoder.weight": torch.zeros(2)},
         (r"checkpoint {path}: expected a ViT state dict of timm's \(pos_embed\) or vit's \(patch_embed.pos_embed\), "
         r"got names \['encoder.weight'\]")),
    ],
)
def test_unreadable_checkpoints_are_one_line(monkeypatch, capsys, tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        _write(path, content)
    code, _, err, _ = run_main(monkeypatch, capsys, "--model", TINY, "--weights", str(path))
    assert code == 2
    assert re.fullmatch("python -m vit: " + message.format(path=re.escape(str(path))) + "\n", err), err


ACCEPTED = "expected a state dict of tensors saved by torch.save (.pth, .pt, .bin) or safetensors (.safetensors)"


def _not_a_checkpoint(kind: str, path: Path, timm_tiny) -> str:
    """Write a .pth file holding something else; the reason the one line gives for it."""
    if kind == "safetensors":  # timm's tiny state dict as safetensors: torch.load raised KeyError: 53
        safetensors_torch = pytest.importorskip("safetensors.torch")
        path.write_bytes(safetensors_torch.save(timm_tiny.state_dict()))
        return "it holds a safetensors file: rename it to end in .safetensors"
    if kind == "text":  # torch.load raised KeyError: 101
        path.write_text("here are the weights\n")
        return "neither the zip archive nor the pickle that torch.save writes"
    if kind == "plain pickle":  # torch warned "Detected pickle protocol 4" and advised weights_only=False
        path.write_bytes(pickle.dumps({"pos_embed": [0.0, 1.0]}, protocol=4))
        return "a pickle the weights-only unpickler cannot read: Unsupported operand 149"
    torch.save(torch.nn.Linear(2, 2), path)  # a whole module: torch advised weights_only=False
    return (
        "it pickles a torch.nn.modules.linear.Linear, and only tensors and plain containers load without "
        "running pickled code"
    )


@pytest.mark.parametrize("kind", ["safetensors", "text", "plain pickle", "module"])
def test_a_pth_file_holding_something_else_is_one_line_of_ours(monkeypatch, capsys, recwarn, tmp_path, timm_tiny, kind):
    """Before: a KeyError traceback (safetensors or text under .pth), or torch's warning and its
    advice to load with weights_only=False, which would run whatever code the pickle carries."""
    path = tmp_path / "tiny.pth"
    reason = _not_a_checkpoint(kind, path, timm_tiny)
    code, _, err, _ = run_main(monkeypatch, capsys, "--model", TINY, "--weights", str(path))
    assert code == 2
    assert err == f"python -m vit: not a loadable checkpoint: {path} ({reason}); {ACCEPTED}\n"
    assert [str(warning.message) for warning in recwarn if "pickle" in str(warning.message)] == []


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_plain_pickle_is_one_line_on_stderr_with_no_warning_and_no_advice(tmp_path, timm_tiny):
    """The same through the command line: stderr holds our line, not torch's warning before it."""
    path = tmp_path / "tiny.pth"
    reason = _not_a_checkpoint("plain pickle", path, timm_tiny)
    result = subprocess.run(
        [sys.executable, "-m", "vit", "--model", TINY, "--weights", str(path), "--backend", "einsum"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr == f"python -m vit: not a loadable checkpoint: {path} ({reason}); {ACCEPTED}\n"
    assert "weights_only" not in result.stderr


def test_a_safetensors_file_holding_a_torch_checkpoint_says_so(monkeypatch, capsys, tmp_path, timm_tiny):
    path = save_checkpoint(timm_tiny.state_dict(), tmp_path / "tiny.pth").rename(tmp_path / "tiny.safetensors")
    code, _, err, _ = run_main(monkeypatch, capsys, "--model", TINY, "--weights", str(path))
    assert code == 2
    assert err == (
        f"python -m vit: not a .safetensors file safetensors can read: {path} "
        "(it holds a torch.save checkpoint: rename it to end in .pth)\n"
    )


def test_an_empty_weights_name_is_one_line(monkeypatch, capsys):
    """Before: "got ." (Path("") is the current directory)."""
    code, _, err, _ = run_main(monkeypatch, capsys, "--model", TINY, "--weights", "")
    assert code == 2
    assert err == (
        "python -m vit: expected a checkpoint file ending in .safetensors, .pth, .pt, .bin, got an empty file name\n"
    )


@pytest.mark.parametrize(
    "filename, name, values, found",
    [
        ("timm.pth", "pos_embed", [math.nan], "1 NaN"),
        ("timm.safetensors", "blocks.2.mlp.fc1.bias", [math.inf, -math.inf, math.nan], "1 NaN and 2 inf"),
        ("vit.pth", "patch_embed.cls_token", [math.inf], "1 inf"),
        ("--pretrained", "head.weight", [math.nan, math.nan], "2 NaN"),
    ],
)
def test_weights_that_are_not_finite_are_refused_naming_the_tensor(
    monkeypatch, capsys, tmp_path, timm_tiny, filename, name, values, found
):
    """Before: a top-5 of nan probabilities and exit status 0."""
    state_dict = {key: tensor.clone() for key, tensor in timm_tiny.state_dict().items()}
    if filename.startswith("vit"):
        state_dict = {("patch_embed." + k if k in ("cls_token", "pos_embed") else k): v for k, v in state_dict.items()}
    state_dict[name].view(-1)[: len(values)] = torch.tensor(values)
    if filename == "--pretrained":
        model = timm.create_model(TINY, pretrained=False)
        model.load_state_dict(state_dict)
        monkeypatch.setattr(timm, "create_model", lambda *args, **kwargs: model)
        arguments, where = ["--pretrained"], "timm's pretrained timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    else:
        path = save_checkpoint(state_dict, tmp_path / filename)
        arguments, where = ["--weights", str(path)], f"checkpoint {path}"
    code, out, err, _ = run_main(monkeypatch, capsys, "--model", TINY, *arguments)
    assert code == 2, out
    numel = state_dict[name].numel()
    assert err == f"python -m vit: {where}: expected finite weights, got {found} of {numel} values in {name}\n"
    assert "top-5" not in out

def test_safetensors_without_the_package_is_one_line(monkeypatch, capsys, tmp_path):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "safetensors", None)
    code, _, err, _ = run_main(monkeypatch, capsys, "--model", TINY, "--weights", str(path))
    assert code == 2
    assert err == f"python -m vit: reading {path} needs the safetensors package: pip install safetensors\n"


def test_pretrained_and_weights_together_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        vit_main.main(["--pretrained", "--weights", "tiny.pth"])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# 3. The preprocessing: timm's evaluation transform, exactly.


@pytest.mark.parametrize("size", [(224, 224), (171, 301), (400, 257)], ids=["square", "wide", "tall"])
@pytest.mark.parametrize("preset", [TINY, "vit_tiny_patch16_384"])
def test_preprocessing_equals_timms_transform(tmp_path, size, preset):
    path = tmp_path / "photo.png"
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (*size, 3), dtype=torch.uint8, generator=generator)
    Image.fromarray(pixels.numpy()).save(path)
    config = timm.data.resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg(preset).to_dict())
    with Image.open(path) as image:
        expected = timm.data.create_transform(**config)(image.convert("RGB"))[None]
    preprocessing = pretrained.Preprocessing.from_timm(config)
    assert preprocessing == pretrained.Preprocessing(
        image_size=config["input_size"][-1], crop_pct=config["crop_pct"], interpolation="bicubic",
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
    )
    assert torch.equal(preprocessing.load(path), expected)


def test_normalize_is_torchvisions_normalize():
    torchvision_transforms = pytest.importorskip("torchvision.transforms")
    images = torch.rand(2, 3, 8, 8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    assert torch.equal(normalize(images, mean, std), torchvision_transforms.Normalize(mean, std)(images))
    with pytest.raises(ValueError, match=r"normalize: expected images \(B, C, H, W\) and C values each of mean and std, "
                                         r"got images \(2, 3, 8, 8\), 2 means and 3 stds"):
        normalize(images, (0.5, 0.5), std)
    with pytest.raises(ValueError, match=r"normalize: expected a nonzero std for every channel, got \(1, 0, 1\)"):
        normalize(images, mean, (1, 0, 1))


def test_center_crop_arguments_are_checked():
    with pytest.raises(ValueError, match=r"crop_pct must be a number in \(0, 1\], got 1.5"):
        load_image_center_crop(CAT_PATH, 224, crop_pct=1.5)
    with pytest.raises(ValueError, match=r"interpolation must be one of bilinear, bicubic, got 'lanczos'"):
        load_image_center_crop(CAT_PATH, 224, crop_pct=0.9, interpolation="lanczos")


def test_our_state_dict_round_trips_through_timms_names(timm_tiny):
    ours, names = pretrained.our_state_dict(timm_tiny.state_dict(), PRESETS[TINY])
    assert names == "timm's names"
    same, names = pretrained.our_state_dict(ours, PRESETS[TINY])
    assert names == "vit's names" and same is ours
    back = to_timm_state_dict(ours, PRESETS[TINY])
    assert all(torch.equal(back[k], v) for k, v in timm_tiny.state_dict().items())
