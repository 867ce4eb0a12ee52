"""Image sizes: parsing `WxH`, bounds, and the resolution actually rendered.

SDXL degrades badly well below its native 1024 px, so small requests are
rendered at native scale (same aspect ratio) and downscaled afterwards.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_SIZE_PATTERN = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")

# Below this fraction of the native resolution on the short side, render at
# native scale instead (SDXL is visibly worse under ~768 px for 1024 native).
NATIVE_SHORT_SIDE_FRACTION = 0.75
AUTO_SIZE = "auto"
# Errors quote at most this much of a bad value (a 1 MB one is not sent back).
_SHOWN_CHARS = 40


def parse_size(size: str) -> tuple[int, int]:
    """`"1024x768"` -> (1024, 768); raises ValueError with a readable reason."""
    match = _SIZE_PATTERN.match(size)
    if not match:
        shown = size if len(size) <= _SHOWN_CHARS else size[:_SHOWN_CHARS] + "…"
        raise ValueError(f"'{shown}' is not a size; use WIDTHxHEIGHT (e.g. 1024x1024) or 'auto'")
    return int(match.group(1)), int(match.group(2))


@dataclass(frozen=True)
class SizeLimits:
    min_side: int
    max_side: int
    max_pixels: int

    def check(self, width: int, height: int) -> None:
        """Raises ValueError naming what is wrong with the size."""
        for side in (width, height):
            if side % 8:
                raise ValueError(f"width and height must be multiples of 8, got {width}x{height}")
            if not self.min_side <= side <= self.max_side:
                raise ValueError(
                    f"width and height must be between {self.min_side} and {self.max_side},"
                    f" got {width}x{height}"
                )
        if width * height > self.max_pixels:
            raise ValueError(
                f"{width}x{height} has more than the {self.max_pixels} pixels this server renders"
            )


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)


def render_size(
    width: int, height: int, native: int, *, render_native: bool, max_pixels: int
) -> tuple[int, int]:
    """The resolution to render for a requested size (downscaled afterwards)."""
    if not render_native or min(width, height) >= NATIVE_SHORT_SIDE_FRACTION * native:
        return width, height
    # Same aspect ratio, about native x native pixels in all.
    scale = native / math.sqrt(width * height)
    scale = min(scale, math.sqrt(max_pixels / (width * height)))
    render_w, render_h = _round_to(width * scale, 8), _round_to(height * scale, 8)
    if render_w < width or render_h < height:
        return width, height
    return render_w, render_h


def fit_size(width: int, height: int, limits: SizeLimits) -> tuple[int, int]:
    """The size nearest `width` x `height` (same aspect ratio) that `limits` allow.

    Scaled down to fit max_side and max_pixels, up to reach min_side, sides in
    multiples of 8. Raises ValueError when the aspect ratio cannot fit at all.
    """
    scale = min(1.0, limits.max_side / max(width, height))
    scale = min(scale, math.sqrt(limits.max_pixels / (width * height)))
    scale = max(scale, limits.min_side / min(width, height))
    nearest = (_round_to(width * scale, 8), _round_to(height * scale, 8))
    try:
        limits.check(*nearest)
        return nearest
    except ValueError:
        pass
    # Rounding up may have crossed a bound; multiples of 8 below cannot cross the upper ones.
    floored = (max(8, int(width * scale) // 8 * 8), max(8, int(height * scale) // 8 * 8))
    limits.check(*floored)
    return floored
