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
