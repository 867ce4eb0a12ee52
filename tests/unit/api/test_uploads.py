"""Uploaded pictures and masks: decoding, refusals, OpenAI's transparent-is-repainted masks."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from sdxl_service.api.uploads import (
    MAX_UPLOAD_PIXELS,
    SIGNATURE_BYTES,
    InvalidUpload,
    decode_edit_source,
    looks_like_image,
    open_image,
    repaint_mask,
    to_rgb,
)


def encoded(image: Image.Image, image_format: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "WEBP"])
def test_common_formats_decode(image_format: str) -> None:
    image = open_image(encoded(Image.new("RGB", (40, 24), (10, 200, 30)), image_format))
    assert image.size == (40, 24)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"hello, world", "not an image"),
        (encoded(Image.new("RGB", (64, 64)))[:60], "not an image"),  # truncated
    ],
)
def test_what_is_not_an_image_is_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        open_image(data)


def test_a_small_file_claiming_too_many_pixels_is_refused_before_decoding() -> None:
    side = int(MAX_UPLOAD_PIXELS**0.5) + 8
    data = encoded(Image.new("1", (side, side)))
    assert len(data) < 1_000_000
    with pytest.raises(ValueError, match="pixels"):
        open_image(data)


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90°: shown portrait
    image = open_image(encoded(Image.new("RGB", (60, 20)), "JPEG", exif=exif))
    assert image.size == (20, 60)


def test_transparency_is_flattened_onto_white() -> None:
    image = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    image.putpixel((1, 0), (0, 0, 0, 0))
    rgb = to_rgb(image)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 0, 0)
    assert rgb.getpixel((1, 0)) == (255, 255, 255)


def test_transparent_mask_pixels_are_the_ones_repainted() -> None:
    mask = Image.new("RGBA", (4, 1), (0, 0, 0, 255))
    for x, alpha in enumerate((0, 100, 200, 255)):
        mask.putpixel((x, 0), (9, 9, 9, alpha))
    repaint = repaint_mask(mask, (4, 1))
    assert repaint.mode == "L"
    assert list(np.asarray(repaint)[0]) == [255, 255, 0, 0]


def test_palette_mask_with_a_transparent_index_works() -> None:
    mask = Image.new("P", (2, 1), 0)
    mask.putpalette([0, 0, 0, 255, 255, 255])
    mask.putpixel((1, 0), 1)
    mask = open_image(encoded(mask, transparency=1))
    assert mask.mode == "P"
    assert list(np.asarray(repaint_mask(mask, (2, 1)))[0]) == [0, 255]


@pytest.mark.parametrize(
    ("mask", "reason"),
    [
        (Image.new("RGBA", (8, 4), (0, 0, 0, 0)), "same size"),
        (Image.new("L", (4, 4), 0), "no alpha channel"),
        (Image.new("RGBA", (4, 4), (0, 0, 0, 255)), "nothing to repaint"),
    ],
)
def test_masks_that_cannot_mean_anything_are_refused(mask: Image.Image, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        repaint_mask(mask, (4, 4))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_every_accepted_format_passes_the_signature_check(fmt: str) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format=fmt)
    assert looks_like_image(buffer.getvalue()[:SIGNATURE_BYTES])


@pytest.mark.parametrize(
    "head", [b"", b"%PDF-1.7", b"PK\x03\x04", b"<svg xmlns=", b"RIFF\0\0\0\0WAVE"]
)
def test_other_files_fail_the_signature_check(head: bytes) -> None:
    assert not looks_like_image(head)


def test_an_unusable_upload_names_its_field() -> None:
    picture = encoded(Image.new("RGB", (64, 64), (10, 200, 30)))
    with pytest.raises(InvalidUpload, match=r"^Invalid image: the file is empty\.$") as bad:
        decode_edit_source(b"", None)
    assert bad.value.param == "image"
    with pytest.raises(InvalidUpload, match=r"^Invalid mask: not an image") as bad:
        decode_edit_source(picture, b"hello, world")
    assert bad.value.param == "mask"
    source = decode_edit_source(picture, None)
    assert source.image.size == (64, 64) and source.mask is None
