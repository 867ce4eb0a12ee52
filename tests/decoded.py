"""Decoding what a response carries (its images, its Server-Timing), for assertions."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def pixels(b64: str) -> np.ndarray:
    """int16 so that differences of two images do not wrap around."""
    return np.asarray(decode(b64), dtype=np.int16)


def server_timing(header: str) -> dict[str, float]:
    """Milliseconds per part of a Server-Timing header (`name;dur=ms, ...`), in order."""
    parts = (part.split(";dur=") for part in header.split(", "))
    return {name: float(ms) for name, ms in parts}
