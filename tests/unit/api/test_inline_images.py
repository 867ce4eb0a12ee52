"""Pictures inside JSON: base64 and data: URLs decode, anything else is refused naming the field."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from sdxl_service.api.inline_images import decode_inline_image, inline_image_bytes
from sdxl_service.api.uploads import InvalidUpload


def _png(size: tuple[int, int] = (12, 8), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, (10, 200, 30) if mode == "RGB" else (10, 200, 30, 0)).save(
        buffer, format="PNG"
    )
    return buffer.getvalue()


def test_plain_base64_and_data_urls_give_the_same_picture() -> None:
    data = _png()
    encoded = base64.b64encode(data).decode()
    for value in (
        encoded,
        f"data:image/png;base64,{encoded}",
        f"DATA:image/png;charset=binary;base64,{encoded}",
        f"data:;base64,{encoded}",
        # Line-wrapped base64, as some encoders write it.
        "\n".join(encoded[i : i + 20] for i in range(0, len(encoded), 20)),
    ):
        assert inline_image_bytes(value, "controlnets[0].image") == data
        picture = decode_inline_image(value, "controlnets[0].image")
        assert picture.mode == "RGB"
        assert picture.size == (12, 8)
        assert picture.getpixel((0, 0)) == (10, 200, 30)


def test_transparency_is_flattened_onto_white_as_uploads_are() -> None:
    encoded = base64.b64encode(_png(mode="RGBA")).decode()
    assert decode_inline_image(encoded, "x").getpixel((3, 3)) == (255, 255, 255)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("https://example.com/cat.png", "URLs are not fetched"),
        ("http://127.0.0.1/cat.png", "URLs are not fetched"),
        ("file:///etc/passwd", "URLs are not fetched"),
        ("data:image/png,notbase64", "must be base64"),
        ("not base64 at all!", "not valid base64"),
        ("   ", "empty"),
        (base64.b64encode(b"plain text, no picture").decode(), "not an image"),
    ],
)
def test_what_is_not_an_inline_picture_is_refused_naming_the_field(value: str, reason: str) -> None:
    with pytest.raises(InvalidUpload) as caught:
        decode_inline_image(value, "ip_adapters[0].images[2]")
    assert caught.value.param == "ip_adapters[0].images[2]"
    assert reason in str(caught.value)
    assert "ip_adapters[0].images[2]" in str(caught.value)
