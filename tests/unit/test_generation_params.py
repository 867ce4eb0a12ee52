"""Each generation parameter is declared once (generation_params.py); the request schema, the
sidecars, the settings, RenderParams and the infotext follow the declaration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from sdxl_service.api.infotext import Provenance, infotext
from sdxl_service.api.schemas import ImageEditRequest, ImageGenerationRequest
from sdxl_service.contract.render_request import RenderParams, RenderRequest
from sdxl_service.generation_params import (
    PARAM_NAMES,
    SIDECAR_NAMES,
    GenerationParams,
    declared,
    resolve,
    server_defaults,
    setting_name,
)
from sdxl_service.settings import Settings
from sdxl_service.sidecars import ModelDefaults, read_defaults


def schema_of(model: type, name: str) -> dict:
    prop = model.model_json_schema()["properties"][name]
    # Optional fields: the non-null branch carries the type and the bounds.
    return next((branch for branch in prop.get("anyOf", []) if branch != {"type": "null"}), prop)


def bounds(schema: dict) -> dict:
    keys = ("type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "enum", "$ref")
    return {key: schema[key] for key in keys if key in schema}


@pytest.mark.parametrize("name", PARAM_NAMES)
def test_every_request_kind_takes_the_parameter_with_its_declared_bounds(name: str) -> None:
    declared_schema = bounds(GenerationParams.model_json_schema()["properties"][name])
    for model in (ImageGenerationRequest, ImageEditRequest):
        assert bounds(schema_of(model, name)) == declared_schema
        assert model.model_fields[name].default is None  # not asked: the layers below decide


@pytest.mark.parametrize("name", PARAM_NAMES)
def test_the_settings_default_is_the_declared_one(name: str) -> None:
    assert getattr(Settings(), setting_name(name)) == GenerationParams.model_fields[name].default
    assert server_defaults(Settings()) == GenerationParams().model_dump()


@pytest.mark.parametrize("name", PARAM_NAMES)
def test_render_params_carry_the_parameter(name: str) -> None:
    assert RenderParams.model_fields[name].metadata == GenerationParams.model_fields[name].metadata


def test_the_declared_bounds_hold_everywhere() -> None:
    with pytest.raises(ValidationError):
        ImageGenerationRequest(prompt="x", num_inference_steps=151)
    with pytest.raises(ValidationError):
        ModelDefaults.model_validate({"num_inference_steps": 151})
    with pytest.raises(ValidationError):
        Settings(steps=151)
    with pytest.raises(ValidationError):
        RenderParams(width=64, height=64, num_inference_steps=151)


def test_a_sidecar_takes_the_request_names_and_the_old_steps(tmp_path: Path) -> None:
    assert set(SIDECAR_NAMES) <= set(PARAM_NAMES)
    sidecar = tmp_path / "model.json"
    sidecar.write_text(json.dumps({"num_inference_steps": 3, "guidance_scale": 2.0}))
    assert read_defaults(sidecar).given() == {"num_inference_steps": 3, "guidance_scale": 2.0}
    sidecar.write_text(json.dumps({"steps": 3}))
    assert read_defaults(sidecar).given() == {"num_inference_steps": 3}
    assert declared("num_inference_steps").aliases == ("steps",)


def test_a_bad_sidecar_names_the_field_by_the_requests_name(tmp_path: Path) -> None:
    sidecar = tmp_path / "model.json"
    sidecar.write_text(json.dumps({"steps": 0}))
    with pytest.raises(ValueError, match=r"num_inference_steps: Input should be greater"):
        read_defaults(sidecar)
    sidecar.write_text(json.dumps({"seed": 1}))
    with pytest.raises(ValueError, match=r"seed: Extra inputs are not permitted"):
        read_defaults(sidecar)


def test_resolve_takes_each_value_from_the_first_layer_that_gives_it() -> None:
    request = {"guidance_scale": 0.0}  # zero is a value, not a missing one
    lora = {"guidance_scale": 1.5, "num_inference_steps": 4, "clip_skip": None}
    model = {"num_inference_steps": 8, "clip_skip": 2}
    values = resolve(request, lora, model, server_defaults(Settings()))
    assert values["guidance_scale"] == 0.0
    assert values["num_inference_steps"] == 4
    assert values["clip_skip"] == 2
    assert values["scheduler"] == Settings().scheduler
    assert set(values) == set(PARAM_NAMES)


def test_the_infotext_writes_a_labelled_parameter_only_off_its_default() -> None:
    def text(**params: object) -> str:
        render = RenderRequest(
            request_id="r",
            params=RenderParams(width=64, height=64, **params),
            prompt="p",
            seeds=[1],
        )
        return infotext(render, Provenance("base", "refiner"), seed=1, width=64, height=64)

    assert "Clip skip" not in text()
    assert "Clip skip: 2" in text(clip_skip=2)
