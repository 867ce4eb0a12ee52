from __future__ import annotations

import pytest
from pydantic import ValidationError

from sdxl_service.api.schemas import (
    MAX_TEXT_CHARS,
    ImageEditRequest,
    ImageGenerationRequest,
    ImageVariationRequest,
)
from sdxl_service.choices import RefinerMode, SchedulerName


def test_minimal_request_defaults_are_unset() -> None:
    request = ImageGenerationRequest(prompt="x")
    assert request.n is None and request.size is None and request.response_format is None


def test_unknown_fields_are_kept_aside_not_rejected() -> None:
    request = ImageGenerationRequest.model_validate({"prompt": "x", "engine": "dalle"})
    assert request.model_extra == {"engine": "dalle"}


def test_extensions_parse() -> None:
    request = ImageGenerationRequest.model_validate(
        {"prompt": "x", "seed": 0, "refiner": "sequential", "scheduler": "unipc"}
    )
    assert request.seed == 0
    assert request.refiner is RefinerMode.SEQUENTIAL


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("size", "big"),
        ("n", 0),
        ("seed", -3),
        ("scheduler", "nope"),
        ("scheduler", "DPM++ 9M"),
        ("schedule_type", "Polyexponential"),
        ("quality", "best"),
    ],
)
def test_bad_values_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        ImageGenerationRequest.model_validate({"prompt": "x", field: value})
    assert info.value.errors()[0]["loc"][0] == field


def test_every_scheduler_the_api_names_has_a_recipe() -> None:
    from sdxl_service.engine.schedulers import SCHEDULERS

    assert set(SCHEDULERS) == set(SchedulerName)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("prompt", "x" * (MAX_TEXT_CHARS + 1)),
        ("negative_prompt", "x" * (MAX_TEXT_CHARS + 1)),
        ("user", "u" * 2000),
        ("model", "m" * 1000),
        ("size", "1" * 1000 + "x1024"),
    ],
)
def test_free_text_fields_are_bounded(field: str, value: str) -> None:
    with pytest.raises(ValidationError) as info:
        ImageGenerationRequest.model_validate({"prompt": "x", field: value})
    assert info.value.errors()[0]["loc"] == (field,)
    assert value not in str(info.value.errors()[0]["msg"])


def test_edit_form_strings_parse_like_json_values() -> None:
    request = ImageEditRequest.model_validate(
        {"prompt": "x", "n": "2", "strength": "0.4", "stream": "true", "seed": "0"}
    )
    assert (request.n, request.strength, request.stream, request.seed) == (2, 0.4, True, 0)


@pytest.mark.parametrize("model", [ImageEditRequest, ImageVariationRequest])
@pytest.mark.parametrize("strength", ["0", "-0.1", "1.01", "lots"])
def test_strength_is_above_0_and_at_most_1(model: type, strength: str) -> None:
    with pytest.raises(ValidationError) as info:
        model.model_validate({"prompt": "x", "strength": strength})
    assert info.value.errors()[0]["loc"] == ("strength",)


def test_a_variation_has_no_prompt() -> None:
    request = ImageVariationRequest.model_validate({"prompt": "ignored"})
    assert request.model_extra == {"prompt": "ignored"}
