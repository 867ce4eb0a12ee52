"""Sidecar files `<name>.json` beside a model or a LoRA: the generation defaults it brings
(a few-step LoRA its sampler and steps, a fine-tune its guidance), each overridden by a
request's own fields."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .choices import RefinerMode, SchedulerName


class ModelDefaults(BaseModel):
    """A sidecar `<name>.json`: a model's or a LoRA's defaults, a request's own fields first."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int | None = Field(None, ge=1, le=150)
    guidance_scale: float | None = Field(None, ge=0.0, le=30.0)
    scheduler: SchedulerName | None = None
    refiner: RefinerMode | None = None
    clip_skip: int | None = Field(None, ge=1, le=2)
    high_noise_frac: float | None = Field(None, gt=0.0, lt=1.0)

    def over(self, other: ModelDefaults) -> ModelDefaults:
        """These defaults, and `other`'s where these say nothing."""
        mine = self.model_dump(exclude_none=True)
        return ModelDefaults.model_validate({**other.model_dump(exclude_none=True), **mine})


def read_defaults(sidecar: Path) -> ModelDefaults:
    """A sidecar's defaults; ValueError naming what is wrong with it."""
    try:
        data = json.loads(sidecar.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"its sidecar {sidecar.name} is not valid JSON ({error})") from None
    try:
        return ModelDefaults.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item['loc']) or 'the file'}: {item['msg']}"
            for item in error.errors()
        )
        raise ValueError(f"its sidecar {sidecar.name} is invalid: {problems}") from None
