"""Outpainting: the canvas an edit extends its picture to, and what its new border starts as.

An edit extends its picture either by borders in pixels (`outpaint`: left, right, top,
bottom) or onto a larger `size` with the picture placed at `outpaint_anchor`. The canvas is
the answer's size; the picture sits on it pixel for pixel (never resized), the new border is
repainted (mask 255) and the picture's own area keeps the client's mask (nothing repainted
without one).

Sizes stay multiples of 8 (api/sizing.py): borders are rounded up, the pixels added going to
the sides extended on that axis (split between two, the odd one to the right or bottom), or
to the right or bottom when neither is (a picture whose side is no multiple of 8). A `size`
is a multiple of 8 already; the anchor's offsets are floored.

The border starts as Fooocus fills it before inpainting: the picture's edge pixels
stretched outwards (modules/async_worker.py, `np.pad(..., mode='edge')`), then blurred
(modules/inpaint_worker.py, `fooocus_fill`) with ever smaller box blurs, the picture put
back after each, so the border is the picture's colours, smooth, with no seam at the edge.
It only matters to an edit of `strength` below 1 (the default, with a mask, is 1: the
border starts from noise, and an inpainting model sees it masked out): a stretched edge
alone starts streaks the sampler continues, noise starts detail the prompt did not ask
for, and InvokeAI's PatchMatch or LaMa infills need a native library or a model.
No torch here: the HTTP process builds the canvas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
from PIL import Image, ImageFilter

from .errors import invalid_value
from .sizing import SizeLimits
from .uploads import EditSource

# Where a picture sits on a larger `size` (`outpaint_anchor`): the side or corner it touches.
Anchor = Literal[
    "center",
    "top",
    "bottom",
    "left",
    "right",
    "top-left",
    "top-right",
    "bottom-left",
    "bottom-right",
]
ANCHORS: tuple[str, ...] = get_args(Anchor)
SIZE_MULTIPLE = 8
# Fooocus' fill: (box blur radius, passes), coarse to fine; made on at most this long a side.
FILL_BLURS = ((512, 2), (256, 2), (128, 4), (64, 4), (33, 8), (15, 8), (5, 16), (3, 16))
FILL_SIDE = 256


@dataclass(frozen=True)
class Canvas:
    """The extended picture's size and where the picture's top-left corner sits on it."""

    width: int
    height: int
    left: int
    top: int


@dataclass(frozen=True)
class Borders:
    left: int = 0
    right: int = 0
    top: int = 0
    bottom: int = 0


def _round_axis(side: int, before: int, after: int) -> tuple[int, int]:
    """The borders of one axis with the pixels added to make the whole a multiple of 8."""
    extra = -(side + before + after) % SIZE_MULTIPLE
    if before and after:
        return before + extra // 2, after + extra - extra // 2
    if before:
        return before + extra, after
    return before, after + extra


def canvas_of_borders(picture: tuple[int, int], borders: Borders) -> Canvas:
    """The canvas of a picture of `picture` (width, height) extended by `borders`, rounded up
    to multiples of 8."""
    width, height = picture
    left, right = _round_axis(width, borders.left, borders.right)
    top, bottom = _round_axis(height, borders.top, borders.bottom)
    return Canvas(width + left + right, height + top + bottom, left, top)


def canvas_of_size(picture: tuple[int, int], size: tuple[int, int], anchor: str) -> Canvas:
    """The canvas `size` with the picture at `anchor`; ValueError when the picture does not
    fit inside it or it adds nothing."""
    width, height = picture
    canvas_w, canvas_h = size
    if canvas_w < width or canvas_h < height:
        raise ValueError(
            f"the size {canvas_w}x{canvas_h} is smaller than the {width}x{height} image; "
            "outpainting extends a picture, so each side must be at least the image's"
        )
    if (canvas_w, canvas_h) == (width, height):
        raise ValueError(
            f"the size {canvas_w}x{canvas_h} is the image's own, so there is nothing to "
            "outpaint; give a larger size"
        )
    spare_w, spare_h = canvas_w - width, canvas_h - height
    vertical, _, horizontal = anchor.partition("-") if "-" in anchor else (anchor, "", anchor)
    left = {"left": 0, "right": spare_w}.get(horizontal, spare_w // 2)
    top = {"top": 0, "bottom": spare_h}.get(vertical, spare_h // 2)
    return Canvas(canvas_w, canvas_h, left, top)


def extend(
    picture: Image.Image, mask: Image.Image | None, canvas: Canvas
) -> tuple[Image.Image, Image.Image]:
    """The picture (RGB) on the canvas with its border filled, and the canvas' repaint mask
    (L, 255 repainted): the border, and in the picture's area the client's mask if any."""
    box = (canvas.left, canvas.top)
    repaint = Image.new("L", (canvas.width, canvas.height), 255)
    repaint.paste(mask if mask is not None else Image.new("L", picture.size, 0), box)
    known = np.zeros((canvas.height, canvas.width), dtype=bool)
    rows = slice(canvas.top, canvas.top + picture.height)
    known[rows, canvas.left : canvas.left + picture.width] = True
    rgb = np.asarray(picture.convert("RGB"))
    pad = (
        (canvas.top, canvas.height - canvas.top - picture.height),
        (canvas.left, canvas.width - canvas.left - picture.width),
        (0, 0),
    )
    stretched = np.pad(rgb, pad, mode="edge")
    return fill_border(stretched, known), repaint


def fill_border(image: np.ndarray, known: np.ndarray) -> Image.Image:
    """Fooocus' fill: box blurs from coarse to fine over the whole canvas, the `known`
    pixels put back after each pass.

    On a canvas whose long side is over FILL_SIDE, on a copy scaled down to it (radii
    scaled alike), then scaled back up with the picture pasted over: the fill is smooth
    by construction, and the VAE reads it at an eighth of its pixels anyway. Its 60 passes
    at full size took 10 s for 1536x768 on the 2-core development machine under load,
    0.5 s so.
    """
    height, width = known.shape
    scale = max(width, height) / FILL_SIDE
    if scale <= 1:
        return Image.fromarray(_fill(image, known, 1.0))
    size = (max(1, round(width / scale)), max(1, round(height / scale)))
    small = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))
    # Known only where the whole scaled-down pixel was known: the border's colours stay the
    # picture's edge, not a blend reaching over it.
    coverage = Image.fromarray(known.astype(np.uint8) * 255).resize(size, Image.Resampling.BOX)
    filled = Image.fromarray(_fill(small, np.asarray(coverage) == 255, scale))
    full = np.asarray(filled.resize((width, height), Image.Resampling.BICUBIC)).copy()
    full[known] = image[known]
    return Image.fromarray(full)


def _fill(image: np.ndarray, known: np.ndarray, scale: float) -> np.ndarray:
    kept = image[known]
    current = image.copy()
    for radius, passes in FILL_BLURS:
        blur = ImageFilter.BoxBlur(max(1.0, radius / scale))
        for _ in range(passes):
            current = np.asarray(Image.fromarray(current).filter(blur)).copy()
            current[known] = kept
    return current


def outpainted(
    source: EditSource,
    borders: Borders | None,
    anchor: str | None,
    size: tuple[int, int] | None,
    size_param: str,
    limits: SizeLimits,
) -> EditSource | None:
    """An edit's picture and mask on its outpainting canvas (the answer's size), or None when
    the edit does not outpaint; 400s name the parameter (`size_param`: `size` or `width`, the
    one that gave `size`)."""
    if borders is None and anchor is None:
        return None
    if borders is not None and anchor is not None:
        raise invalid_value(
            "outpaint_anchor",
            "outpaint_anchor places the picture on a larger size; with outpaint, its borders "
            "say where the picture goes. Give one of them.",
        )
    if borders is not None:
        if size is not None:
            raise invalid_value(
                size_param,
                "An outpainted edit is the image's size plus the outpaint borders; drop "
                f"{size_param}, or give it with outpaint_anchor instead of outpaint.",
            )
        if borders == Borders():
            raise invalid_value("outpaint", "outpaint adds no pixels; give a side above 0.")
        canvas, param = canvas_of_borders(source.image.size, borders), "outpaint"
    else:
        assert anchor is not None
        if size is None:
            raise invalid_value(
                "outpaint_anchor",
                "outpaint_anchor places the picture on a larger canvas: give its size.",
            )
        param = size_param
        try:
            canvas = canvas_of_size(source.image.size, size, anchor)
        except ValueError as exc:
            raise invalid_value(param, f"{str(exc)[0].upper()}{str(exc)[1:]}.") from None
    try:
        limits.check(canvas.width, canvas.height)
    except ValueError as exc:
        width, height = source.image.size
        raise invalid_value(
            param,
            f"Outpainting the {width}x{height} image makes {canvas.width}x{canvas.height}: {exc}.",
        ) from None
    picture, mask = extend(source.image, source.mask, canvas)
    return EditSource(picture, mask)
