"""Outpainting: the canvas arithmetic, the filled border, and edits that extend their picture
through the HTTP app (a pipeline that paints seeds stands in for the render worker)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from sdxl_service.api.app import create_app
from sdxl_service.api.files import LocalFileStore
from sdxl_service.api.outpainting import (
    ANCHORS,
    Borders,
    Canvas,
    canvas_of_borders,
    canvas_of_size,
    extend,
)
from sdxl_service.api.request_rules import INPAINT_STRENGTH
from sdxl_service.api.serving import ImagesServing
from sdxl_service.choices import RenderKind
from sdxl_service.settings import Settings
from tests.decoded import decode

from .test_serving import SeedPainter, error_of, left_half_transparent, noise, part

# --- the canvas ------------------------------------------------------------------------------


def test_borders_in_multiples_of_8_are_kept() -> None:
    assert canvas_of_borders((64, 48), Borders(left=16, bottom=8)) == Canvas(80, 56, 16, 0)


@pytest.mark.parametrize(
    ("picture", "borders", "canvas"),
    [
        # One side extended on the axis: it takes the rounding.
        ((64, 64), Borders(left=10), Canvas(80, 64, 16, 0)),
        ((64, 64), Borders(right=10), Canvas(80, 64, 0, 0)),
        ((64, 64), Borders(top=3), Canvas(64, 72, 0, 8)),
        # Both: split, the odd pixel to the right (bottom).
        ((64, 64), Borders(left=5, right=8), Canvas(80, 64, 6, 0)),
        ((64, 64), Borders(top=1, bottom=1), Canvas(64, 72, 0, 4)),
        # A picture side no multiple of 8: the extended side takes it, or the bottom.
        ((60, 50), Borders(left=8), Canvas(72, 56, 12, 0)),
    ],
)
def test_borders_round_the_canvas_up_to_multiples_of_8(
    picture: tuple[int, int], borders: Borders, canvas: Canvas
) -> None:
    assert canvas_of_borders(picture, borders) == canvas


@pytest.mark.parametrize(
    ("anchor", "left", "top"),
    [
        ("center", 16, 8),
        ("top", 16, 0),
        ("bottom", 16, 16),
        ("left", 0, 8),
        ("right", 32, 8),
        ("top-left", 0, 0),
        ("top-right", 32, 0),
        ("bottom-left", 0, 16),
        ("bottom-right", 32, 16),
    ],
)
def test_an_anchor_places_the_picture_on_a_larger_size(anchor: str, left: int, top: int) -> None:
    assert canvas_of_size((64, 48), (96, 64), anchor) == Canvas(96, 64, left, top)


def test_every_anchor_is_tested() -> None:
    assert len(ANCHORS) == 9


def test_a_size_smaller_than_the_picture_or_equal_to_it_is_refused() -> None:
    with pytest.raises(ValueError, match="smaller than the 64x64 image"):
        canvas_of_size((64, 64), (96, 56), "center")
    with pytest.raises(ValueError, match="nothing to outpaint"):
        canvas_of_size((64, 64), (64, 64), "center")


def test_the_border_is_masked_and_the_picture_kept_pixel_for_pixel() -> None:
    picture = noise(40, 24, seed=1)
    canvas = Canvas(64, 48, 8, 16)
    extended, mask = extend(picture, None, canvas)
    assert extended.size == mask.size == (64, 48)
    pixels, repaint = np.asarray(extended), np.asarray(mask)
    assert np.array_equal(pixels[16:40, 8:48], np.asarray(picture))
    assert (repaint[16:40, 8:48] == 0).all()
    repaint_copy = repaint.copy()
    repaint_copy[16:40, 8:48] = 255
    assert (repaint_copy == 255).all()


def test_the_clients_mask_is_kept_inside_the_picture() -> None:
    picture = noise(32, 32)
    client_mask = Image.new("L", (32, 32), 0)
    client_mask.paste(255, (0, 0, 16, 32))
    _, mask = extend(picture, client_mask, Canvas(48, 32, 16, 0))
    repaint = np.asarray(mask)
    assert (repaint[:, :32] == 255).all()  # the border and the client's left half
    assert (repaint[:, 32:] == 0).all()


def test_the_border_starts_as_the_pictures_edge_colours_blurred() -> None:
    """Fooocus' fill: a picture of two flat halves fills each side with its own colour, and
    the colours meet smoothly, not as a stretched seam."""
    picture = Image.new("RGB", (32, 32), (200, 40, 40))
    picture.paste((40, 40, 200), (0, 16, 32, 32))
    extended, _ = extend(picture, None, Canvas(96, 32, 32, 0))
    pixels = np.asarray(extended).astype(int)
    # Far out on the left, beside the red top half: reddish; beside the blue bottom: bluish.
    assert pixels[2, 0, 0] > pixels[2, 0, 2] and pixels[29, 0, 2] > pixels[29, 0, 0]
    # Blurred: down the border's column the colour changes by small steps, never a jump.
    column = pixels[:, 0, 0]
    assert np.abs(np.diff(column)).max() < 40
    assert column.min() >= 40 and column.max() <= 200


def test_a_large_canvas_is_filled_scaled_down_with_the_same_colours() -> None:
    """Over FILL_SIDE the fill is made on a smaller copy: the picture still comes back
    exactly, and the border holds the colour of the edge beside it."""
    picture = Image.new("RGB", (512, 256), (200, 40, 40))
    picture.paste((40, 40, 200), (0, 128, 512, 256))
    extended, _ = extend(picture, None, Canvas(1024, 256, 512, 0))
    pixels = np.asarray(extended).astype(int)
    assert np.array_equal(pixels[:, 512:], np.asarray(picture))
    assert pixels[10, 500, 0] > 150 and pixels[245, 500, 2] > 150  # beside the edge
    assert pixels[10, 0, 0] > pixels[10, 0, 2] and pixels[245, 0, 2] > pixels[245, 0, 0]


# --- through the app ---------------------------------------------------------------------------


@pytest.fixture
def painter() -> SeedPainter:
    return SeedPainter(native=64)


@pytest.fixture
def client(painter: SeedPainter, tmp_path) -> TestClient:
    settings = Settings(files_dir=tmp_path, max_body_bytes=1_000_000, max_pixels=128 * 128)
    serving = ImagesServing(settings, painter, LocalFileStore(tmp_path, 60))
    return TestClient(create_app(lambda: serving, settings.max_body_bytes))


def outpaint(client: TestClient, picture: Image.Image, mask=None, **fields: object):
    files = {"image": part(picture)} | ({} if mask is None else {"mask": part(mask)})
    data = {"prompt": "a wider view", "seed": "3"} | {
        key: json.dumps(value) if isinstance(value, dict) else str(value)
        for key, value in fields.items()
    }
    return client.post("/images/edits", files=files, data=data)


def test_outpaint_extends_the_picture_and_keeps_it_exactly(client, painter) -> None:
    picture = noise(64, 64)
    response = outpaint(client, picture, outpaint={"left": 16, "top": 8, "bottom": 8})
    assert response.status_code == 200, response.text
    assert response.json()["size"] == "80x80"
    answer = np.asarray(decode(response.json()["data"][0]["b64_json"]))
    assert answer.shape == (80, 80, 3)
    # The painter paints (seed, 0, 0) over the whole canvas; the picture's area comes back as
    # the picture's own pixels (the composite), the border as rendered.
    assert np.array_equal(answer[8:72, 16:80], np.asarray(picture))
    assert (answer[:, :16] == (3, 0, 0)).all() and (answer[:8] == (3, 0, 0)).all()
    job = painter.jobs[-1]
    assert (job.params.kind, job.params.strength) == (RenderKind.INPAINT, INPAINT_STRENGTH)
    assert (job.params.width, job.params.height) == (80, 80)
    mask = np.asarray(Image.frombytes("L", (80, 80), job.mask))
    assert (mask[8:72, 16:80] == 0).all() and (mask[:, :16] == 255).all()
    sent = np.asarray(Image.frombytes("RGB", (80, 80), job.init_image))
    assert np.array_equal(sent[8:72, 16:80], np.asarray(picture))


def test_a_larger_size_with_an_anchor_outpaints(client, painter) -> None:
    picture = noise(64, 64)
    response = outpaint(client, picture, size="96x64", outpaint_anchor="right")
    assert response.status_code == 200, response.text
    answer = np.asarray(decode(response.json()["data"][0]["b64_json"]))
    assert answer.shape == (64, 96, 3)
    assert np.array_equal(answer[:, 32:], np.asarray(picture))
    assert (answer[:, :32] == (3, 0, 0)).all()
    # width and height name the size as well.
    response = outpaint(client, picture, width=64, height=96, outpaint_anchor="top")
    assert response.status_code == 200, response.text
    answer = np.asarray(decode(response.json()["data"][0]["b64_json"]))
    assert np.array_equal(answer[:64], np.asarray(picture)) and (answer[64:] == (3, 0, 0)).all()


def test_the_clients_mask_repaints_inside_the_picture_too(client, painter) -> None:
    picture = noise(64, 64)
    response = outpaint(
        client, picture, left_half_transparent(64, 64), outpaint={"right": 16, "bottom": 0}
    )
    assert response.status_code == 200, response.text
    answer = np.asarray(decode(response.json()["data"][0]["b64_json"]))
    assert np.array_equal(answer[:, 32:64], np.asarray(picture)[:, 32:])
    assert (answer[:, :32] == (3, 0, 0)).all() and (answer[:, 64:] == (3, 0, 0)).all()


def test_without_outpaint_a_size_still_resizes_the_picture(client, painter) -> None:
    response = outpaint(client, noise(64, 64), size="96x96")
    assert response.status_code == 200, response.text
    job = painter.jobs[-1]
    assert job.params.kind is RenderKind.IMAGE_TO_IMAGE and job.mask is None


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        ({"outpaint": {"left": 8}, "size": "96x96"}, "size", "drop size"),
        ({"outpaint": {"left": 8}, "width": 96, "height": 96}, "width", "drop width"),
        ({"outpaint": {"left": 8}, "outpaint_anchor": "top"}, "outpaint_anchor", "one of them"),
        ({"outpaint": {"left": 8}, "width": 96}, "height", "given together"),
        ({"outpaint": {}}, "outpaint", "adds no pixels"),
        ({"outpaint": {"left": -8}}, "outpaint.left", "greater than or equal to 0"),
        ({"outpaint": {"middle": 8}}, "outpaint.middle", "Extra inputs"),
        ({"outpaint": "[8"}, "outpaint", "JSON object"),
        ({"outpaint": {"right": 200}}, "outpaint", "more than the 16384 pixels"),
        ({"outpaint_anchor": "top"}, "outpaint_anchor", "give its size"),
        ({"outpaint_anchor": "middle"}, "outpaint_anchor", "center"),
        ({"outpaint_anchor": "top", "size": "56x128"}, "size", "smaller than the 64x64"),
        ({"outpaint_anchor": "top", "size": "64x64"}, "size", "nothing to outpaint"),
        ({"outpaint_anchor": "top", "size": "128x136"}, "size", "more than the 16384 pixels"),
    ],
)
def test_bad_outpainting_is_a_400_naming_the_parameter(
    client, fields: dict, param: str, says: str
) -> None:
    error = error_of(outpaint(client, noise(64, 64), **fields))
    assert error["param"] == param
    assert says in error["message"], error["message"]


def test_outpaint_comes_as_the_openai_client_sends_an_object_in_a_form(client) -> None:
    """extra_body={"outpaint": {...}} in images.edit: the client's form has outpaint[left]."""
    response = client.post(
        "/images/edits",
        files={"image": part(noise(64, 64))},
        data={"prompt": "x", "outpaint[left]": "16", "outpaint[bottom]": "8"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["size"] == "80x72"
    error = error_of(
        client.post(
            "/images/edits",
            files={"image": part(noise(64, 64))},
            data={"prompt": "x", "outpaint[left]": "wide"},
        )
    )
    assert error["param"] == "outpaint.left"
