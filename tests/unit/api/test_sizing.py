from __future__ import annotations

import pytest

from sdxl_service.api.sizing import SizeLimits, fit_size, parse_size, render_size

LIMITS = SizeLimits(min_side=64, max_side=2048, max_pixels=2048 * 2048)


@pytest.mark.parametrize(("text", "size"), [("1024x1024", (1024, 1024)), (" 512X768 ", (512, 768))])
def test_parse_size(text: str, size: tuple[int, int]) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["abc", "1024", "1024x", "x1024", "-8x8", "10.5x10"])
def test_parse_size_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_size(text)


@pytest.mark.parametrize(
    ("size", "reason"),
    [((100, 104), "multiples of 8"), ((32, 64), "between"), ((4096, 8), "between")],
)
def test_limits_reject(size: tuple[int, int], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        LIMITS.check(*size)


def test_limits_total_pixels() -> None:
    with pytest.raises(ValueError, match="pixels"):
        SizeLimits(64, 2048, 1024 * 1024).check(2048, 1024)


def test_small_sizes_render_at_native_scale_keeping_aspect() -> None:
    assert render_size(512, 512, 1024, render_native=True, max_pixels=2048**2) == (1024, 1024)
    width, height = render_size(256, 512, 1024, render_native=True, max_pixels=2048**2)
    assert width % 8 == 0 and height % 8 == 0
    assert abs(width / height - 0.5) < 0.01
    assert abs(width * height - 1024 * 1024) / (1024 * 1024) < 0.02


def test_native_sizes_render_as_asked() -> None:
    assert render_size(1024, 1792, 1024, render_native=True, max_pixels=2048**2) == (1024, 1792)
    assert render_size(768, 1024, 1024, render_native=True, max_pixels=2048**2) == (768, 1024)


def test_render_native_off_renders_exactly() -> None:
    assert render_size(256, 256, 1024, render_native=False, max_pixels=2048**2) == (256, 256)


# The service's defaults: max_pixels below max_side².
SERVICE_LIMITS = SizeLimits(min_side=64, max_side=2048, max_pixels=1536 * 1536)


@pytest.mark.parametrize(
    ("size", "fitted"),
    [
        ((512, 512), (512, 512)),
        ((1000, 750), (1000, 752)),  # nearest multiples of 8
        ((4000, 3000), (1776, 1328)),  # down to max_pixels, same aspect ratio
        ((4096, 512), (2048, 256)),  # down to max_side
        ((40, 30), (88, 64)),  # up to min_side
    ],
)
def test_fit_size_keeps_the_aspect_ratio_within_the_limits(
    size: tuple[int, int], fitted: tuple[int, int]
) -> None:
    assert fit_size(*size, SERVICE_LIMITS) == fitted
    SERVICE_LIMITS.check(*fitted)


def test_fit_size_refuses_an_aspect_ratio_no_size_allows() -> None:
    with pytest.raises(ValueError, match="between 64 and 2048"):
        fit_size(10_000, 100, SERVICE_LIMITS)
