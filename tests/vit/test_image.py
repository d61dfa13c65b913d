"""load_image: any file Pillow reads becomes a (1, 3, H, W) float32 tensor in [0, 1].

The tutorial's loader gave ``torch.Size([1, 4, 224, 224])`` for an RGBA PNG. Every mode test
below would fail if the conversion to RGB were dropped: the channel count, or the bytes per
pixel, would no longer be 3. ``test_every_pillow_mode_keeps_its_picture`` writes one picture in
every mode Pillow saves and checks the pixel that comes back; before, 32-bit float TIFFs ("F")
came back black.
"""

import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from vit.image import CAT_PATH, load_image

RED = (255, 0, 0)
WHITE = (1.0, 1.0, 1.0)


def pixel(images: torch.Tensor, row: int, column: int) -> tuple[float, ...]:
    """The RGB value at (row, column) of the first image, rounded to 1/255."""
    return tuple(round(value, 3) for value in images[0, :, row, column].tolist())


def test_shipped_cat_loads_as_one_rgb_image():
    assert CAT_PATH.is_file()
    images = load_image()
    assert images.shape == (1, 3, 224, 224)
    assert images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    # Not blank, not grey: a photo has contrast, and a tabby is more red than blue.
    assert images.std() > 0.1
    assert images[0, 0].mean() > images[0, 2].mean() + 0.05


def test_transparent_pixels_are_put_on_white(tmp_path):
    # Left half opaque red, right half fully transparent black, as editors often leave it.
    rgba = Image.new("RGBA", (8, 4), (0, 0, 0, 0))
    rgba.paste(Image.new("RGBA", (4, 4), (*RED, 255)), (0, 0))
    path = tmp_path / "logo.png"
    rgba.save(path)

    images = load_image(path, size=(4, 8))  # its own size, so no resampling blurs the edge
    assert images.shape == (1, 3, 4, 8)
    assert pixel(images, 0, 0) == (1.0, 0.0, 0.0)
    assert pixel(images, 0, 7) == WHITE  # dropping alpha without compositing gives black


def test_palette_transparency_is_put_on_white(tmp_path):
    palette_image = Image.new("P", (8, 4), 0)
    palette_image.putpalette([0, 0, 0, *RED])  # index 0 black, index 1 red
    palette_image.paste(1, (0, 0, 4, 4))
    path = tmp_path / "sticker.png"
    palette_image.save(path, transparency=0)

    images = load_image(path, size=(4, 8))
    assert images.shape == (1, 3, 4, 8)
    assert pixel(images, 0, 0) == (1.0, 0.0, 0.0)
    assert pixel(images, 0, 7) == WHITE


def test_grayscale_becomes_three_equal_channels(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (30, 20), 128).save(path)

    images = load_image(path)
    assert images.shape == (1, 3, 224, 224)
    torch.testing.assert_close(images, torch.full_like(images, 128 / 255))


def test_sixteen_bit_grayscale_keeps_its_brightness(tmp_path):
    path = tmp_path / "depth.png"
    Image.new("I;16", (30, 20), 30000).save(path)
    with Image.open(path) as written:
        assert written.mode == "I;16"

    images = load_image(path)
    assert images.shape == (1, 3, 224, 224)
    # 30000 / 65535 is 46% grey; Pillow's own conversion would clip it to white, and keeping
    # only the top 8 bits (117 / 255) would lose the difference between 30000 and 30255.
    torch.testing.assert_close(images, torch.full_like(images, 30000 / 65535), atol=1e-6, rtol=0)


# One picture in every mode Pillow writes to a file: (mode, suffix, the picture, the RGB
# expected back in 0..255, tolerance in 0..255). Grey is 128, stored as 128 * 257 in 16 and
# 32 bits and as 128 / 255 in float, so every grey mode must give exactly 128 / 255.
# Pillow writes no file in HSV, La or RGBa: those modes cannot reach load_image.
ORANGE = (200, 100, 50)
GREY = (128, 128, 128)


