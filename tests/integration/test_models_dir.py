"""Several models through the real service: `bentoml serve` with SDXL_MODELS_DIR holding the
tiny base as a diffusers folder (with a sidecar) and as a single file, a broken checkpoint,
and a file added while it runs."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from openai import OpenAI
from safetensors.numpy import save_file

from sdxl_service.engine.tiny import ensure_tiny_pair
from sdxl_service.settings import SERVICE_ID
from tests.decoded import pixels
from tests.integration.test_legacy_client import run_legacy
from tests.service_process import REPO, RunningService, running_service
from tests.single_files import write_single_files

pytestmark = pytest.mark.integration

# The folder's sidecar: what a request that names the folder gets unless it says otherwise.
SIDECAR_STEPS, SIDECAR_GUIDANCE = 3, 4.0


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base, refiner = ensure_tiny_pair(REPO / ".cache" / "sdxl-service")
    folder = tmp_path_factory.mktemp("models")
    shutil.copytree(base, folder / "tiny-folder")
    (folder / "tiny-folder.json").write_text(
        f'{{"steps": {SIDECAR_STEPS}, "guidance_scale": {SIDECAR_GUIDANCE}}}'
    )
    files = write_single_files(base, refiner, tmp_path_factory.mktemp("single-files"))
    shutil.move(files[0], folder / "tiny-file.safetensors")
    # SDXL's prefixes over tensors of no architecture: listed, refused when it loads.
    w = np.zeros((2, 2), dtype=np.float32)
    prefixes = (
        "model.diffusion_model.",
        "conditioner.embedders.0.transformer.",
        "conditioner.embedders.1.model.",
    )
    save_file({f"{p}w": w for p in prefixes}, str(folder / "broken.safetensors"))
    return folder


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[RunningService]:
    env = {"SDXL_MODELS_DIR": str(models_dir), "SDXL_MODEL_CACHE": "1"}
    with running_service(tmp_path_factory.mktemp("service"), env) as running:
        yield running


def generate(service: RunningService, model: str, **extra: Any) -> list[np.ndarray]:
    client = OpenAI(base_url=service.api, api_key="any", max_retries=0, timeout=120)
    result = client.images.generate(
        model=model, prompt="a red fox", n=2, size="64x64", extra_body={"seed": 7, **extra}
    )
    return [pixels(image.b64_json or "") for image in result.data]


def cards(service: RunningService) -> dict[str, dict[str, Any]]:
    data = httpx.get(f"{service.api}/models", timeout=30).json()["data"]
    return {card["id"]: card for card in data}


def metric(service: RunningService, name: str) -> float:
    text = httpx.get(f"{service.root}/metrics", timeout=30).text
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name)]
    return sum(values)


def test_the_models_are_listed_beside_the_default(service: RunningService) -> None:
    listed = cards(service)
    assert SERVICE_ID in listed
    folder, file, broken = listed["tiny-folder"], listed["tiny-file"], listed["broken"]
    assert folder["details"]["format"] == "diffusers" and file["details"]["format"] == "single_file"
    for card in (folder, file):
        assert card["details"]["layout"] == "base" and card["details"]["pairs_with_refiner"]
        assert card["details"]["size_bytes"] > 0 and "warning" not in card
    # Shown by the request's names (the sidecar spells steps as older files do).
    assert folder["details"]["defaults"] == {
        "num_inference_steps": SIDECAR_STEPS,
        "guidance_scale": SIDECAR_GUIDANCE,
    }
    # The catalog reads headers only: a file of the right prefixes is listed, without warning.
    assert broken["details"]["layout"] == "base"


def test_each_model_renders_the_default_pixels_for_the_same_weights(
    service: RunningService,
) -> None:
    same = {"num_inference_steps": SIDECAR_STEPS, "guidance_scale": SIDECAR_GUIDANCE}
    default = generate(service, SERVICE_ID, **same)
    # The folder's sidecar gives those steps and guidance: nothing to ask.
    from_folder = generate(service, "tiny-folder")
    from_file = generate(service, "tiny-file", **same)
    for ours, folder, file in zip(default, from_folder, from_file, strict=True):
        assert ours.shape == (64, 64, 3)
        assert np.array_equal(folder, ours)
        # The file's UNet sits at other offsets in memory: the CPU kernels may round one level
        # apart (tests/unit/engine/test_single_file.py, `realigned`).
        assert np.abs(file.astype(int) - ours).max() <= 1
    assert np.abs(default[0].astype(int) - default[1]).mean() > 1
    # The request's own fields win over the sidecar's.
    assert not np.array_equal(
        generate(service, "tiny-folder", num_inference_steps=5)[0], default[0]
    )
    assert metric(service, 'sdxl_model_loads_total{outcome="ok"}') >= 2


def test_an_unknown_model_is_404(service: RunningService) -> None:
    with pytest.raises(openai.NotFoundError) as error:
        generate(service, "no-such-model")
    body = error.value.body
    assert isinstance(body, dict) and body["code"] == "model_not_found" and body["param"] == "model"


def test_a_broken_model_is_400_naming_model_and_the_default_still_renders(
    service: RunningService, models_dir: Path
) -> None:
    answer = httpx.post(
        f"{service.api}/images/generations",
        json={"model": "broken", "prompt": "a fox", "size": "64x64"},
        timeout=120,
    )
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert (error["param"], error["code"]) == ("model", "invalid_model")
    assert "model 'broken'" in error["message"] and str(models_dir) not in error["message"]
    assert metric(service, 'sdxl_model_loads_total{outcome="failed"}') >= 1
    assert len(generate(service, SERVICE_ID)) == 2
    assert len(generate(service, "tiny-folder")) == 2


def test_a_new_model_is_found_without_a_restart(service: RunningService, models_dir: Path) -> None:
    assert "late" not in cards(service)
    shutil.copy(models_dir / "tiny-file.safetensors", models_dir / "late.safetensors")
    (models_dir / "late.json").write_text('{"steps": 99999}')
    late = cards(service)["late"]
    assert "late.json" in late["warning"]
    answer = httpx.post(
        f"{service.api}/images/generations", json={"model": "late", "prompt": "x"}, timeout=60
    )
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "model"
    (models_dir / "late.json").unlink()
    assert len(generate(service, "late")) == 2
    assert metric(service, "sdxl_models_resident") == 1  # SDXL_MODEL_CACHE=1


LEGACY = """
import base64, io, json, sys
import openai
from PIL import Image

openai.api_base = sys.argv[1]
openai.api_key = "random-string"
out = {}
response = openai.Image.create(model="tiny-folder", prompt="a red fox", n=1, size="64x64")
image = Image.open(io.BytesIO(base64.b64decode(response["data"][0]["b64_json"])))
out["size"] = list(image.size)
try:
    openai.Image.create(model="broken", prompt="x", n=1, size="64x64")
except openai.error.OpenAIError as exc:
    out["broken"] = [exc.http_status, exc.error.param, exc.error.code]
print(json.dumps(out))
"""


def test_the_legacy_client_picks_a_model(service: RunningService) -> None:
    out = run_legacy(LEGACY, service.api)
    assert out == {"size": [64, 64], "broken": [400, "model", "invalid_model"]}
