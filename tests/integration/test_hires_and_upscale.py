"""The hires fix and POST /images/upscale through the real service: the final size, seeds
that reproduce, and errors that name the field."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from openai import BadRequestError, OpenAI
from PIL import Image

pytestmark = pytest.mark.integration


def pixels(b64: str | None) -> np.ndarray:
    assert b64 is not None
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"))


def test_a_hires_generation_comes_at_the_size_asked_and_reproduces(service_url: str) -> None:
    client = OpenAI(base_url=service_url, api_key="unused")
    hires = {"scale": 2, "steps": 4, "denoising_strength": 0.6, "upscaler": "lanczos"}

    def generate(upscaler: str) -> list[np.ndarray]:
        answer = client.images.generate(
            prompt="a castle on a hill",
            size="128x128",
            n=2,
            response_format="b64_json",
            extra_body={"seed": 9, "hires": {**hires, "upscaler": upscaler}},
        )
        assert [item.seed for item in answer.data] == [9, 10]  # type: ignore[attr-defined]
        return [pixels(item.b64_json) for item in answer.data]

    first, again, latent = generate("lanczos"), generate("lanczos"), generate("latent")
    assert [image.shape for image in first] == [(128, 128, 3)] * 2
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0], latent[0])


@pytest.mark.parametrize(
    ("hires", "param"),
    [
        ({"scale": 3}, "hires.scale"),
        ({"upscaler": "esrgan"}, "hires.upscaler"),
        ({"steps": 1, "denoising_strength": 0.5}, "hires.denoising_strength"),
        ({"scale": 2, "sharpness": 1}, "hires.sharpness"),
    ],
)
def test_a_bad_hires_field_is_a_400_naming_it(
    service_url: str, http: httpx.Client, hires: dict[str, object], param: str
) -> None:
    answer = http.post(
        "/images/generations", json={"prompt": "a castle", "size": "128x128", "hires": hires}
    )
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert (error["param"], error["type"]) == (param, "invalid_request_error")
    client = OpenAI(base_url=service_url, api_key="unused")
    with pytest.raises(BadRequestError):
        client.images.generate(prompt="a castle", size="128x128", extra_body={"hires": hires})


def png_of(size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(3)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def upscale(http: httpx.Client, picture: bytes, **fields: object) -> httpx.Response:
    data = {key: str(value) for key, value in fields.items()}
    return http.post(
        "/images/upscale", data=data, files={"image": ("in.png", picture, "image/png")}
    )


def test_an_upscale_is_the_picture_at_scale_times_its_size_and_reproduces(
    http: httpx.Client,
) -> None:
    picture = png_of((64, 48))
    first = upscale(http, picture, scale=2, seed=4, num_inference_steps=4, denoising_strength=0.5)
    assert first.status_code == 200, first.text
    [item] = first.json()["data"]
    assert item["seed"] == 4 and first.json()["size"] == "128x96"
    image = pixels(item["b64_json"])
    assert image.shape == (96, 128, 3)
    again = upscale(http, picture, scale=2, seed=4, num_inference_steps=4, denoising_strength=0.5)
    assert np.array_equal(pixels(again.json()["data"][0]["b64_json"]), image)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"scale": 5}, "scale"),
        ({"scale": 4, "size": "512x512"}, "size"),
        ({"denoising_strength": 0}, "denoising_strength"),
        ({"denoising_strength": 0.01, "num_inference_steps": 10}, "denoising_strength"),
    ],
)
def test_a_bad_upscale_is_a_400_naming_the_field(
    http: httpx.Client, fields: dict[str, object], param: str
) -> None:
    answer = upscale(http, png_of((64, 64)), **fields)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param


def test_an_upscale_beyond_the_pixel_limit_names_scale(http: httpx.Client) -> None:
    # 1024x1024 x 4 = 4096x4096: over SDXL_MAX_SIDE and SDXL_MAX_PIXELS.
    answer = upscale(http, png_of((1024, 1024)), scale=4)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "scale" and "4096x4096" in error["message"]
