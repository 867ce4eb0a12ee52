"""Inpainting checkpoints and outpainting through the real service: `bentoml serve` (tiny
preset) with SDXL_MODELS_DIR holding the tiny 9-channel inpainting model, driven by the
openai 3.x client (`images.edit` with `extra_body`) and raw HTTP for the errors."""

from __future__ import annotations

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
