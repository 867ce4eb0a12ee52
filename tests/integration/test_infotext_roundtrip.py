"""An image's infotext is enough to make it again: read the PNG's `parameters` back with
AUTOMATIC1111's rules, ask the real service for those parameters, get the same pixels."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from sdxl_service.api.infotext_reader import parse_infotext

pytestmark = pytest.mark.integration


def image_of(answer: httpx.Response) -> Image.Image:
    assert answer.status_code == 200, answer.text
    data = base64.b64decode(answer.json()["data"][0]["b64_json"])
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize(
    "scheduler", ["dpmpp_2m_karras", "euler_trailing", "dpmpp_2m_sde_karras", "euler_a_karras"]
)
def test_the_parameters_read_back_from_a_png_make_the_same_image(
    http: httpx.Client, scheduler: str
) -> None:
    first = image_of(
        http.post(
            "/images/generations",
            json={
                "prompt": "a lighthouse, at dusk: oil on canvas",
                "negative_prompt": "blurry",
                "size": "64x64",
                "num_inference_steps": 4,
                "guidance_scale": 4.5,
                "scheduler": scheduler,
                "clip_skip": 2,
            },
        )
    )
    read = parse_infotext(first.text["parameters"])
    width, height = (int(side) for side in read["Size"].split("x"))
    again = image_of(
        http.post(
            "/images/generations",
            json={
                "prompt": read["Prompt"],
                "negative_prompt": read["Negative prompt"],
                "seed": int(read["Seed"]),
                "width": width,
                "height": height,
                "num_inference_steps": int(read["Steps"]),
                "guidance_scale": float(read["CFG scale"]),
                # A1111's own names: "DPM++ 2M" and "Karras".
                "scheduler": read["Sampler"],
                "schedule_type": read.get("Schedule type", "Automatic"),
                "clip_skip": int(read.get("Clip skip", "1")),
                "high_noise_frac": float(read["Refiner switch at"]),
            },
        )
    )
    assert np.array_equal(np.asarray(first.convert("RGB")), np.asarray(again.convert("RGB")))
    assert again.text["parameters"] == first.text["parameters"]


def pixels_of(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("output_format", ["png", "jpeg", "webp"])
def test_an_image_read_back_by_the_service_asks_for_the_same_pixels(
    http: httpx.Client, service_url: str, output_format: str
) -> None:
    """The official openai client makes an image with non-default settings; POST
    /v1/images/infotext reads its file back; its `request`, sent as it is, makes the same
    pixels and the same infotext."""
    from openai import OpenAI

    client = OpenAI(base_url=service_url, api_key="any", max_retries=0, timeout=300)
    first = client.images.generate(
        prompt="a lighthouse, at dusk: oil on canvas",
        size="128x128",
        extra_body={
            "negative_prompt": "blurry, lowres",
            "seed": 1234,
            "num_inference_steps": 4,
            "guidance_scale": 4.5,
            "scheduler": "dpmpp_2m_sde",
            "schedule_type": "karras",
            "clip_skip": 2,
            "high_noise_frac": 0.7,
            "hires": {"scale": 2, "steps": 2, "denoising_strength": 0.5, "upscaler": "lanczos"},
            "output_format": output_format,
            "response_format": "b64_json",
        },
    )
    data = base64.b64decode(first.data[0].b64_json or "")
    answer = http.post("/images/infotext", files={"image": (f"a.{output_format}", data)})
    assert answer.status_code == 200, answer.text
    read = answer.json()
    assert read["unused"] == []
    request = read["request"]
    assert request["scheduler"] == "dpmpp_2m_sde_karras" and request["size"] == "128x128"
    assert request["hires"] == {
        "scale": 2.0,
        "steps": 2,
        "denoising_strength": 0.5,
        "upscaler": "lanczos",
    }
    prompt = request.pop("prompt")
    size = request.pop("size")
    again = client.images.generate(
        prompt=prompt,
        size=size,
        extra_body={**request, "output_format": output_format, "response_format": "b64_json"},
    )
    data_again = base64.b64decode(again.data[0].b64_json or "")
    assert np.array_equal(pixels_of(data), pixels_of(data_again))
    reread = http.post("/images/infotext", files={"image": ("b", data_again)}).json()
    assert reread["infotext"] == read["infotext"]
