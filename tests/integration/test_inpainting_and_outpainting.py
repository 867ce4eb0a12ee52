"""Inpainting checkpoints and outpainting through the real service: `bentoml serve` (tiny
preset) with SDXL_MODELS_DIR holding the tiny 9-channel inpainting model, driven by the
openai 3.x client (`images.edit` with `extra_body`) and raw HTTP for the errors."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from openai import OpenAI
from PIL import Image

from sdxl_service.engine.tiny import ensure_tiny_pair
from tests.decoded import pixels
from tests.inpainting_models import write_inpainting_model
from tests.integration.test_legacy_client import run_legacy
from tests.service_process import REPO, RunningService, running_service

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    base, _ = ensure_tiny_pair(REPO / ".cache" / "sdxl-service")
    models = tmp_path_factory.mktemp("models")
    write_inpainting_model(base, models / "fill")
    env = {"SDXL_MODELS_DIR": str(models)}
    with running_service(tmp_path_factory.mktemp("service"), env) as running:
        yield running


@pytest.fixture(scope="module")
def client(service: RunningService) -> OpenAI:
    return OpenAI(base_url=service.api, api_key="any", max_retries=0, timeout=300)


def png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


PICTURE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))


@pytest.mark.parametrize("model", [None, "fill"])
def test_outpaint_extends_the_picture_and_keeps_it(client: OpenAI, model: str | None) -> None:
    """With the default base (its inpaint path) and with the inpainting checkpoint."""
    result = client.images.edit(
        image=("picture.png", png(PICTURE), "image/png"),
        prompt="a wider view",
        **({} if model is None else {"model": model}),
        extra_body={"outpaint": {"left": 16, "top": 8}, "seed": 5},
    )
    answer = pixels(result.data[0].b64_json or "")
    assert answer.shape == (72, 80, 3)
    # The picture's area comes back exactly: the service composites it over the render.
    assert np.array_equal(answer[8:, 16:], np.asarray(PICTURE, dtype=np.int16))
    assert np.abs(answer[:8] - answer[8:16]).mean() > 0  # the border is rendered, not copied


def test_an_inpainting_model_edits_and_is_listed_as_one(
    client: OpenAI, service: RunningService
) -> None:
    result = client.images.edit(
        image=("picture.png", png(PICTURE), "image/png"),
        prompt="a fox",
        model="fill",
        size="64x64",
        extra_body={"seed": 3, "strength": 0.6},
    )
    assert pixels(result.data[0].b64_json or "").shape == (64, 64, 3)
    cards = {card["id"]: card for card in httpx.get(f"{service.api}/models").json()["data"]}
    assert cards["fill"]["details"]["kind"] == "inpainting"


def test_an_inpainting_model_refuses_generations_with_a_400_naming_model(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.generate(model="fill", prompt="a fox", size="64x64")
    error = refused.value.body
    assert isinstance(error, dict) and error["param"] == "model"
    assert error["code"] == "invalid_model"


def test_outpainting_beyond_the_servers_pixels_is_a_400_naming_outpaint(
    service: RunningService,
) -> None:
    response = httpx.post(
        f"{service.api}/images/edits",
        files={"image": ("picture.png", png(PICTURE), "image/png")},
        data={"prompt": "x", "outpaint": json.dumps({"right": 4000})},
        timeout=60,
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["type"]) == ("outpaint", "invalid_request_error")
    assert "pixels this server renders" in error["message"] or "between" in error["message"]
    # The service is still up.
    assert httpx.get(f"{service.root}/readyz", timeout=10).status_code == 200


LEGACY_OUTPAINT = """
import base64, io, json, sys
import openai
from PIL import Image
openai.api_base, openai.api_key = sys.argv[1], "any"
edit = openai.Image.create_edit(
    image=open(sys.argv[2], "rb"), prompt="a wider view", outpaint='{"right": 32}'
)
image = Image.open(io.BytesIO(base64.b64decode(edit["data"][0]["b64_json"])))
print(json.dumps({"size": list(image.size)}))
"""


def test_the_legacy_client_outpaints_with_a_json_keyword(
    service: RunningService, tmp_path: Path
) -> None:
    picture = tmp_path / "picture.png"
    PICTURE.save(picture)
    assert run_legacy(LEGACY_OUTPAINT, service.api, str(picture)) == {"size": [96, 64]}


def transparent_box(box: tuple[int, int, int, int]) -> Image.Image:
    """An OpenAI mask over PICTURE: the box transparent (repainted), the rest opaque."""
    mask = Image.new("RGBA", PICTURE.size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), box)
    return mask


def test_only_masked_with_a_blurred_mask_through_the_openai_client(client: OpenAI) -> None:
    """A1111's "Only masked": the region around the mask rendered at the full size and pasted
    back; far from it the picture's own pixels, and the infotext says so in A1111's words."""
    result = client.images.edit(
        image=("picture.png", png(PICTURE), "image/png"),
        mask=("mask.png", png(transparent_box((40, 40, 56, 56))), "image/png"),
        prompt="a fox",
        n=2,
        extra_body={
            "seed": 5,
            "mask_blur": 2,
            "inpaint_area": "only_masked",
            "inpaint_padding": 8,
        },
    )
    answers = [pixels(item.b64_json or "") for item in result.data]
    assert [answer.shape for answer in answers] == [(64, 64, 3)] * 2
    for answer in answers:
        assert np.array_equal(answer[:24, :24], np.asarray(PICTURE, dtype=np.int16)[:24, :24])
    assert np.abs(answers[0][44:52, 44:52] - answers[1][44:52, 44:52]).mean() > 0
    png_bytes = base64.b64decode(result.data[0].b64_json or "")
    text = Image.open(io.BytesIO(png_bytes)).text["parameters"]
    assert "Mask blur: 2, Inpaint area: Only masked, Masked area padding: 8" in text


def test_inpaint_options_as_raw_multipart_fields(service: RunningService) -> None:
    files = {
        "image": ("picture.png", png(PICTURE), "image/png"),
        "mask": ("mask.png", png(transparent_box((8, 8, 24, 24))), "image/png"),
    }
    fields = {"prompt": "a fox", "seed": "3", "inpaint_area": "only_masked", "mask_blur": "4"}
    with httpx.Client(base_url=service.api, timeout=300) as http:
        answer = http.post("/images/edits", data=fields, files=files)
        assert answer.status_code == 200, answer.text
        image = pixels(answer.json()["data"][0]["b64_json"])
        assert image.shape == (64, 64, 3)
        assert np.array_equal(image[48:, 48:], np.asarray(PICTURE, dtype=np.int16)[48:, 48:])
        for field, value in (("mask_blur", "65"), ("inpaint_area", "middle")):
            refused = http.post("/images/edits", data={**fields, field: value}, files=files)
            assert refused.status_code == 400, refused.text
            assert refused.json()["error"]["param"] == field
        refused = http.post(
            "/images/edits",
            data={"prompt": "a fox", "mask_blur": "4"},
            files={"image": files["image"]},
        )
        assert (refused.status_code, refused.json()["error"]["param"]) == (400, "mask_blur")
        assert http.post("/images/edits", data=fields, files=files).status_code == 200


LEGACY_ONLY_MASKED = """
import base64, io, json, sys
import openai
from PIL import Image
openai.api_base, openai.api_key = sys.argv[1], "any"
edit = openai.Image.create_edit(
    image=open(sys.argv[2], "rb"), mask=open(sys.argv[3], "rb"), prompt="a fox",
    mask_blur=4, inpaint_area="only_masked", inpaint_padding=16, seed=3,
)
data = base64.b64decode(edit["data"][0]["b64_json"])
image = Image.open(io.BytesIO(data))
corner = Image.open(sys.argv[2]).convert("RGB").getpixel((0, 0))
print(json.dumps({"size": list(image.size), "corner_kept": image.getpixel((0, 0)) == corner,
                  "only_masked": "Inpaint area: Only masked" in image.text["parameters"]}))
"""


def test_the_legacy_client_sends_them_as_keywords(service: RunningService, tmp_path: Path) -> None:
    picture, mask = tmp_path / "picture.png", tmp_path / "mask.png"
    PICTURE.save(picture)
    transparent_box((40, 40, 56, 56)).save(mask)
    assert run_legacy(LEGACY_ONLY_MASKED, service.api, str(picture), str(mask)) == {
        "size": [64, 64],
        "corner_kept": True,
        "only_masked": True,
    }
