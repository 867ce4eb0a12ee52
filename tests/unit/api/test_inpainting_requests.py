"""Inpainting models as the HTTP process sees them: refused for generations before the queue
(400 naming `model`), taken for edits, and listed with their kind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from safetensors.numpy import save_file

from sdxl_service import model_catalog
from sdxl_service.api.app import create_app
from sdxl_service.api.files import LocalFileStore
from sdxl_service.api.serving import ImagesServing
from sdxl_service.choices import RenderKind
from sdxl_service.settings import Settings

from .test_serving import SeedPainter, error_of, noise, part


class InpaintingDefault(SeedPainter):
    """A render worker whose default model is an inpainting one (engine.describe's kind)."""

    async def describe(self) -> dict[str, Any]:
        return {**await super().describe(), "kind": "inpainting"}


def checkpoint(path: Path, in_channels: int) -> None:
    tensors = {
        f"{prefix}w": np.zeros((2, 2), np.float32)
        for prefix in (model_catalog.CLIP_L, model_catalog.BIGG_OF_BASE)
    }
    tensors[model_catalog.UNET_IN] = np.zeros((8, in_channels, 3, 3), np.float32)
    tensors[model_catalog.UNET_OUT] = np.zeros((4, 8, 3, 3), np.float32)
    save_file(tensors, str(path))


def client_of(painter: SeedPainter, tmp_path: Path) -> TestClient:
    models = tmp_path / "models"
    models.mkdir()
    checkpoint(models / "fill.safetensors", 9)
    checkpoint(models / "plain.safetensors", 4)
    settings = Settings(files_dir=tmp_path, max_body_bytes=1_000_000, models_dir=models)
    serving = ImagesServing(settings, painter, LocalFileStore(tmp_path, 60))
    return TestClient(create_app(lambda: serving, settings.max_body_bytes))


@pytest.fixture
def painter() -> SeedPainter:
    return SeedPainter()


def test_a_generation_on_an_inpainting_model_is_a_400_naming_model(painter, tmp_path) -> None:
    client = client_of(painter, tmp_path)
    error = error_of(client.post("/images/generations", json={"prompt": "x", "model": "fill"}))
    assert (error["param"], error["code"]) == ("model", "invalid_model")
    assert "model 'fill' is an inpainting model" in error["message"]
    assert not painter.jobs  # refused before the queue
    ok = client.post("/images/generations", json={"prompt": "x", "model": "plain"})
    assert ok.status_code == 200, ok.text


def test_an_inpainting_default_refuses_generations_and_takes_edits(tmp_path) -> None:
    painter = InpaintingDefault()
    client = client_of(painter, tmp_path)
    error = error_of(client.post("/images/generations", json={"prompt": "x"}))
    assert error["param"] == "model"
    assert "this server's default model is an inpainting model" in error["message"]
    # A model of the folder that renders text is still fine beside it.
    assert client.post("/images/generations", json={"prompt": "x", "model": "plain"}).is_success
    edit = client.post("/images/edits", files={"image": part(noise(64, 64))}, data={"prompt": "x"})
    assert edit.status_code == 200, edit.text
    assert painter.jobs[-1].params.kind is RenderKind.IMAGE_TO_IMAGE


def test_the_models_listing_says_which_are_inpainting_models(painter, tmp_path) -> None:
    cards = {
        card["id"]: card for card in client_of(painter, tmp_path).get("/models").json()["data"]
    }
    assert cards["fill"]["details"]["kind"] == "inpainting"
    assert cards["plain"]["details"]["kind"] == "text_to_image"


def test_controlnets_on_an_inpainting_model_are_a_400_naming_controlnets(painter, tmp_path) -> None:
    client = client_of(painter, tmp_path)
    units = '[{"name": "edges", "image": "AAAA"}]'
    data = {"prompt": "x", "model": "fill", "controlnets": units}
    error = error_of(client.post("/images/edits", files={"image": part(noise(64, 64))}, data=data))
    assert (error["param"], error["code"]) == ("controlnets", "invalid_value")
    assert "inpainting checkpoint takes none" in error["message"]
    assert not painter.jobs
