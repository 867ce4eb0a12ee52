"""Control images for ControlNet: fitted to the render size, and the canny preprocessor (OpenCV,
no torch).

The fit is AUTOMATIC1111's ControlNet "Crop and Resize" (sd-webui-controlnet's
`detectmap_proc`, resize mode INNER_FIT): scale by k = max(h / old_h, w / old_w) so the
picture covers the render size, then crop the centre. Its `high_quality_resize` picks
INTER_AREA to shrink and INTER_CUBIC to enlarge, as here; its special cases are left out:
maps of 3 to 199 colours (segmentation) resized with INTER_NEAREST, and two-colour maps
(binary, one-pixel edges) re-thresholded with Otsu after the resize. A segmentation map is
best sent at the render size (nothing to resize then).

The canny map is made after the fit, at the render size: what A1111's "Pixel Perfect" aims
at (the preprocessor's resolution made the render size's), without its second resize.
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

# AUTOMATIC1111's ControlNet defaults for canny's low and high thresholds.
CANNY_LOW, CANNY_HIGH = 100, 200


def fit_crop_and_resize(picture: Image.Image, width: int, height: int) -> np.ndarray:
    """`picture` (RGB) scaled to cover width x height and centre-cropped to it: an HxWx3 array."""
    array = np.asarray(picture.convert("RGB"))
    old_h, old_w = array.shape[:2]
    k = max(height / old_h, width / old_w)
    new_w, new_h = int(np.round(old_w * k)), int(np.round(old_h * k))
    if (new_w, new_h) != (old_w, old_h):
        smaller = new_w * new_h < old_w * old_h
        interpolation = cv2.INTER_AREA if smaller else cv2.INTER_CUBIC
        array = cv2.resize(array, (new_w, new_h), interpolation=interpolation)
    top, left = max(0, (new_h - height) // 2), max(0, (new_w - width) // 2)
    return np.ascontiguousarray(array[top : top + height, left : left + width])


def canny_map(rgb: np.ndarray, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> np.ndarray:
    """The canny edges of an HxWx3 picture (cv2.Canny on it, as A1111's canny does), white on
    black, as HxWx3."""
    edges = cv2.Canny(rgb, low, high)
    return np.repeat(edges[:, :, None], 3, axis=2)


def pixel_perfect_resolution(source: tuple[int, int], width: int, height: int) -> int:
    """A1111's "Pixel Perfect" preprocessor resolution for Crop and Resize: the source's short
    side scaled by max(h / old_h, w / old_w). `source`: (width, height)."""
    old_w, old_h = source
    return int(np.round(max(height / old_h, width / old_w) * min(old_w, old_h)))
