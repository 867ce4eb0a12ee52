"""`POST /v1/images/control-maps`, an extension: a control image as a ControlNet unit would
render it (fitted to the render size, canny edges when asked), as a PNG, so a client (the
playground) can show the map before it generates.

The same code as the units' (api/control_maps.py, api/inline_images.py) and the same limits:
what it answers is the map a `controlnets` unit with that image and preprocessor renders with
at that size. OpenCV and Pillow only: no torch in the HTTP process.
"""

from __future__ import annotations

import base64
import io
import time
from typing import Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from ..settings import Settings
from .control_maps import CANNY_HIGH, CANNY_LOW, canny_map, fit_crop_and_resize
from .errors import invalid_value
from .inline_images import decode_inline_image
from .sizing import SizeLimits, render_size
from .uploads import InvalidUpload


class ControlMapRequest(BaseModel):
    """A control image and the unit fields that shape its map (ControlNetRequest's names)."""

    model_config = ConfigDict(extra="forbid")

    # base64 or a data: URL; the body limit bounds its size.
    image: str
    preprocessor: Literal["none", "canny"] = "canny"
    low: int = Field(default=CANNY_LOW, ge=1, le=255)
    high: int = Field(default=CANNY_HIGH, ge=1, le=255)
    # The size the generation asks for (its `size`); the map comes at the size it renders.
    width: int = Field(ge=1, le=100_000)
    height: int = Field(ge=1, le=100_000)


class ControlMapData(BaseModel):
    b64_json: str


class ControlMapsResponse(BaseModel):
    created: int
    data: list[ControlMapData]
    # The map's size: the render size, larger than the one asked when that is rendered at
    # native scale (api/sizing.py's render_size).
    size: str


def control_map_answer(
    req: ControlMapRequest, settings: Settings, native_resolution: int
) -> ControlMapsResponse:
    """The map as a unit renders with it; 400 naming the parameter for anything wrong.
    Decodes and resizes a picture: call it off the event loop."""
    if req.low > req.high:
        # Checked here rather than in the model, so the error names `low` (as a unit's does).
        raise invalid_value("low", f"low ({req.low}) must not exceed high ({req.high}).")
    limits = SizeLimits(settings.min_side, settings.max_side, settings.max_pixels)
    try:
        limits.check(req.width, req.height)
    except ValueError as exc:
        raise invalid_value("width", f"{exc}.") from None
    width, height = render_size(
        req.width,
        req.height,
        native_resolution,
        render_native=settings.render_native,
        max_pixels=settings.max_pixels,
    )
    try:
        picture = decode_inline_image(req.image, "image")
    except InvalidUpload as exc:
        raise invalid_value(exc.param, str(exc)) from None
    fitted = fit_crop_and_resize(picture, width, height)
    if req.preprocessor == "canny":
        fitted = canny_map(fitted, req.low, req.high)
    png = io.BytesIO()
    Image.fromarray(fitted).save(png, format="PNG")
    return ControlMapsResponse(
        created=int(time.time()),
        data=[ControlMapData(b64_json=base64.b64encode(png.getvalue()).decode("ascii"))],
        size=f"{width}x{height}",
    )
