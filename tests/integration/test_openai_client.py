"""The current openai client against the real service (tiny preset)."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from openai import OpenAI
from PIL import Image

from tests.decoded import decode, pixels, server_timing

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(service_url: str) -> OpenAI:
    return OpenAI(base_url=service_url, api_key="any-string", max_retries=0, timeout=300)


def test_generate_two_images_at_1024(client: OpenAI) -> None:
    result = client.images.generate(prompt="a lighthouse at dusk", n=2, size="1024x1024")
    assert len(result.data) == 2
    for item in result.data:
        image = decode(item.b64_json)
        assert (image.format, image.size, image.mode) == ("PNG", (1024, 1024), "RGB")
    assert result.size == "1024x1024"
    assert result.output_format == "png"
    seeds = [item.model_extra["seed"] for item in result.data]
    assert seeds[1] == seeds[0] + 1


@pytest.mark.parametrize("size", ["512x512", "64x64", "256x384", "1024x768"])
def test_returned_image_has_requested_size(client: OpenAI, size: str) -> None:
    result = client.images.generate(prompt="panda", size=size, extra_body={"seed": 3})
    width, height = map(int, size.split("x"))
    assert decode(result.data[0].b64_json).size == (width, height)


def test_an_answer_says_where_its_time_went(client: OpenAI) -> None:
    raw = client.images.with_raw_response.generate(prompt="timed", n=2, size="64x64")
    assert len(raw.parse().data) == 2
    timing = server_timing(raw.headers["server-timing"])
    assert list(timing) == ["queue", "render", "encode", "total"]
    # The render worker's figures inside the HTTP service's own total.
    assert timing["render"] > 0 and timing["encode"] > 0 and timing["queue"] >= 0
    assert timing["queue"] + timing["render"] + timing["encode"] <= timing["total"] + 0.2


def test_same_seed_reproduces_identical_pixels(client: OpenAI) -> None:
    kwargs = {"prompt": "low polygon panda 3d", "size": "64x64", "extra_body": {"seed": 1234}}
    first = client.images.generate(**kwargs).data[0].b64_json
    second = client.images.generate(**kwargs).data[0].b64_json
    assert np.array_equal(pixels(first), pixels(second))


def test_seed_zero_is_a_seed(client: OpenAI) -> None:
    a = client.images.generate(prompt="x", size="64x64", extra_body={"seed": 0}).data[0]
    b = client.images.generate(prompt="x", size="64x64", extra_body={"seed": 0}).data[0]
    assert a.model_extra["seed"] == 0
    assert np.array_equal(pixels(a.b64_json), pixels(b.b64_json))


def test_different_seeds_differ(client: OpenAI) -> None:
    a = client.images.generate(prompt="x", size="64x64", extra_body={"seed": 1}).data[0]
    b = client.images.generate(prompt="x", size="64x64", extra_body={"seed": 2}).data[0]
    assert np.abs(pixels(a.b64_json) - pixels(b.b64_json)).mean() > 5


def test_image_in_request_of_n_matches_image_made_alone(client: OpenAI) -> None:
    batch = client.images.generate(prompt="rick", n=3, size="64x64", extra_body={"seed": 77})
    alone = client.images.generate(prompt="rick", n=1, size="64x64", extra_body={"seed": 79})
    assert [d.model_extra["seed"] for d in batch.data] == [77, 78, 79]
    diff = np.abs(pixels(batch.data[2].b64_json) - pixels(alone.data[0].b64_json))
    # Batched float math may differ in the last bits; the image is the same.
    assert diff.max() <= 2


@pytest.mark.parametrize(("fmt", "pil_format"), [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_output_formats(client: OpenAI, fmt: str, pil_format: str) -> None:
    result = client.images.generate(
        prompt="x", size="64x64", output_format=fmt, output_compression=80
    )
    assert decode(result.data[0].b64_json).format == pil_format
    assert result.output_format == fmt


def test_url_response_downloads_with_content_type(client: OpenAI) -> None:
    result = client.images.generate(prompt="x", size="64x64", response_format="url", n=2)
    assert all(item.b64_json is None for item in result.data)
    for item in result.data:
        response = httpx.get(item.url, timeout=30)
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(response.content)).size == (64, 64)


def test_url_honours_forwarded_headers(service_url: str) -> None:
    response = httpx.post(
        f"{service_url}/images/generations",
        json={"prompt": "x", "size": "64x64", "response_format": "url"},
        headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "images.example.com"},
        timeout=120,
    )
    assert response.status_code == 200
    assert response.json()["data"][0]["url"].startswith(
        "https://images.example.com/v1/images/files/"
    )


@pytest.mark.parametrize("refiner", ["ensemble", "sequential", "none"])
def test_refiner_modes(client: OpenAI, refiner: str) -> None:
    result = client.images.generate(
        prompt="x", size="64x64", extra_body={"seed": 5, "refiner": refiner}
    )
    assert decode(result.data[0].b64_json).size == (64, 64)


def test_refiner_changes_the_image(client: OpenAI) -> None:
    def render(refiner: str) -> np.ndarray:
        body = {"seed": 5, "refiner": refiner}
        return pixels(
            client.images.generate(prompt="x", size="64x64", extra_body=body).data[0].b64_json
        )

    assert np.abs(render("ensemble") - render("none")).mean() > 1


def test_extensions_are_accepted(client: OpenAI) -> None:
    result = client.images.generate(
        prompt="x",
        size="64x64",
        quality="hd",
        style="natural",
        user="someone",
        extra_body={
            "negative_prompt": "blurry",
            "num_inference_steps": 4,
            "guidance_scale": 7.5,
            "high_noise_frac": 0.7,
            "scheduler": "dpmpp_2m_karras",
        },
    )
    assert result.quality == "hd"
    assert len(result.data) == 1


def test_models_lists_the_service_and_warns_about_tiny(client: OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["stable-diffusion-xl-with-refiner"]
    assert models[0].model_extra["preset"] == "tiny"
    assert "noise" in models[0].model_extra["warning"]


def test_stream_with_the_current_client(client: OpenAI) -> None:
    stream = client.images.generate(prompt="x", size="64x64", stream=True, extra_body={"seed": 8})
    events = list(stream)
    assert [event.type for event in events] == ["image_generation.completed"]
    assert decode(events[0].b64_json).size == (64, 64)


def test_stream_with_partial_images(client: OpenAI) -> None:
    stream = client.images.generate(
        prompt="x",
        size="96x64",
        n=2,
        stream=True,
        partial_images=2,
        output_format="webp",
        extra_body={"seed": 30},
    )
    events = [event.model_dump() for event in stream]
    assert len(events) == 2 * (2 + 1)
    for seed in (30, 31):
        mine = [event for event in events if event["seed"] == seed]
        # For each image: its 2 previews, in order, then the image itself.
        assert [event["type"] for event in mine] == [
            "image_generation.partial_image",
            "image_generation.partial_image",
            "image_generation.completed",
        ]
        assert [event.get("partial_image_index") for event in mine[:2]] == [0, 1]
        for event in mine:
            picture = decode(event["b64_json"])
            assert (picture.size, picture.format) == ((96, 64), "WEBP")
            assert (event["size"], event["output_format"]) == ("96x64", "webp")
        # The completed image is the one a plain request makes for that seed.
        alone = client.images.generate(
            prompt="x",
            size="96x64",
            output_format="webp",
            response_format="b64_json",
            extra_body={"seed": seed},
        )
        assert np.array_equal(pixels(mine[-1]["b64_json"]), pixels(alone.data[0].b64_json))


def test_stream_of_an_edit_with_partial_images(client: OpenAI) -> None:
    picture = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(picture, format="PNG")
    stream = client.images.edit(
        image=("red.png", picture.getvalue(), "image/png"),
        prompt="x",
        size="64x64",
        stream=True,
        partial_images=1,
    )
    types = [event.type for event in stream]
    assert types == ["image_edit.partial_image", "image_edit.completed"]
