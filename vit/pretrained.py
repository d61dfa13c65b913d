"""Real weights for a preset: timm's pretrained ViTs or a checkpoint file, with the
preprocessing they were trained with and the ImageNet class names.

    from vit import create_model, pretrained
    weights = pretrained.load_pretrained("vit_base_patch16_224")  # timm.create_model(..., pretrained=True)
    weights = pretrained.load_weights_file("vit.safetensors", "vit_base_patch16_224")
    model = create_model("vit_base_patch16_224").eval()
    model.load_state_dict(weights.state_dict)
    images = weights.preprocessing.load("photo.jpg")   # (1, 3, 224, 224): resized, cropped, normalised
    weights.class_names[281]                           # 'tabby, tabby cat'

timm is not a dependency of ``vit``: it is imported inside these functions, and where it is
missing the ImportError says in one line how to install it. It gives what a checkpoint does
not carry: the weights on the Hugging Face hub (downloaded once, then read from the hub's
cache, so ``HF_HUB_OFFLINE`` and ``HF_HUB_CACHE`` work as for timm's users), each model's
pretrained config (input size, resize and crop, mean and std) and the ImageNet class names.
A checkpoint file holds timm's state dict or ours (``vit.ViT``'s names: ``vit.timm_weights``),
as ``.safetensors`` (tensors only, read without running code) or ``.pth``/``.pt``/``.bin``
(``torch.load(weights_only=True)``, which refuses pickled code), with finite values only. Every
failure is one line: an ImportError, a FileNotFoundError, an OSError from the hub, or a
ValueError naming what did not fit (a file of another format, a tensor of another shape, a NaN).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
import re
import warnings
from pathlib import Path

import torch

from vit.image import load_image, load_image_center_crop, normalize
from vit.model import PRESETS, ViTConfig
from vit.timm_weights import (
    _first_names,
    check_state_dict,
    config_from_timm,
    from_timm_state_dict,
)

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
CHECKPOINT_FORMATS = "a state dict of tensors saved by torch.save (.pth, .pt, .bin) or safetensors (.safetensors)"
# How torch.save's files begin: a zip archive, or (the legacy format) a pickle of protocol 2 or above.
TORCH_SAVE_MAGIC = (b"PK\x03\x04", b"\x80")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How a pretrained model's images were prepared, in the terms of timm's pretrained config:
    the shorter side resized to ``floor(image_size / crop_pct)`` with ``interpolation``, the
    centre ``image_size`` square cut out, scaled to [0, 1], then normalised by ``mean`` and ``std``."""

    image_size: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_timm(cls, data_config: dict) -> Preprocessing:
        """From timm's ``resolve_data_config`` (or ``resolve_model_data_config``) result."""
        _, height, width = data_config["input_size"]
        crop_mode = data_config.get("crop_mode") or "center"
        if height != width or crop_mode != "center":
            raise ValueError(
                f"Preprocessing: expected a square input and crop_mode 'center', got input_size "
                f"{data_config['input_size']} and crop_mode {crop_mode!r}"
            )
        return cls(
            image_size=height,
            crop_pct=data_config["crop_pct"],
            interpolation=data_config["interpolation"],
            mean=tuple(data_config["mean"]),
            std=tuple(data_config["std"]),
        )

    def load(self, path: str | os.PathLike[str] | None, size: tuple[int, int] | None = None) -> torch.Tensor:
        """The image file as the model takes it: (1, 3, image_size, image_size), normalised.

        ``size`` (height, width) resizes the whole image to that size instead of cropping (for
        packed images at their own resolution); the filter and the normalisation stay.
        """
        if size is None:
            images = load_image_center_crop(path, self.image_size, crop_pct=self.crop_pct, interpolation=self.interpolation)
        else:
            images = load_image(path, size, interpolation=self.interpolation)
        return normalize(images, self.mean, self.std)


@dataclasses.dataclass(frozen=True)
class Weights:
    """Weights for a preset, ready for ``model.load_state_dict``, and what using them needs."""

    state_dict: dict[str, torch.Tensor]  # vit.ViT's names, checked against the preset's shapes
    # None where timm has no pretrained config for the preset (the tutorial's own model): the
    # tutorial's preparation then, ``load_image``'s plain resize to [0, 1].
    preprocessing: Preprocessing | None
    class_names: list[str]  # ImageNet-1k's, by class index
    source: str  # where they came from, for a progress line


