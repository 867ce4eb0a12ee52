from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from sdxl_service.api.encoding import encode_image, pixels_of, resize_to, to_base64, to_pil
from sdxl_service.contract.render_request import RenderedImage


def noise_image(width: int = 96, height: int = 64) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_rendered_rgb_roundtrips_to_pil() -> None:
    image = noise_image()
    rendered = RenderedImage(seed=1, width=96, height=64, rgb=image.tobytes())
    assert np.array_equal(np.asarray(to_pil(rendered)), np.asarray(image))


def test_rendered_image_survives_json_between_services() -> None:
    rendered = RenderedImage(seed=1, width=96, height=64, rgb=noise_image().tobytes())
    assert RenderedImage.model_validate_json(rendered.model_dump_json()) == rendered


@pytest.mark.parametrize(
    ("fmt", "pil_format"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")]
)
def test_encode_formats(fmt: str, pil_format: str) -> None:
    decoded = Image.open(io.BytesIO(encode_image(noise_image(), fmt)))
    assert decoded.format == pil_format
    assert decoded.size == (96, 64)


def test_png_is_lossless() -> None:
    image = noise_image()
    decoded = Image.open(io.BytesIO(encode_image(image, "png")))
    assert np.array_equal(np.asarray(decoded), np.asarray(image))


def test_compression_trades_size_for_quality() -> None:
    image = noise_image(256, 256)
    assert len(encode_image(image, "jpeg", 20)) < len(encode_image(image, "jpeg", 95))


def test_resize_to_requested_size() -> None:
    assert resize_to(noise_image(), 48, 32).size == (48, 32)
    image = noise_image()
    assert resize_to(image, 96, 64) is image


def test_base64() -> None:
    assert base64.b64decode(to_base64(b"\x00\xff")) == b"\x00\xff"


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_pixels_encode_as_their_pil_image_does(fmt: str) -> None:
    image = noise_image()
    rendered = RenderedImage(seed=1, width=96, height=64, rgb=image.tobytes())
    pixels = pixels_of(rendered)
    assert pixels.shape == (64, 96, 3)
    assert encode_image(pixels, fmt, 80) == encode_image(image, fmt, 80)
