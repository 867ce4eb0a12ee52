"""The hires fix through the real service and the openai client: the final size, seeds
that reproduce, and errors that name the hires field."""

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