def load_pretrained(name: str) -> Weights:
    """timm's pretrained weights for the preset ``name``, converted to ours.

    ``timm.create_model(name, pretrained=True)`` fetches them: from the hub's cache if they are
    there, else from the Hugging Face hub (with timm's own download progress). The preset must
    be the model timm builds, option for option; a checkpoint without an ImageNet head
    (timm's ImageNet-21k backbones) is refused before anything is downloaded.
    """
    config = _preset(name)
    timm = _import_timm()
    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    if pretrained_cfg is None:
        known = [preset for preset in PRESETS if timm.models.get_pretrained_cfg(preset) is not None]
        raise ValueError(f"timm has no pretrained weights for {name}; it has them for {', '.join(known)}")
    source = pretrained_cfg.hf_hub_id or f"{name}.{pretrained_cfg.tag}"
    if pretrained_cfg.num_classes != config.num_classes:
        raise ValueError(
            f"timm's pretrained {source} has {pretrained_cfg.num_classes} classes (a backbone without an "
            f"ImageNet head), {name} has {config.num_classes}: pick a preset with ImageNet weights"
        )
    try:
        with _quiet_hub_retries():
            timm_model = timm.create_model(name, pretrained=True)
    except (OSError, RuntimeError) as error:  # the hub's errors are OSErrors; a corrupt file a RuntimeError
        raise OSError(_hub_failure(source, error)) from None
    timm_config = config_from_timm(timm_model)
    differences = [
        f"{field.name}={getattr(timm_config, field.name)!r} (the preset's {getattr(config, field.name)!r})"
        for field in dataclasses.fields(ViTConfig)
        if field.name != "patch_embedding" and getattr(timm_config, field.name) != getattr(config, field.name)
    ]
    if differences:
        raise ValueError(f"timm's pretrained {source} is not the preset {name}: it has {', '.join(differences)}")
    state_dict = timm_model.state_dict()
    check_finite(state_dict, where=f"timm's pretrained {source}")
    return Weights(
        state_dict=from_timm_state_dict(state_dict, config),
        preprocessing=Preprocessing.from_timm(timm.data.resolve_model_data_config(timm_model)),
        class_names=imagenet_class_names(),
        source=source,
    )


def load_weights_file(path: str | os.PathLike[str], name: str) -> Weights:
    """A checkpoint file's weights for the preset ``name``: timm's state dict or ours, told apart
    by their names, every tensor checked against the preset and for NaN and infinity. The
    preprocessing is timm's pretrained config for ``name`` (the checkpoints of timm's names are
    trained that way)."""
    config = _preset(name)
    timm = _import_timm()  # before reading the file, which can take a while
    checkpoint = read_checkpoint(path)
    state_dict, names = our_state_dict(checkpoint, config, where=f"checkpoint {path}")
    check_finite(checkpoint, where=f"checkpoint {path}")  # by the file's names
    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    preprocessing = None
    if pretrained_cfg is not None:
        preprocessing = Preprocessing.from_timm(timm.data.resolve_data_config(pretrained_cfg=pretrained_cfg.to_dict()))
    return Weights(state_dict, preprocessing, imagenet_class_names(), source=f"{path} ({names})")


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors``, ``.pth``, ``.pt`` or ``.bin`` file, on the CPU.

    A file that holds something else (another format under one of these names, text, a pickle
    of more than tensors) is a ValueError in our words: never torch's advice to load it
    with ``weights_only=False``, which would run the code a pickle can carry.
    """
    if os.fspath(path) == "":
        raise ValueError(f"expected a checkpoint file ending in {', '.join(CHECKPOINT_SUFFIXES)}, got an empty file name")
    path = Path(path)
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise ValueError(f"expected a checkpoint file ending in {', '.join(CHECKPOINT_SUFFIXES)}, got {path}")
    if path.is_dir():
        raise IsADirectoryError(f"expected a checkpoint file, got a directory: {path}")
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.suffix == ".safetensors":
        try:
            from safetensors import SafetensorError
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"reading {path} needs the safetensors package: pip install safetensors") from None
        try:
            checkpoint = load_file(path, device="cpu")
        except SafetensorError as error:
            start = _file_start(path)
            if not _is_safetensors(start) and start.startswith(TORCH_SAVE_MAGIC):
                reason = "it holds a torch.save checkpoint: rename it to end in .pth"
            else:
                reason = _first_line(error)
            raise ValueError(f"not a .safetensors file safetensors can read: {path} ({reason})") from None
    else:
        try:
            with warnings.catch_warnings():
                # torch warns of a pickle protocol other than 2 before it reads or refuses the file.
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, MemoryError):  # the file could not be read, or is too big: the error says so
            raise
        except Exception as error:  # noqa: BLE001 - the unpickler fed other bytes raises KeyError, IndexError, ...
            raise ValueError(
                f"not a loadable checkpoint: {path} ({_why_torch_load_failed(path, error)}); expected {CHECKPOINT_FORMATS}"
            ) from None
    if not isinstance(checkpoint, dict) or not all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        got = f"a dict with keys {_first_names(list(checkpoint))}" if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"expected a state dict (parameter names to tensors) in {path}, got {got}")
    return checkpoint


def check_finite(state_dict: dict[str, torch.Tensor], *, where: str = "check_finite") -> None:
    """A ValueError naming the first tensor holding NaN or infinity: such weights give NaN
    probabilities, not an error, so they are refused before the model runs."""
    for name, tensor in state_dict.items():
        if tensor.is_meta or not (tensor.is_floating_point() or tensor.is_complex()):
            continue  # a shape without values, or integers
        if torch.isfinite(tensor).all():
            continue
        nans = int(tensor.isnan().sum())
        infinities = int((~torch.isfinite(tensor)).sum()) - nans
        found = " and ".join(f"{count} {kind}" for count, kind in ((nans, "NaN"), (infinities, "inf")) if count)
        raise ValueError(f"{where}: expected finite weights, got {found} of {tensor.numel()} values in {name}")


def our_state_dict(
    state_dict: dict[str, torch.Tensor], config: ViTConfig, *, where: str = "our_state_dict"
) -> tuple[dict[str, torch.Tensor], str]:
    """(the state dict in our names, "timm's names" or "vit's names"): timm's is converted, ours
    kept; either way a ValueError names the first tensor that does not fit ``config``."""
    if "pos_embed" in state_dict or "cls_token" in state_dict:  # timm keeps them at the top level
        return from_timm_state_dict(state_dict, config, where=f"{where} (timm's names)"), "timm's names"
    if "patch_embed.pos_embed" in state_dict:  # ours keeps them in the patch embedding
        check_state_dict(state_dict, config, where=f"{where} (vit's names)")
        return state_dict, "vit's names"
    raise ValueError(
        f"{where}: expected a ViT state dict of timm's (pos_embed) or vit's (patch_embed.pos_embed), "
        f"got names {_first_names(list(state_dict))}"
    )


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names by index, as timm's ``ImageNetInfo`` gives them."""
    info = _import_timm().data.ImageNetInfo()
    return [info.index_to_description(index) for index in range(info.num_classes())]


