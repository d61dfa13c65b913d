"""Load any image file as the tensor a ViT takes: (1, 3, H, W), float32 in [0, 1].

    from vit.image import load_image, load_image_center_crop, normalize
    images = load_image()                        # the shipped cat, (1, 3, 224, 224)
    images = load_image("photo.png", size=384)   # any file Pillow reads, (1, 3, 384, 384)
    # A pretrained model's way (timm's evaluation transform): shorter side to 248, centre 224.
    images = normalize(load_image_center_crop("photo.png", 224, crop_pct=0.9, interpolation="bicubic"),
                       mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

The tutorial did ``Compose([Resize((224, 224)), ToTensor()])(Image.open(path))`` and got
``torch.Size([1, 4, 224, 224])`` from an RGBA PNG: the alpha channel went straight into the
patch projection, which expects 3 channels. Here every Pillow mode becomes RGB first. The
result equals that torchvision pipeline on an RGB image (same bilinear resize, same scaling to
[0, 1]) without needing torchvision, which is not a runtime dependency of this package.
Grey images of more than 8 bits (16-bit PNG, TIFF and PGM, 32-bit integer and float TIFF)
keep their precision; how each is scaled to [0, 1] is in ``load_image``'s docstring.

Pillow is imported inside ``load_image``, so ``import vit`` works where it is not installed.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kernels.checks import is_real

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

# Chelsea the cat, 224 x 224, CC0 (provenance in assets/LICENSE.txt). A path beside this file
# rather than a resource inside a zip: the package is installed from source, editable or not.
CAT_PATH = Path(__file__).parent / "assets" / "cat.jpg"

# Pillow opens 16-bit grey files (PNG, TIFF) in these modes, values 0..65535.
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
SIXTEEN_BIT_MAX = 65535

# The resampling filters by timm's names for them (a pretrained config's "interpolation").
INTERPOLATIONS = ("bilinear", "bicubic")


def load_image(
    path: str | os.PathLike[str] | None = None,
    size: int | tuple[int, int] = 224,
    *,
    interpolation: str = "bilinear",
) -> torch.Tensor:
    """Read an image file into a (1, 3, height, width) float32 tensor with values in [0, 1].

    Args:
        path: the image file; None means the shipped cat (``CAT_PATH``).
        size: the output side, or a (height, width) pair as torchvision's ``Resize`` takes it:
            positive integers (``int`` or NumPy's, any ``numbers.Integral`` but ``bool``). There
            is no "keep the file's size": the model needs sides it was built for, or multiples
            of its patch size. At most ``PIL.Image.MAX_IMAGE_PIXELS`` pixels.
        interpolation: the resampling filter, "bilinear" (the tutorial's) or "bicubic" (what
            timm's pretrained ViTs were evaluated with).

    The photo is turned upright by its EXIF orientation, converted to RGB whatever its mode
    (transparent pixels are put on white), resized with Pillow's filter, and scaled to
    [0, 1]. The leading 1 is the batch dimension the model expects. The scale by mode:

    - 8 bits a channel (RGB, RGBA, L, LA, 1, P, PA, CMYK, YCbCr, LAB): 0..255 to 0..1.
    - 16-bit grey ("I;16", "I;16B", ...: 16-bit PNG and TIFF): divided by 65535.
    - 32-bit integer grey ("I": TIFF, and PGM with a maxval above 255, which Pillow stretches
      to 0..65535): read as 16-bit data, divided by 65535. Values outside 0..65535 have no
      agreed brightness and are refused, rather than clipped to black or white.
    - 32-bit float grey ("F": TIFF): taken as they are, so they must lie in [0, 1]; other
      values (0..255 floats, HDR radiance, NaN) are refused rather than guessed at.

    These grey images are resized in float32 by the same filter (PyTorch's
    ``interpolate(mode=interpolation, antialias=True)``, bilinear within 1e-5 of Pillow's) and
    copied to the three channels. Errors are one line ending in the path: a missing file is a
    FileNotFoundError, a file that is not a readable image, refused values, or an image above
    ``PIL.Image.MAX_IMAGE_PIXELS`` (Pillow's guard against decompression bombs, which warns up
    to twice that and raises above) a ValueError.
    """
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise ImportError("load_image needs Pillow: pip install pillow") from None

    height, width = _parse_size(size, Image.MAX_IMAGE_PIXELS)
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"load_image: interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
    path = _image_path(path)

    try:
        # Pillow warns between MAX_IMAGE_PIXELS and twice that, and raises above: one limit here.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image_file:
                # Cameras save the sensor's pixels as they came and record in EXIF how to turn
                # them; without this a portrait phone photo reaches the model lying on its side.
                # exif_transpose also decodes the pixels, so a corrupt file fails here.
                image = ImageOps.exif_transpose(image_file)
    except FileNotFoundError:
        raise FileNotFoundError(f"no image file at {path}") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"expected an image file, got a directory: {path}") from None
    except PermissionError:
        raise PermissionError(f"no permission to read the image file {path}") from None
    except OSError as error:  # Pillow's UnidentifiedImageError is an OSError, so is truncation
        raise ValueError(f"not an image Pillow can read: {path}") from error
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise _too_many_pixels(path) from error

    if image.mode in ("I", "F", *SIXTEEN_BIT_MODES):
        grey = _high_bit_depth_to_tensor(image, path)  # (1, 1, h, w), in [0, 1]
        grey = F.interpolate(grey, size=(height, width), mode=interpolation, antialias=True, align_corners=False)
        # The filter's weights sum to 1 only up to rounding: clamp, as Pillow's 8 bits are.
        return grey.clamp(0.0, 1.0).expand(-1, 3, -1, -1).contiguous()  # (1, 3, H, W)

    image = _to_rgb(image)
    # Pillow takes (width, height); its filter is what torchvision's Resize uses on a PIL image.
    image = image.resize((width, height), Image.Resampling[interpolation.upper()])
    return _rgb_to_tensor(image).unsqueeze(0)  # (1, 3, H, W)


def load_image_center_crop(
    path: str | os.PathLike[str] | None,
    size: int,
    *,
    crop_pct: float,
    interpolation: str = "bicubic",
) -> torch.Tensor:
    """Read an image as timm's evaluation transform does before it normalises: the shorter side
    resized to ``floor(size / crop_pct)`` keeping the aspect ratio, then the centre ``size`` x
    ``size`` cut out. A (1, 3, size, size) float32 tensor in [0, 1], equal to timm's
    ``Resize``, ``CenterCrop``, ``ToTensor`` on an 8-bit image.

    ``crop_pct`` is the fraction of the resized shorter side kept, in (0, 1]: 0.9 for timm's
    ViTs at 224, 1.0 at 384. Other arguments and errors as ``load_image``.
    """
    if not (is_real(crop_pct) and 0 < crop_pct <= 1):
        raise ValueError(f"load_image_center_crop: crop_pct must be a number in (0, 1], got {crop_pct!r}")
    if not _is_integer(size) or size <= 0:
        raise ValueError(f"load_image_center_crop: size must be a positive int, got {size!r}")
    height, width = image_size(path)
    short_side = math.floor(size / crop_pct)
    # torchvision's Resize(int): the longer side scaled in proportion, rounded down.
    if width <= height:
        resized = (int(short_side * height / width), short_side)
    else:
        resized = (short_side, int(short_side * width / height))
    images = load_image(path, resized, interpolation=interpolation)  # (1, 3, H', W')
    # torchvision's CenterCrop rounds the offsets (half to even, as Python's round does).
    top = round((resized[0] - size) / 2)
    left = round((resized[1] - size) / 2)
    return images[:, :, top:top + size, left:left + size].contiguous()  # (1, 3, size, size)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(images - mean) / std`` per channel, as torchvision's ``Normalize``: the statistics a
    pretrained model's training images were scaled by (timm's pretrained config has them).

    ``images`` is (B, C, H, W) or (C, H, W); ``mean`` and ``std`` hold C numbers each, std
    all nonzero. Returns a new tensor of the images' dtype.
    """
    channels = images.shape[-3] if images.dim() >= 3 else None
    if channels is None or len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"normalize: expected images (B, C, H, W) and C values each of mean and std, got images "
            f"{tuple(images.shape)}, {len(mean)} means and {len(std)} stds"
        )
    if any(s == 0 for s in std):
        raise ValueError(f"normalize: expected a nonzero std for every channel, got {tuple(std)}")
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)  # (C, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return images.sub(mean).div(std)


def image_size(path: str | os.PathLike | None = None) -> tuple[int, int]:
    """The (height, width) of the image file upright (after its EXIF orientation), without decoding it all."""
    from PIL import Image

    path = _image_path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image_file:
                width, height = image_file.size
                orientation = image_file.getexif().get(0x0112, 1)  # 5 to 8: the photo is turned a quarter
    except FileNotFoundError:
        raise FileNotFoundError(f"no image file at {path}") from None
    except OSError as error:
        raise ValueError(f"not an image Pillow can read: {path}") from error
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise _too_many_pixels(path) from error
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def _image_path(path: str | os.PathLike | None) -> Path:
    """The file to read: the cat for None; an empty name is refused (``Path("")`` is the current directory)."""
    if path is None:
        return CAT_PATH
    if os.fspath(path) == "":
        raise ValueError("expected an image file, got an empty file name")
    return Path(path)


def _too_many_pixels(path: Path) -> ValueError:
    from PIL import Image

    return ValueError(
        f"expected an image of at most PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS} pixels, "
        f"Pillow's guard against decompression bombs (raise it for a file you trust), got more: {path}"
    )


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _parse_size(size, max_pixels: int | None) -> tuple[int, int]:
    """(height, width) from an integer or a pair of them, both positive, within Pillow's limit."""
    expected = "load_image: size must be an int or a (height, width) pair of ints"
    if _is_integer(size):
        pair = (size, size)
    elif isinstance(size, (tuple, list)):
        if len(size) != 2:
            raise ValueError(f"{expected}, got {len(size)} values: {size!r}")
        pair = tuple(size)
        if not all(_is_integer(side) for side in pair):
            raise TypeError(f"{expected}, got {size!r}")
    else:
        raise TypeError(f"{expected}, got {type(size).__name__} {size!r}")
    height, width = int(pair[0]), int(pair[1])
    if height <= 0 or width <= 0:
        raise ValueError(f"load_image: size must be positive, got {size!r}")
    if max_pixels is not None and height * width > max_pixels:
        raise ValueError(
            f"load_image: size {height}x{width} is {height * width} pixels, above PIL.Image.MAX_IMAGE_PIXELS ({max_pixels})"
        )
    return height, width


def _high_bit_depth_to_tensor(image: PILImage, path: Path) -> torch.Tensor:
    """A 16-bit, 32-bit integer or 32-bit float grey image as (1, 1, H, W) float32 in [0, 1]."""
    width, height = image.size
    if image.mode == "F":
        values = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.float32)
        low, high = values.min().item(), values.max().item()  # NaN if there is one
        if not 0.0 <= low <= high <= 1.0:
            got = "NaN" if values.isnan().any() else f"values from {low:g} to {high:g}"
            raise ValueError(f"expected a 32-bit float image with values in [0, 1], got {got} (rescale it first): {path}")
    else:
        # Widening a 16-bit mode to "I" (native int32) is exact.
        counts = torch.frombuffer(bytearray(image.convert("I").tobytes()), dtype=torch.int32)
        low, high = counts.min().item(), counts.max().item()
        if low < 0 or high > SIXTEEN_BIT_MAX:
            raise ValueError(
                f"expected a 32-bit integer image with 16-bit values, 0 to {SIXTEEN_BIT_MAX}, "
                f"got values from {low} to {high}: {path}"
            )
        values = counts / SIXTEEN_BIT_MAX  # float32
        transparent = image.info.get("transparency")  # a 16-bit grey PNG's tRNS value
        if isinstance(transparent, int):
            values = values.masked_fill(counts == transparent, 1.0)  # put on white, as RGBA is
    return values.view(1, 1, height, width)


def _to_rgb(image: PILImage) -> PILImage:
    """An 8-bit Pillow image of any mode as an RGB image of the same size."""
    from PIL import Image

    if image.has_transparency_data:  # an alpha channel, or a palette/tRNS transparent colour
        # The colour under a fully transparent pixel is whatever the editor left there, often
        # black: dropping alpha would show it. Composite onto white, as a viewer or a web page
        # shows a transparent image, so a logo on a clear background reads as a logo on white.
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))

    return image.convert("RGB")  # also L, 1, P, CMYK, YCbCr, LAB, ...; a no-op copy for RGB


def _rgb_to_tensor(image: PILImage) -> torch.Tensor:
    """An RGB Pillow image as a (3, H, W) float32 tensor in [0, 1], like torchvision's ToTensor."""
    width, height = image.size
    # bytearray: torch.frombuffer warns on a read-only buffer such as bytes.
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    pixels = pixels.view(height, width, 3).permute(2, 0, 1).contiguous()  # (3, H, W)
    return pixels.to(torch.float32).div(255)