def _palette(mode: str, pixel) -> Image.Image:
    image = Image.new(mode, (8, 8), pixel)
    image.putpalette([0, 0, 0, *ORANGE])  # index 0 black, 1 orange
    return image


MODES = [
    ("1", "png", lambda: Image.new("1", (8, 8), 1), (255, 255, 255), 0),
    ("L", "png", lambda: Image.new("L", (8, 8), 128), GREY, 0),
    ("LA", "png", lambda: Image.new("LA", (8, 8), (128, 255)), GREY, 0),
    ("LA transparent", "png", lambda: Image.new("LA", (8, 8), (0, 0)), (255, 255, 255), 0),
    ("P", "png", lambda: _palette("P", 1), ORANGE, 0),
    ("PA", "tiff", lambda: _palette("PA", (1, 255)), ORANGE, 0),
    ("PA transparent", "tiff", lambda: _palette("PA", (1, 0)), (255, 255, 255), 0),
    ("RGB", "png", lambda: Image.new("RGB", (8, 8), ORANGE), ORANGE, 0),
    ("RGBA", "png", lambda: Image.new("RGBA", (8, 8), (*ORANGE, 255)), ORANGE, 0),
    ("CMYK", "tiff", lambda: Image.new("RGB", (8, 8), ORANGE).convert("CMYK"), ORANGE, 0),
    ("YCbCr", "tiff", lambda: Image.new("RGB", (8, 8), ORANGE).convert("YCbCr"), ORANGE, 2),
    ("LAB", "tiff", lambda: Image.new("RGB", (8, 8), ORANGE).convert("LAB"), ORANGE, 2),
    ("I", "tiff", lambda: Image.fromarray(np.full((8, 8), 128 * 257, np.int32)), GREY, 0),
    ("I;16", "tiff", lambda: Image.new("I;16", (8, 8), 128 * 257), GREY, 0),
    ("I;16B", "tiff", lambda: Image.new("I;16B", (8, 8), 128 * 257), GREY, 0),
    ("F", "tiff", lambda: Image.fromarray(np.full((8, 8), 128 / 255, np.float32)), GREY, 0),
]


@pytest.mark.parametrize("name, suffix, make, expected, tolerance", MODES, ids=[case[0] for case in MODES])
def test_every_pillow_mode_keeps_its_picture(tmp_path, name, suffix, make, expected, tolerance):
    path = tmp_path / f"picture.{suffix}"
    make().save(path)
    with Image.open(path) as written:
        assert written.mode == name.split()[0]  # the file really holds that mode

    images = load_image(path, size=8)
    assert images.shape == (1, 3, 8, 8)
    expected = torch.tensor(expected, dtype=torch.float32).view(1, 3, 1, 1).expand_as(images) / 255
    torch.testing.assert_close(images, expected, atol=tolerance / 255 + 1e-6, rtol=0)


def test_float_tiff_keeps_every_value_in_zero_to_one(tmp_path):
    # Before, Pillow's conversion to 8 bits read 0.25 as 0 out of 255: the picture came back black.
    ramp = np.array([[0.0, 0.25, 0.5, 1.0]], np.float32)
    path = tmp_path / "ramp.tiff"
    Image.fromarray(ramp).save(path)

    images = load_image(path, size=(1, 4))  # its own size: no resampling
    torch.testing.assert_close(images, torch.from_numpy(ramp).expand(1, 3, 1, 4))


@pytest.mark.parametrize(
    "values, got",
    [([0.0, 200.0], "values from 0 to 200"), ([-0.5, 0.5], "values from -0.5 to 0.5"), ([0.5, np.nan], "NaN")],
    ids=["0..255 floats", "negative", "NaN"],
)
def test_float_tiff_outside_zero_to_one_is_refused(tmp_path, values, got):
    path = tmp_path / "radiance.tiff"
    Image.fromarray(np.array([values], np.float32)).save(path)
    with pytest.raises(ValueError, match="expected a 32-bit float image with values in \\[0, 1\\], got ") as error:
        load_image(path)
    message = str(error.value)
    assert got in message and message.endswith(f": {path}") and "\n" not in message


