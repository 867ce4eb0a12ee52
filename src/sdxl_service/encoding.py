"""Raw RGB from the pipeline -> resized PIL image -> png/jpeg/webp bytes -> base64."""

from __future__ import annotations

import base64
import io

from PIL import Image

from .jobs import RenderedImage

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# zlib level 1: bench/encoding shows higher levels cost several times the CPU
# for a few percent smaller files on diffusion output (noise-like detail).
PNG_COMPRESS_LEVEL = 1


def to_pil(image: RenderedImage) -> Image.Image:
    return Image.frombytes("RGB", (image.width, image.height), image.rgb)


def resize_to(image: Image.Image, width: int, height: int) -> Image.Image:
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.LANCZOS, reducing_gap=3.0)


def encode_image(image: Image.Image, output_format: str, compression: int | None = None) -> bytes:
    """`compression` is OpenAI's output_compression (0-100, jpeg/webp; 100 = best quality)."""
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    elif output_format in ("jpeg", "webp"):
        quality = 95 if compression is None else max(1, compression)
        image.save(buffer, format=output_format.upper(), quality=quality)
    else:
        raise ValueError(f"unknown output format {output_format!r}")
    return buffer.getvalue()


def to_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
