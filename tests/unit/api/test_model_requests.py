"""What a request's `model` picks among SDXL_MODELS_DIR's, and how a sidecar's defaults give
way to the request's own fields."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from sdxl_service import model_catalog
from sdxl_service.api.errors import APIError
from sdxl_service.api.infotext import model_name
from sdxl_service.api.request_kinds import GENERATION
from sdxl_service.api.schemas import ImageGenerationRequest
from sdxl_service.choices import RefinerMode, SchedulerName
from sdxl_service.lora_catalog import LoraCatalog
from sdxl_service.model_catalog import ModelCatalog
from sdxl_service.settings import SERVICE_ID, Settings

SETTINGS = Settings()
W = np.zeros((2, 2), dtype=np.float32)


def base_file(path: Path) -> None:
    prefixes = (model_catalog.UNET, model_catalog.CLIP_L, model_catalog.BIGG_OF_BASE)
    save_file({f"{prefix}w": W for prefix in prefixes}, str(path))


@pytest.fixture
def models(tmp_path: Path) -> ModelCatalog:
    base_file(tmp_path / "lightning.safetensors")
    (tmp_path / "lightning.json").write_text(
        '{"steps": 4, "guidance_scale": 0, "scheduler": "euler_trailing", "refiner": "none",'
        ' "clip_skip": 2, "high_noise_frac": 0.6}'
    )
    base_file(tmp_path / "plain.safetensors")
    base_file(tmp_path / "bad-sidecar.safetensors")
    (tmp_path / "bad-sidecar.json").write_text('{"steps": 500}')
    save_file({"model.diffusion_model.w": W}, str(tmp_path / "unet-only.safetensors"))
    return ModelCatalog(tmp_path)


@pytest.fixture
def loras(tmp_path: Path) -> LoraCatalog:
    folder = tmp_path / "loras"
    folder.mkdir()
    save_file(
        {"lora_unet_down_blocks_0_attn1_to_q.lora_down.weight": W}, str(folder / "ink.safetensors")
    )
    return LoraCatalog(folder)


def resolve(models: ModelCatalog, loras: LoraCatalog | None = None, **fields: object):
    request = ImageGenerationRequest.model_validate({"prompt": "a fox", **fields})
    return GENERATION.resolve(request, None, SETTINGS, 1024, loras, models).job.params


def test_the_default_model_keeps_its_ids(models: ModelCatalog) -> None:
    for model in (None, SERVICE_ID, "dall-e-3", "gpt-image-1", SETTINGS.base_model):
        params = resolve(models, **({} if model is None else {"model": model}))
        assert params.model is None and params.num_inference_steps == SETTINGS.steps


def test_a_model_is_picked_by_name_with_its_sidecar_defaults(models: ModelCatalog) -> None:
    params = resolve(models, model="lightning")
    assert params.model == "lightning"
    assert (params.num_inference_steps, params.guidance_scale, params.clip_skip) == (4, 0.0, 2)
    assert params.scheduler is SchedulerName.EULER_TRAILING
    assert params.refiner is RefinerMode.NONE and params.high_noise_frac == 0.6
    plain = resolve(models, model="plain")
    assert plain.model == "plain" and plain.num_inference_steps == SETTINGS.steps


def test_the_requests_own_fields_override_the_sidecar(models: ModelCatalog) -> None:
    params = resolve(
        models,
        model="lightning",
        num_inference_steps=8,
        guidance_scale=1.5,
        scheduler="euler",
        refiner="ensemble",
        clip_skip=1,
        high_noise_frac=0.7,
    )
    assert (params.num_inference_steps, params.guidance_scale, params.clip_skip) == (8, 1.5, 1)
    assert params.scheduler is SchedulerName.EULER and params.refiner is RefinerMode.ENSEMBLE
    assert params.high_noise_frac == 0.7
    assert resolve(models, model="lightning", quality="hd").num_inference_steps == 50


def test_models_are_batch_keys_apart(models: ModelCatalog) -> None:
    assert resolve(models, model="plain") != resolve(models)


def test_a_model_with_a_lora(models: ModelCatalog, loras: LoraCatalog) -> None:
    params = resolve(models, loras, model="plain:ink")
    assert params.model == "plain" and [lora.name for lora in params.loras] == ["ink"]
    assert resolve(models, loras, model=f"{SERVICE_ID}:ink").model is None


def test_the_infotext_names_the_model_picked(models: ModelCatalog) -> None:
    request = ImageGenerationRequest(prompt="a fox", model="plain")
    provenance = GENERATION.resolve(request, None, SETTINGS, 1024, None, models).provenance
    assert provenance is not None and model_name(provenance.base_model) == "plain"


@pytest.mark.parametrize(
    "model", ["nope", "plain:nope", "nope:ink", "../plain", "plain:", f"{SERVICE_ID}:"]
)
def test_an_unknown_model_is_404(models: ModelCatalog, loras: LoraCatalog, model: str) -> None:
    with pytest.raises(APIError) as error:
        resolve(models, loras, model=model)
    assert (error.value.status, error.value.code, error.value.param) == (
        404,
        "model_not_found",
        "model",
    )


@pytest.mark.parametrize(
    ("model", "says"),
    [("bad-sidecar", "bad-sidecar.json"), ("unet-only", "not SDXL's text encoders")],
)
def test_a_model_that_cannot_render_is_400_naming_model(
    models: ModelCatalog, model: str, says: str
) -> None:
    with pytest.raises(APIError) as error:
        resolve(models, model=model)
    assert (error.value.status, error.value.code, error.value.param) == (
        400,
        "invalid_model",
        "model",
    )
    assert says in error.value.message