def test_32_bit_integer_tiff_is_read_as_16_bit_data(tmp_path):
    ramp = np.array([[0, 1, 30000, 65535]], np.int32)
    path = tmp_path / "depth.tiff"
    Image.fromarray(ramp).save(path)
    with Image.open(path) as written:
        assert written.mode == "I"

    images = load_image(path, size=(1, 4))
    torch.testing.assert_close(images, torch.from_numpy(ramp / 65535).float().expand(1, 3, 1, 4))


@pytest.mark.parametrize("values", [[0, 70000], [-5, 100]], ids=["above 65535", "negative"])
def test_32_bit_integer_tiff_outside_sixteen_bits_is_refused(tmp_path, values):
    # Before, 70000 came back white and -5 black, without a word.
    path = tmp_path / "counts.tiff"
    Image.fromarray(np.array([values], np.int32)).save(path)
    with pytest.raises(ValueError) as error:
        load_image(path)
    low, high = values
    assert str(error.value) == (
        f"expected a 32-bit integer image with 16-bit values, 0 to 65535, got values from {low} to {high}: {path}"
    )


def test_pgm_with_a_ten_bit_maxval_is_stretched_to_its_full_range(tmp_path):
    # Pillow opens a PGM whose maxval is above 255 in mode "I", stretched to 0..65535.
    path = tmp_path / "ten_bit.pgm"
    path.write_bytes(b"P5 2 1 1023\n" + np.array([0, 1023], ">u2").tobytes())
    images = load_image(path, size=(1, 2))
    torch.testing.assert_close(images[0, :, 0], torch.tensor([[0.0, 1.0]] * 3))


def test_sixteen_bit_transparent_grey_is_put_on_white(tmp_path):
    grey = Image.new("I;16", (4, 1), 128 * 257)
    grey.putpixel((3, 0), 5)
    path = tmp_path / "mask.png"
    grey.save(path, transparency=5)  # a tRNS chunk: value 5 is transparent

    images = load_image(path, size=(1, 4))
    torch.testing.assert_close(images[0, :, 0], torch.tensor([[128 / 255] * 3 + [1.0]] * 3))


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "print.jpg"
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(path)  # magenta + yellow ink: red
    with Image.open(path) as written:
        assert written.mode == "CMYK"

    images = load_image(path)
    assert images.shape == (1, 3, 224, 224)
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).expand_as(images)
    torch.testing.assert_close(images, red, atol=0.05, rtol=0)  # JPEG is lossy


