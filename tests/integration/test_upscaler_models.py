"""Upscaler models through the real service: `bentoml serve` with SDXL_UPSCALER_DIR holding a
tiny random ESRGAN (.safetensors), a tiny Real-ESRGAN Compact (.pth) and a file spandrel does
not know; tiles of 64 px, so a 100x72 picture goes through in 2x2 overlapping tiles."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from openai import OpenAI
from PIL import Image

from sdxl_service.engine.upscalers import load_upscaler, picture_tensor, tensor_picture
from tests import upscaler_files
from tests.decoded import pixels
from tests.service_process import RunningService, running_service

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def upscaler_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("upscalers")
    upscaler_files.esrgan(folder / "tiny-esrgan.safetensors", scale=2)
    upscaler_files.compact(folder / "tiny-compact.pth", scale=4)
    upscaler_files.unknown(folder / "mystery.safetensors")
    return folder


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, upscaler_dir: Path
) -> Iterator[RunningService]:
    env = {"SDXL_UPSCALER_DIR": str(upscaler_dir), "SDXL_UPSCALER_TILE": "64"}
    with running_service(tmp_path_factory.mktemp("service"), env) as running:
        yield running


@pytest.fixture
def http(service: RunningService) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.api, timeout=120) as client:
        yield client


def picture(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(11)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8), "RGB")


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def upscale(http: httpx.Client, image: Image.Image, **fields: object) -> httpx.Response:
    data = {key: str(value) for key, value in fields.items()}
    return http.post(
        "/images/upscale", data=data, files={"image": ("in.png", png(image), "image/png")}
    )


def test_models_lists_the_upscalers_with_architecture_and_scale(http: httpx.Client) -> None:
    cards = {card["id"]: card for card in http.get("/models").json()["data"]}
    assert cards["tiny-esrgan"]["upscaler"]["architecture"] == "ESRGAN"
    assert cards["tiny-esrgan"]["upscaler"]["scale"] == 2
    assert cards["tiny-compact"]["upscaler"]["architecture"] == "RealESRGAN Compact"
    assert (
        cards["tiny-compact"]["upscaler"]["format"],
        cards["tiny-compact"]["upscaler"]["scale"],
    ) == ("pth", 4)
    assert "spandrel does not know" in cards["mystery"]["warning"]


def test_an_upscale_alone_equals_spandrel_on_the_picture(
    http: httpx.Client, upscaler_dir: Path
) -> None:
    source = picture(100, 72)
    answer = upscale(http, source, upscaler="tiny-esrgan", scale=2, denoising_strength=0)
    assert answer.status_code == 200, answer.text
    assert answer.json()["size"] == "200x144"
    ours = pixels(answer.json()["data"][0]["b64_json"])
    model = load_upscaler(upscaler_dir / "tiny-esrgan.safetensors")
    with torch.inference_mode():
        theirs = np.asarray(tensor_picture(model(picture_tensor(source, "cpu", torch.float32))))
    assert ours.shape == theirs.shape == (144, 200, 3)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


def test_an_upscale_with_a_denoising_pass_reproduces(http: httpx.Client) -> None:
    source = picture(64, 48)
    fields = {
        "upscaler": "tiny-compact",
        "scale": 2,
        "seed": 3,
        "num_inference_steps": 4,
        "denoising_strength": 0.5,
    }
    first, again = upscale(http, source, **fields), upscale(http, source, **fields)
    assert first.status_code == 200, first.text
    image = pixels(first.json()["data"][0]["b64_json"])
    assert image.shape == (96, 128, 3)
    assert np.array_equal(image, pixels(again.json()["data"][0]["b64_json"]))


def test_hires_takes_an_upscaler_model(service: RunningService) -> None:
    client = OpenAI(base_url=service.api, api_key="unused")
    hires = {"scale": 2, "steps": 4, "denoising_strength": 0.6, "upscaler": "tiny-compact"}
    answer = client.images.generate(
        prompt="a castle",
        size="128x128",
        response_format="b64_json",
        extra_body={"seed": 9, "hires": hires},
    )
    assert pixels(answer.data[0].b64_json).shape == (128, 128, 3)


@pytest.mark.parametrize("name", ["mystery", "absent"])
def test_an_upscaler_spandrel_does_not_know_is_a_400_naming_the_field(
    http: httpx.Client, name: str
) -> None:
    answer = upscale(http, picture(64, 48), upscaler=name, scale=2)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "upscaler"
    answer = http.post(
        "/images/generations",
        json={"prompt": "a castle", "size": "128x128", "hires": {"upscaler": name}},
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "hires.upscaler"
