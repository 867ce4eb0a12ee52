"""LoRA adapters through the real service and the official openai client (tiny preset).

A service of its own, with a LoRA folder this module fills; stopped however
the module ends.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from openai import OpenAI
from PIL import Image

from sdxl_service.engine.tiny import ensure_tiny_pair
from sdxl_service.settings import SERVICE_ID
from tests.decoded import pixels
from tests.lora_files import save_diffusers, save_kohya, sd15_shaped_layers, unet_layers
from tests.service_process import REPO, RunningService, running_service

pytestmark = pytest.mark.integration

PROMPT = "a red fox in the snow"
LIGHTNING = {"steps": 4, "guidance_scale": 0.0, "scheduler": "euler_trailing", "refiner": "none"}


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The tiny base the service loads (start_service's cache).
    base_dir, _ = ensure_tiny_pair(REPO / ".cache" / "sdxl-service")
    folder = tmp_path_factory.mktemp("loras")
    save_diffusers(folder, "style", unet_lora_layers=unet_layers(base_dir, seed=1))
    save_diffusers(folder, "sd15", unet_lora_layers=sd15_shaped_layers(base_dir, seed=5))
    # A few-step LoRA with its sidecar: SDXL-Lightning's recipe.
    save_diffusers(folder, "lightning", unet_lora_layers=unet_layers(base_dir, seed=3))
    (folder / "lightning.json").write_text(json.dumps(LIGHTNING))
    # Written now, moved into the folder while the service runs.
    save_kohya(tmp_path_factory.mktemp("later"), "late", unet_layers(base_dir, seed=2))
    return folder


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, lora_dir: Path) -> Iterator[RunningService]:
    workdir = tmp_path_factory.mktemp("lora-service")
    with running_service(workdir, extra_env={"SDXL_LORA_DIR": str(lora_dir)}) as running:
        yield running


@pytest.fixture(scope="module")
def client(service: RunningService) -> OpenAI:
    return OpenAI(base_url=service.api, api_key="any-string", max_retries=0, timeout=120)


def generate(client: OpenAI, prompt: str = PROMPT, **extra: Any) -> np.ndarray:
    model = extra.pop("model", SERVICE_ID)
    result = client.images.generate(
        model=model, prompt=prompt, size="64x64", extra_body={"seed": 7, **extra}
    )
    assert result.data[0].b64_json is not None
    return pixels(result.data[0].b64_json)


def test_loras_in_extra_body_change_the_image(client: OpenAI) -> None:
    without = generate(client)
    with_lora = generate(client, loras=[{"name": "style", "scale": 1.0}])
    assert np.abs(with_lora - without).max() > 10
    assert np.array_equal(generate(client), without)


def test_inline_tag_and_model_name_give_the_json_forms_image(client: OpenAI) -> None:
    listed = generate(client, loras=[{"name": "style", "scale": 0.8}])
    assert np.array_equal(generate(client, f"{PROMPT} <lora:style:0.8>"), listed)
    full = generate(client, loras=[{"name": "style", "scale": 1.0}])
    assert np.array_equal(generate(client, model=f"{SERVICE_ID}:style"), full)


def test_models_lists_the_loras_and_finds_files_added_while_running(
    client: OpenAI,
    service: RunningService,
    lora_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    listed = httpx.get(f"{service.api}/models", timeout=30).json()["data"]
    cards = {card["id"]: card for card in listed}
    assert cards[f"{SERVICE_ID}:style"]["lora"] == {
        "name": "style",
        "format": "diffusers",
        "components": ["unet"],
    }
    late = next(tmp_path_factory.getbasetemp().glob("later*/late.safetensors"))
    shutil.copy(late, lora_dir / "late.safetensors")
    ids = [model.id for model in client.models.list().data]
    assert f"{SERVICE_ID}:late" in ids
    assert np.abs(generate(client, loras=[{"name": "late"}]) - generate(client)).max() > 10


def test_an_unknown_lora_is_400_naming_loras(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        generate(client, loras=[{"name": "nowhere", "scale": 1.0}])
    error = refused.value.body
    assert isinstance(error, dict) and error["param"] == "loras"


def test_an_invalid_lora_is_400_and_the_service_renders_as_before(
    client: OpenAI, lora_dir: Path
) -> None:
    before = generate(client)
    with pytest.raises(openai.BadRequestError) as refused:
        generate(client, loras=[{"name": "sd15", "scale": 1.0}])
    error = refused.value.body
    assert isinstance(error, dict) and error["code"] == "invalid_lora"
    assert "sd15" in error["message"] and str(lora_dir) not in error["message"]
    assert np.array_equal(generate(client), before)


def test_an_edit_takes_loras_as_a_json_form_field(client: OpenAI) -> None:
    picture = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)).save(picture, format="PNG")

    def edit(**extra: Any) -> np.ndarray:
        result = client.images.edit(
            image=("picture.png", picture.getvalue(), "image/png"),
            prompt=PROMPT,
            size="64x64",
            extra_body={"seed": 7, **extra},
        )
        assert result.data[0].b64_json is not None
        return pixels(result.data[0].b64_json)

    loras = json.dumps([{"name": "style", "scale": 1.0}])
    assert np.abs(edit(loras=loras) - edit()).max() > 10


def test_a_few_step_lora_renders_with_its_sidecars_recipe(client: OpenAI) -> None:
    """The LoRA named alone renders as SDXL-Lightning's model card says (4 steps, guidance
    0, trailing Euler, no refiner: its sidecar), exactly as those fields asked explicitly."""
    lightning = [{"name": "lightning"}]
    by_sidecar = generate(client, loras=lightning)
    explicit = {
        "num_inference_steps": 4,
        "guidance_scale": 0.0,
        "scheduler": "euler_trailing",
        "refiner": "none",
    }
    assert np.array_equal(by_sidecar, generate(client, loras=lightning, **explicit))
    # The request's own fields still come first.
    assert not np.array_equal(by_sidecar, generate(client, loras=lightning, num_inference_steps=6))
    cards = {card.id: card for card in client.models.list().data}
    card = cards[f"{SERVICE_ID}:lightning"].model_extra["lora"]  # type: ignore[index]
    assert card["defaults"] == {"num_inference_steps": 4} | {
        key: value for key, value in LIGHTNING.items() if key != "steps"
    }


def test_an_image_with_a_lora_read_back_asks_for_the_same_pixels(
    client: OpenAI, service: RunningService
) -> None:
    """The infotext's prompt names the LoRA as A1111's does (`<lora:style:0.6>`), so the
    request POST /v1/images/infotext reads back from the file renders it again."""
    import base64

    made = client.images.generate(
        prompt=PROMPT,
        size="64x64",
        extra_body={
            "seed": 11,
            "loras": [{"name": "style", "scale": 0.6}],
            "num_inference_steps": 4,
        },
    )
    data = base64.b64decode(made.data[0].b64_json or "")
    read = httpx.post(
        f"{service.api}/images/infotext", files={"image": ("a.png", data)}, timeout=30
    )
    assert read.status_code == 200, read.text
    request = read.json()["request"]
    assert request["prompt"] == f"{PROMPT} <lora:style:0.6>"
    prompt, size = request.pop("prompt"), request.pop("size")
    again = client.images.generate(prompt=prompt, size=size, extra_body=request)
    assert np.array_equal(pixels(again.data[0].b64_json or ""), pixels(made.data[0].b64_json or ""))
    without = generate(client, seed=11)
    assert np.abs(pixels(made.data[0].b64_json or "") - without).max() > 10
