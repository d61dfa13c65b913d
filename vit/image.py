"""Load any image file as the tensor a ViT takes: (1, 3, H, W), float32 in [0, 1].

    from vit.image import load_image
    images = load_image()                        # the shipped cat, (1, 3, 224, 224)
    images = load_image("photo.png", size=384)   # any file Pillow reads, (1, 3, 384, 384)

The tutorial did ``Compose([Resize((224, 224)), ToTensor()])(Image.open(path))`` and got
``torch.Size([1, 4, 224, 224])`` from an RGBA PNG: the alpha channel went straight into the
patch projection, which expects 3 channels. Here every Pillow mode becomes RGB first. The
result equals that torchvision pipeline on an RGB image (same bilinear resize, same scaling to
[0, 1]) without needing torchvision, which is not a runtime dependency of this package.

Pillow is imported inside ``load_image``, so ``import vit`` works where it is not installed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

# Chelsea the cat, 224 x 224, CC0 (provenance in assets/LICENSE.txt). A path beside this file
# rather than a resource inside a zip: the package is installed from source, editable or not.
CAT_PATH = Path(__file__).parent / "assets" / "cat.jpg"

# Pillow opens 16-bit grayscale files (PNG, TIFF, PGM) in these modes, values 0..65535.
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def load_image(
    path: str | os.PathLike[str] | None = None,
    size: int | tuple[int, int] = 224,
) -> torch.Tensor:
    """Read an image file into a (1, 3, height, width) float32 tensor with values in [0, 1].

    Args:
        path: the image file; None means the shipped cat (``CAT_PATH``).
        size: the output side, or a (height, width) pair as torchvision's ``Resize`` takes it.

    The photo is turned upright by its EXIF orientation, converted to RGB whatever its mode
    (transparent pixels are put on white), resized with Pillow's bilinear filter, and scaled
    from 0..255 to 0..1. The leading 1 is the batch dimension the model expects.
    """
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise ImportError("load_image needs Pillow: pip install pillow") from None

    height, width = _parse_size(size)
    path = CAT_PATH if path is None else Path(path)

    try:
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

    image = _to_rgb(image)
    # Pillow takes (width, height); BILINEAR is what torchvision's Resize uses on a PIL image.
    image = image.resize((width, height), Image.Resampling.BILINEAR)
    return _rgb_to_tensor(image).unsqueeze(0)  # (1, 3, H, W)


def _parse_size(size: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) from an int or a pair, both positive."""
    if isinstance(size, int):
        height = width = size
    elif len(size) == 2:
        height, width = size
    else:
        raise ValueError(f"size must be an int or a (height, width) pair, got {size!r}")
    if height <= 0 or width <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return height, width


def _to_rgb(image: PILImage) -> PILImage:
    """Any Pillow image as an RGB image of the same size."""
    from PIL import Image

    if image.mode in SIXTEEN_BIT_MODES:
        # Pillow's own conversion clips 16-bit values at 255, so almost every pixel would come
        # out white. Keep the top 8 bits instead, as an 8-bit file of the same picture has.
        image = image.convert("I").point(lambda value: value / 256).convert("L")

    if image.has_transparency_data:  # an alpha channel, or a palette/tRNS transparent colour
        # The colour under a fully transparent pixel is whatever the editor left there, often
        # black: dropping alpha would show it. Composite onto white, as a viewer or a web page
        # shows a transparent image, so a logo on a clear background reads as a logo on white.
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))

    return image.convert("RGB")  # also L, 1, P, CMYK, YCbCr, ...; a no-op copy for RGB


def _rgb_to_tensor(image: PILImage) -> torch.Tensor:
    """An RGB Pillow image as a (3, H, W) float32 tensor in [0, 1], like torchvision's ToTensor."""
    width, height = image.size
    # bytearray: torch.frombuffer warns on a read-only buffer such as bytes.
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    pixels = pixels.view(height, width, 3).permute(2, 0, 1).contiguous()  # (3, H, W)
    return pixels.to(torch.float32).div(255)
