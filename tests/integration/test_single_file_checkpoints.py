"""Single-file checkpoints through the real service: `bentoml serve` with SDXL_BASE_MODEL and
SDXL_REFINER_MODEL naming `.safetensors` files (the tiny pair in the original layout),
offline (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from openai import OpenAI
from safetensors.torch import save_file

from sdxl_service.engine.tiny import ensure_tiny_pair
from sdxl_service.settings import SERVICE_ID
from tests.decoded import pixels
from tests.polling import wait_until
from tests.service_process import REPO, RunningService, running_service
from tests.single_files import write_single_files

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def folders() -> tuple[Path, Path]:
    return ensure_tiny_pair(REPO / ".cache" / "sdxl-service")


@pytest.fixture(scope="module")
def checkpoints(
    tmp_path_factory: pytest.TempPathFactory, folders: tuple[Path, Path]
) -> tuple[Path, Path]:
    return write_single_files(*folders, tmp_path_factory.mktemp("checkpoints"))


def models_env(base: Path, refiner: Path) -> dict[str, str]:
    # The sdxl preset on the CPU, loading what the variables name (as a user's box would).
    return {
        "SDXL_PRESET": "sdxl",
        "SDXL_DEVICE": "cpu",
        "SDXL_DTYPE": "float32",
        "SDXL_BASE_MODEL": str(base),
        "SDXL_REFINER_MODEL": str(refiner),
        "HF_HUB_OFFLINE": "1",
    }


def rendered(service: RunningService) -> tuple[list[np.ndarray], dict[str, Any]]:
    client = OpenAI(base_url=service.api, api_key="any", max_retries=0, timeout=120)
    result = client.images.generate(
        model=SERVICE_ID, prompt="a red fox in the snow", n=2, size="64x64", extra_body={"seed": 7}
    )
    images = [pixels(image.b64_json or "") for image in result.data]
    card = httpx.get(f"{service.api}/models", timeout=30).json()["data"][0]
    return images, card


def test_single_file_checkpoints_serve_the_images_of_their_folders(
    tmp_path_factory: pytest.TempPathFactory,
    checkpoints: tuple[Path, Path],
    folders: tuple[Path, Path],
) -> None:
    with running_service(tmp_path_factory.mktemp("files"), models_env(*checkpoints)) as service:
        from_files, card = rendered(service)
    with running_service(tmp_path_factory.mktemp("folders"), models_env(*folders)) as service:
        from_folders, _ = rendered(service)
    assert [image.shape for image in from_files] == [(64, 64, 3)] * 2
    for ours, theirs in zip(from_files, from_folders, strict=True):
        assert np.array_equal(ours, theirs)
    assert np.abs(from_files[0] - from_files[1]).mean() > 1
    details = str(card)
    assert str(checkpoints[0]) in details and str(checkpoints[1]) in details


def test_a_lora_given_as_the_base_model_fails_the_load_naming_the_variable(
    tmp_path: Path, checkpoints: tuple[Path, Path]
) -> None:
    lora = tmp_path / "pixel-art.safetensors"
    save_file(
        {"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, lora
    )
    env = models_env(lora, checkpoints[1])
    with running_service(tmp_path / "service", env, wait_ready=False) as service:

        def refusal() -> dict[str, Any] | None:
            try:
                answer = httpx.post(
                    f"{service.api}/images/generations", json={"prompt": "x"}, timeout=30
                )
            except httpx.HTTPError:
                return None  # not listening yet
            body: dict[str, Any] = answer.json()
            code = body.get("error", {}).get("code")
            return (
                body["error"] if answer.status_code == 503 and code == "model_load_failed" else None
            )

        error = wait_until(refusal, timeout=240, interval=0.5, message="the failed load")
        assert (
            f"SDXL_BASE_MODEL='{lora}' is not an SDXL checkpoint: it is a LoRA"
            in (error["message"])
        )
        assert "SDXL_BASE_MODEL" in service.log_tail(60_000)
