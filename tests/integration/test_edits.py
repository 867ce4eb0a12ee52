"""Edits and variations with the current openai client against the real service (tiny preset)."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from openai import OpenAI
from PIL import Image

from tests.decoded import decode, pixels

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(service_url: str) -> OpenAI:
    return OpenAI(base_url=service_url, api_key="any-string", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 64x64 noise picture, a mask with its left half transparent, a 96x64 picture."""
    folder = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    paths = {name: folder / f"{name}.png" for name in ("square", "mask", "wide")}
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)).save(paths["square"])
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 32, 64))
    mask.save(paths["mask"])
    Image.fromarray(rng.integers(0, 256, (64, 96, 3), np.uint8)).save(paths["wide"])
    return paths


def test_edit_answers_the_size_asked(client: OpenAI, pictures: dict[str, Path]) -> None:
    with pictures["wide"].open("rb") as image:
        result = client.images.edit(image=image, prompt="a red fox in the snow", size="128x128")
    assert len(result.data) == 1
    assert decode(result.data[0].b64_json).size == (128, 128)
    assert result.size == "128x128"


def test_edit_defaults_to_the_pictures_size(client: OpenAI, pictures: dict[str, Path]) -> None:
    with pictures["wide"].open("rb") as image:
        result = client.images.edit(image=image, prompt="a red fox in the snow")
    assert decode(result.data[0].b64_json).size == (96, 64)


def test_edit_with_mask_keeps_the_opaque_region_exactly(
    client: OpenAI, pictures: dict[str, Path]
) -> None:
    with pictures["square"].open("rb") as image, pictures["mask"].open("rb") as mask:
        result = client.images.edit(
            image=image, mask=mask, prompt="a red fox", size="64x64", extra_body={"seed": 3}
        )
    answer = pixels(result.data[0].b64_json)
    original = np.asarray(Image.open(pictures["square"]), dtype=np.int16)
    assert np.array_equal(answer[:, 32:], original[:, 32:])
    assert np.abs(answer[:, :32] - original[:, :32]).mean() > 5


def test_edit_seed_reproduces_identical_pixels(client: OpenAI, pictures: dict[str, Path]) -> None:
    def edit() -> tuple[int, np.ndarray]:
        with pictures["square"].open("rb") as image:
            item = client.images.edit(
                image=image,
                prompt="x",
                size="64x64",
                extra_body={"seed": 11, "strength": 0.5, "refiner": "sequential"},
            ).data[0]
        return item.model_extra["seed"], pixels(item.b64_json)

    (seed_a, first), (seed_b, second) = edit(), edit()
    assert seed_a == seed_b == 11
    assert np.array_equal(first, second)


def test_variation_makes_n_images_of_the_size_asked(
    client: OpenAI, pictures: dict[str, Path]
) -> None:
    with pictures["square"].open("rb") as image:
        result = client.images.create_variation(image=image, n=2, size="256x256")
    assert [decode(item.b64_json).size for item in result.data] == [(256, 256)] * 2
    seeds = [item.model_extra["seed"] for item in result.data]
    assert seeds[1] == seeds[0] + 1


def test_variation_as_url(client: OpenAI, pictures: dict[str, Path]) -> None:
    with pictures["square"].open("rb") as image:
        result = client.images.create_variation(image=image, size="256x256", response_format="url")
    response = httpx.get(result.data[0].url, timeout=30)
    assert response.status_code == 200
    assert Image.open(io.BytesIO(response.content)).size == (256, 256)
