"""Upscaler models through the HTTP process: listed, named by hires.upscaler and the upscale
endpoint's `upscaler`, checked; the render worker is a fake that describes them as spandrel
would (the HTTP process never imports torch)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from sdxl_service.api.app import create_app
from sdxl_service.api.files import LocalFileStore
from sdxl_service.api.serving import ImagesServing
from sdxl_service.choices import HiresUpscaler, RenderKind
from sdxl_service.contract.render_request import GenerationOutcome, OutcomeStatus
from sdxl_service.settings import Settings
from tests.decoded import decode
from tests.unit.api.test_serving import SeedPainter

DESCRIBED = {
    "tiny-esrgan": {
        "name": "tiny-esrgan",
        "format": "safetensors",
        "architecture": "ESRGAN",
        "scale": 2,
        "purpose": "SR",
    },
    "mystery": {
        "name": "mystery",
        "format": "safetensors",
        "problem": "mystery.safetensors: spandrel does not know this model's architecture",
    },
}


class DescribingPainter(SeedPainter):
    def __init__(self) -> None:
        super().__init__()
        self.described: dict[str, Any] | None = DESCRIBED

    async def describe_upscalers(self) -> dict[str, Any] | None:
        return self.described


@pytest.fixture
def painter() -> DescribingPainter:
    return DescribingPainter()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    folder = tmp_path / "upscalers"
    folder.mkdir()
    # The HTTP process only lists the files: their bytes are the worker's to read.
    for name in ("tiny-esrgan.safetensors", "mystery.safetensors", "readme.md"):
        (folder / name).write_bytes(b"x")
    return folder


@pytest.fixture
def client(painter: DescribingPainter, folder: Path, tmp_path: Path) -> TestClient:
    settings = Settings(files_dir=tmp_path / "files", upscaler_dir=folder)
    serving = ImagesServing(settings, painter, LocalFileStore(tmp_path / "files", 60))
    return TestClient(create_app(lambda: serving, settings.max_body_bytes))


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def upscale(client: TestClient, **fields: object) -> Any:
    data = {key: str(value) for key, value in fields.items()}
    return client.post("/images/upscale", files={"image": ("a.png", png(64, 48))}, data=data)


def test_models_lists_each_upscaler_with_architecture_and_scale(client: TestClient) -> None:
    cards = {card["id"]: card for card in client.get("/models").json()["data"]}
    esrgan = cards["tiny-esrgan"]
    assert esrgan["owned_by"] == "upscaler_dir"
    assert esrgan["upscaler"] == {
        "name": "tiny-esrgan",
        "format": "safetensors",
        "architecture": "ESRGAN",
        "scale": 2,
        "purpose": "SR",
    }
    assert esrgan.get("warning") is None
    assert "spandrel does not know" in cards["mystery"]["warning"]
    assert "readme" not in cards


def test_models_lists_the_files_while_no_worker_has_described_them(
    client: TestClient, painter: DescribingPainter
) -> None:
    painter.described = None
    cards = {card["id"]: card for card in client.get("/models").json()["data"]}
    assert cards["tiny-esrgan"]["upscaler"] == {"name": "tiny-esrgan", "format": "safetensors"}


def test_hires_takes_an_upscaler_model_by_name(client: TestClient, painter: SeedPainter) -> None:
    body = {"prompt": "x", "size": "128x128", "hires": {"upscaler": "tiny-esrgan"}}
    assert client.post("/images/generations", json=body).status_code == 200
    hires = painter.jobs[-1].params.hires
    assert hires is not None
    assert (hires.upscaler, hires.upscaler_model) == (HiresUpscaler.LANCZOS, "tiny-esrgan")


@pytest.mark.parametrize("upscaler", ["latent", "lanczos"])
def test_hires_keeps_its_own_upscalers(
    client: TestClient, painter: SeedPainter, upscaler: str
) -> None:
    body = {"prompt": "x", "size": "128x128", "hires": {"upscaler": upscaler}}
    assert client.post("/images/generations", json=body).status_code == 200
    hires = painter.jobs[-1].params.hires
    assert hires is not None
    assert (hires.upscaler, hires.upscaler_model) == (HiresUpscaler(upscaler), None)


@pytest.mark.parametrize(
    ("upscaler", "code"), [("absent", "upscaler_not_found"), ("mystery", "invalid_upscaler")]
)
def test_hires_refuses_an_unknown_upscaler_naming_it(
    client: TestClient, painter: SeedPainter, upscaler: str, code: str
) -> None:
    body = {"prompt": "x", "size": "128x128", "hires": {"upscaler": upscaler}}
    response = client.post("/images/generations", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("hires.upscaler", code)
    assert not painter.jobs


def test_an_upscale_through_a_model_sends_the_picture_at_its_own_size(
    client: TestClient, painter: SeedPainter
) -> None:
    response = upscale(client, upscaler="tiny-esrgan", scale=2)
    assert response.status_code == 200
    job = painter.jobs[-1]
    params = job.params
    assert params.upscale is not None
    assert (params.upscale.upscaler, params.upscale.source_width, params.upscale.source_height) == (
        "tiny-esrgan",
        64,
        48,
    )
    assert (params.kind, params.strength) == (RenderKind.IMAGE_TO_IMAGE, 0.3)
    assert job.init_image == Image.open(io.BytesIO(png(64, 48))).convert("RGB").tobytes()
    assert decode(response.json()["data"][0]["b64_json"]).size == (128, 96)


def test_denoising_strength_0_is_the_upscale_alone(
    client: TestClient, painter: SeedPainter
) -> None:
    response = upscale(client, upscaler="tiny-esrgan", scale=2, denoising_strength=0)
    assert response.status_code == 200
    assert painter.jobs[-1].params.strength == 0


def test_denoising_strength_0_needs_an_upscaler(client: TestClient, painter: SeedPainter) -> None:
    response = upscale(client, scale=2, denoising_strength=0)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "denoising_strength"
    assert not painter.jobs


@pytest.mark.parametrize(
    ("upscaler", "code"), [("absent", "upscaler_not_found"), ("mystery", "invalid_upscaler")]
)
def test_an_upscale_refuses_an_unknown_upscaler_naming_it(
    client: TestClient, painter: SeedPainter, upscaler: str, code: str
) -> None:
    response = upscale(client, upscaler=upscaler)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("upscaler", code)
    assert not painter.jobs


def test_an_upscale_without_upscaler_is_as_before(client: TestClient, painter: SeedPainter) -> None:
    assert upscale(client, scale=2).status_code == 200
    job = painter.jobs[-1]
    assert job.params.upscale is None
    # Resized to the render size here, with Lanczos, as before.
    assert job.init_image is not None
    assert len(job.init_image) == 3 * job.params.width * job.params.height


def test_a_worker_that_cannot_load_the_upscaler_answers_400(
    client: TestClient, painter: SeedPainter
) -> None:
    painter.outcome = GenerationOutcome(
        status=OutcomeStatus.INVALID_UPSCALER, message="The upscaler 'tiny-esrgan' cannot be used"
    )
    response = upscale(client, upscaler="tiny-esrgan")
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("upscaler", "invalid_upscaler")
