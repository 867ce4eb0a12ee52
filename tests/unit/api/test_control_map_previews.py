"""POST /v1/images/control-maps: the map a ControlNet unit renders with, as a PNG, made by the
same code in the HTTP process (the render worker is a fake: no torch here). Every bad input is
a 400 naming its parameter."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.unit.api.test_controlnets_api import error_of, make_client, picture_b64, write_folder
from tests.unit.api.test_serving import SeedPainter

# SeedPainter's model renders natively at 256: 128x128 is rendered at 256x256 and scaled down.
NATIVE = 256


@pytest.fixture
def painter() -> SeedPainter:
    return SeedPainter(native=NATIVE)


@pytest.fixture
def client(painter: SeedPainter, tmp_path: Path) -> TestClient:
    folder = tmp_path / "controlnets"
    folder.mkdir()
    write_folder(folder, "canny-sdxl")
    return make_client(painter, tmp_path, controlnet_dir=folder)


def preview(client: TestClient, **fields: Any) -> Any:
    body = {"image": picture_b64(), "width": 128, "height": 128, **fields}
    return client.post("/images/control-maps", json=body)


def decoded_map(response: Any) -> np.ndarray:
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"created", "data", "size"} and len(body["data"]) == 1
    png = Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"])))
    assert png.format == "PNG" and png.mode == "RGB"
    assert body["size"] == f"{png.width}x{png.height}"
    return np.asarray(png)


def control_image_rendered(
    client: TestClient, painter: SeedPainter, size: str, **unit: Any
) -> np.ndarray:
    body = {
        "prompt": "a fox",
        "size": size,
        "controlnets": [{"name": "canny-sdxl", "image": picture_b64(), **unit}],
    }
    response = client.post("/images/generations", json=body)
    assert response.status_code == 200, response.text
    job = painter.jobs[-1]
    shape = (job.params.height, job.params.width, 3)
    return np.frombuffer(job.control_images[0], np.uint8).reshape(shape)


@pytest.mark.parametrize(
    ("size", "fields"),
    [
        ("256x256", {"preprocessor": "canny"}),
        ("256x256", {"preprocessor": "canny", "low": 20, "high": 60}),
        ("256x256", {"preprocessor": "none"}),
        # Rendered at native scale (256x256), so the map is made at that size.
        ("128x128", {"preprocessor": "canny"}),
        ("320x192", {"preprocessor": "canny"}),
    ],
)
def test_the_preview_is_the_map_the_unit_renders_with(
    client: TestClient, painter: SeedPainter, size: str, fields: dict[str, Any]
) -> None:
    width, height = (int(side) for side in size.split("x"))
    shown = decoded_map(preview(client, width=width, height=height, **fields))
    rendered = control_image_rendered(client, painter, size, **fields)
    assert shown.shape == rendered.shape
    assert np.array_equal(shown, rendered)
    if fields["preprocessor"] == "canny":
        assert set(np.unique(shown)) == {0, 255}  # white edges on black


def test_small_sizes_come_at_the_size_they_render(client: TestClient) -> None:
    response = preview(client, width=128, height=128)
    assert decoded_map(response).shape == (NATIVE, NATIVE, 3)
    assert response.json()["size"] == "256x256"


def test_canny_is_the_default_and_a_data_url_is_taken(client: TestClient) -> None:
    default = decoded_map(preview(client, width=256, height=256))
    canny = decoded_map(
        preview(
            client, image=picture_b64(data_url=True), width=256, height=256, preprocessor="canny"
        )
    )
    assert np.array_equal(default, canny)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"image": "not base64!"}, "image"),
        ({"image": "https://example.com/cat.png"}, "image"),
        ({"image": base64.b64encode(b"no picture").decode()}, "image"),
        ({"preprocessor": "depth"}, "preprocessor"),
        ({"low": 0}, "low"),
        ({"high": 256}, "high"),
        ({"low": 200, "high": 100}, "low"),
        ({"width": 100}, "width"),
        ({"width": 4096}, "width"),
        ({"mode": "canny"}, "mode"),
    ],
)
def test_a_bad_value_is_a_400_naming_it(
    client: TestClient, fields: dict[str, Any], param: str
) -> None:
    assert error_of(preview(client, **fields))[0] == param


def test_an_oversized_picture_is_refused(client: TestClient) -> None:
    huge = Image.new("1", (20000, 20000))
    buffer = io.BytesIO()
    huge.save(buffer, "PNG")
    response = preview(client, image=base64.b64encode(buffer.getvalue()).decode())
    assert error_of(response)[0] == "image"
    # The service still answers.
    assert decoded_map(preview(client, width=256, height=256)).shape == (256, 256, 3)


def test_without_the_image_the_error_names_it(client: TestClient) -> None:
    response = client.post("/images/control-maps", json={"width": 256, "height": 256})
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("image", "missing_required_parameter")


def test_without_a_body_the_error_names_the_image(client: TestClient) -> None:
    response = client.post("/images/control-maps")
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("image", "missing_required_parameter")
