"""Control images fitted as AUTOMATIC1111's "Crop and Resize" does, and the canny map."""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from sdxl_service.api.control_maps import canny_map, fit_crop_and_resize, pixel_perfect_resolution


def gradient(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    return Image.fromarray(np.broadcast_to((x + y) / 2, (height, width, 3)).astype(np.uint8))


def test_a_wide_picture_is_scaled_to_cover_and_its_centre_kept() -> None:
    picture = gradient(200, 100)
    fitted = fit_crop_and_resize(picture, 64, 64)
    assert fitted.shape == (64, 64, 3)
    # k = max(64/100, 64/200) = 0.64: 128x64 with INTER_AREA (smaller), columns 32..96 kept.
    expected = cv2.resize(np.asarray(picture), (128, 64), interpolation=cv2.INTER_AREA)[:, 32:96]
    assert np.array_equal(fitted, expected)


def test_a_small_picture_is_enlarged_with_cubic() -> None:
    picture = gradient(30, 40)
    fitted = fit_crop_and_resize(picture, 96, 96)
    # k = max(96/40, 96/30) = 3.2: 96x128 with INTER_CUBIC (larger), rows 16..112 kept.
    expected = cv2.resize(np.asarray(picture), (96, 128), interpolation=cv2.INTER_CUBIC)[16:112]
    assert np.array_equal(fitted, expected)


def test_a_picture_of_the_render_size_is_kept_as_is() -> None:
    picture = gradient(64, 48)
    assert np.array_equal(fit_crop_and_resize(picture, 64, 48), np.asarray(picture))


def test_canny_draws_white_edges_on_black_at_its_thresholds() -> None:
    square = np.zeros((64, 64, 3), np.uint8)
    square[16:48, 16:48] = 200
    edges = canny_map(square)
    assert edges.shape == (64, 64, 3)
    assert set(np.unique(edges)) == {0, 255}
    assert edges[14:18, 30].max() == 255 and edges[32, 32].tolist() == [0, 0, 0]
    assert np.array_equal(edges[:, :, 0], cv2.Canny(square, 100, 200))
    # A faint square: under the default thresholds, over low ones.
    faint = np.zeros((64, 64, 3), np.uint8)
    faint[16:48, 16:48] = 10
    assert not canny_map(faint).any()
    assert canny_map(faint, 10, 20).any()


def test_pixel_perfect_resolution_is_the_short_side_scaled_to_cover() -> None:
    assert pixel_perfect_resolution((1000, 500), 1024, 1024) == 1024
    assert pixel_perfect_resolution((512, 512), 1024, 768) == 1024
    assert pixel_perfect_resolution((640, 480), 512, 512) == 512