def test_exif_orientation_is_applied(tmp_path):
    # Stored 40 wide and 20 high, red on the left and blue on the right, with orientation 6:
    # "turn 90 degrees clockwise to view", as a phone held upright saves it. Upright, the
    # photo is 20 wide and 40 high, red on top and blue below.
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste(Image.new("RGB", (20, 20), RED), (0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # the Orientation tag
    path = tmp_path / "portrait.jpg"
    stored.save(path, exif=exif, quality=95)

    images = load_image(path, size=(40, 20))  # its upright size: no resampling
    # Away from the middle rows, where JPEG blurs red into blue. Turned the wrong way, red
    # would be below; not turned at all, each row would be half red and half blue.
    top, bottom = images[0, :, :15].mean(dim=(1, 2)), images[0, :, 25:].mean(dim=(1, 2))
    assert top[0] > 0.9 and top[2] < 0.1  # red
    assert bottom[0] < 0.1 and bottom[2] > 0.9  # blue


@pytest.mark.parametrize("size", [224, (96, 160)])
def test_equals_the_tutorials_torchvision_pipeline_on_rgb(tmp_path, size):
    transforms = pytest.importorskip("torchvision.transforms")
    generator = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (37, 50, 3), dtype=torch.uint8, generator=generator)
    path = tmp_path / "noise.png"
    Image.frombytes("RGB", (50, 37), bytes(noise.flatten().tolist())).save(path)

    # Resize(224) would keep the aspect ratio; the tutorial passed (224, 224).
    height_width = (size, size) if isinstance(size, int) else size
    pipeline = transforms.Compose([transforms.Resize(height_width), transforms.ToTensor()])
    with Image.open(path) as image:
        expected = pipeline(image.convert("RGB")).unsqueeze(0)

    torch.testing.assert_close(load_image(path, size=size), expected, atol=1e-6, rtol=0)


def test_size_may_be_height_and_width():
    assert load_image(size=(64, 32)).shape == (1, 3, 64, 32)
    assert load_image(size=17).shape == (1, 3, 17, 17)


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "no_such_cat.jpg"
    with pytest.raises(FileNotFoundError, match="no_such_cat.jpg"):
        load_image(path)


@pytest.mark.parametrize("kind", ["text", "truncated png"])
def test_non_image_names_the_path(tmp_path, kind):
    path = tmp_path / "not_a_cat.png"
    if kind == "text":
        path.write_text("meow\n")
    else:
        Image.new("RGB", (64, 64), RED).save(path)
        path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(ValueError, match="not an image Pillow can read: .*not_a_cat.png"):
        load_image(path)


@pytest.mark.parametrize("size", [0, -224, (224, 0), (-1, 224)])
def test_size_must_be_positive(size):
    with pytest.raises(ValueError, match="size must be positive"):
        load_image(size=size)


@pytest.mark.parametrize(
    "size, error, got",
    [
        ((224, 224, 3), ValueError, "got 3 values: (224, 224, 3)"),
        ([224], ValueError, "got 1 values: [224]"),
        (224.0, TypeError, "got float 224.0"),
        (None, TypeError, "got NoneType None"),
        (True, TypeError, "got bool True"),
        ("224", TypeError, "got str '224'"),
        ((224.0, 224), TypeError, "got (224.0, 224)"),
        ((True, 224), TypeError, "got (True, 224)"),
    ],
    ids=["three values", "one value", "float", "None", "bool", "str", "float side", "bool side"],
)
def test_size_must_be_an_int_or_a_pair_of_ints(size, error, got):
    with pytest.raises(error) as raised:
        load_image(size=size)
    message = str(raised.value)
    assert message.startswith("load_image: size must be an int or a (height, width) pair of ints, ")
    assert message.endswith(got) and "\n" not in message


def test_size_may_be_a_numpy_integer():
    assert load_image(size=np.int64(32)).shape == (1, 3, 32, 32)
    assert load_image(size=(np.int32(16), np.uint8(24))).shape == (1, 3, 16, 24)


def test_size_above_pillows_pixel_limit_is_refused(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match=r"^load_image: size 40x30 is 1200 pixels, above PIL.Image.MAX_IMAGE_PIXELS \(1000\)$"):
        load_image(size=(40, 30))


@pytest.mark.parametrize("limit", [20_000, 40_000], ids=["Pillow raises", "Pillow warns"])
def test_image_above_pillows_decompression_bomb_limit_is_refused(monkeypatch, limit):
    # The cat is 224 x 224 = 50176 pixels: above twice 20000 Pillow raises, above 40000 it only warns.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        with pytest.raises(ValueError) as error:
            load_image(size=16)
    assert str(error.value) == (
        f"expected an image of at most PIL.Image.MAX_IMAGE_PIXELS = {limit} pixels, Pillow's guard against "
        f"decompression bombs (raise it for a file you trust), got more: {CAT_PATH}"
    )


def test_missing_pillow_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)  # makes `from PIL import ...` fail
    with pytest.raises(ImportError, match="pip install pillow"):
        load_image()
