"""Sidecar files `<name>.json` beside a model or a LoRA: the generation defaults it brings
(a few-step LoRA its sampler and steps, a fine-tune its guidance), each overridden by a
request's own fields. A sidecar speaks the request's vocabulary (`num_inference_steps`,
`guidance_scale`, ...: generation_params.py says which); `steps` is still read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from .generation_params import alias_of, given, sidecar_model

if TYPE_CHECKING:
    _SidecarFields = BaseModel
else:
    _SidecarFields = sidecar_model()


class ModelDefaults(_SidecarFields):
    """A sidecar `<name>.json`: a model's or a LoRA's defaults, a request's own fields first."""

    def given(self) -> dict[str, Any]:
        """The parameters this sidecar gives, by their request names."""
        return given(self)

    def describe(self) -> dict[str, Any]:
        """As a model card shows them (JSON values, request names)."""
        return self.model_dump(exclude_none=True, mode="json")


def read_defaults(sidecar: Path) -> ModelDefaults:
    """A sidecar's defaults; ValueError naming what is wrong with it (in request names)."""
    try:
        data = json.loads(sidecar.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"its sidecar {sidecar.name} is not valid JSON ({error})") from None
    try:
        return ModelDefaults.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(alias_of(str(part)) for part in item['loc']) or 'the file'}: {item['msg']}"
            for item in error.errors()
        )
        raise ValueError(f"its sidecar {sidecar.name} is invalid: {problems}") from None