def _preset(name: str) -> ViTConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def _import_timm():
    try:
        import timm
        import timm.data
        import timm.models
    except ImportError:
        raise ImportError(
            "real weights need timm (the hub download, each model's preprocessing and the ImageNet class "
            "names), which is not installed: pip install timm"
        ) from None
    return timm


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _file_start(path: Path, size: int = 16) -> bytes:
    with open(path, "rb") as file:
        return file.read(size)


def _is_safetensors(start: bytes) -> bool:
    """Whether a file begins as safetensors' do: the header's length (8 bytes, little-endian), then its JSON."""
    return len(start) > 8 and int.from_bytes(start[:8], "little") > 0 and start[8:9] == b"{"


def _why_torch_load_failed(path: Path, error: Exception) -> str:
    """What the file holds instead of a checkpoint, in words of our own: torch's message for a
    refused pickle advises loading it with ``weights_only=False``, which runs any code it holds."""
    start = _file_start(path)
    if not start:
        return "an empty file"
    if _is_safetensors(start):
        return "it holds a safetensors file: rename it to end in .safetensors"
    if not start.startswith(TORCH_SAVE_MAGIC):
        return "neither the zip archive nor the pickle that torch.save writes"
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
    if refused:
        return f"it pickles a {refused[1]}, and only tensors and plain containers load without running pickled code"
    if isinstance(error, pickle.UnpicklingError):  # what the unpickler met, past torch's advice
        after = str(error).partition("WeightsUnpickler error:")[2].strip()
        detail = after.splitlines()[0] if after else ""
        return "a pickle the weights-only unpickler cannot read" + (f": {detail}" if detail else "")
    detail = f"{type(error).__name__}: {_first_line(error)}" if str(error).strip() else type(error).__name__
    return f"damaged, or not written by torch.save: {detail}"


@contextlib.contextmanager
def _quiet_hub_retries():
    """Without a network the hub logs a warning for each retry of each file it tries (two
    dozen lines over a minute); the one line ``load_pretrained`` raises says what failed."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _hub_failure(source: str, error: BaseException) -> str:
    """What failed and how to fix it, in one line."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        fix = f"HF_HUB_OFFLINE is set and the hub cache {constants.HF_HUB_CACHE} has no copy: run once online without it"
    else:
        fix = f"reach huggingface.co once to download it into the hub cache {constants.HF_HUB_CACHE}"
    return (
        f"timm could not load its pretrained {source} ({type(error).__name__}: {_first_line(error)}); "
        f"{fix}, or give a checkpoint file (--weights FILE)"
    )
