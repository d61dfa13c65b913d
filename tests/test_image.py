"""load_image: any file Pillow reads becomes a (1, 3, H, W) float32 tensor in [0, 1].

The tutorial's loader gave ``torch.Size([1, 4, 224, 224])`` for an RGBA PNG. Every mode test
below would fail if the conversion to RGB were dropped: the channel count, or the bytes per
pixel, would no longer be 3.
"""

import sys

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
    # 30000 / 65535 is 46% grey; Pillow's own conversion would clip it to white.
    torch.testing.assert_close(images, torch.full_like(images, (30000 // 256) / 255))


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


def test_size_must_be_an_int_or_a_pair():
    with pytest.raises(ValueError, match="height, width"):
        load_image(size=(224, 224, 3))


def test_missing_pillow_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)  # makes `from PIL import ...` fail
    with pytest.raises(ImportError, match="pip install pillow"):
        load_image()
