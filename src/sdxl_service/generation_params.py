"""Each generation parameter, declared once: its request name, type and bounds, its server
default, and who besides the request may set it.

`GenerationParams` is the declaration. Everything else derives from it:

- the request schemas take each field as an optional extension (`request_fields_model`),
- a model's or a LoRA's sidecar `<name>.json` takes those marked `sidecar`, by the same
  names (`sidecar_model`; `aliases` are older spellings still read, e.g. `steps`),
- the settings read the server default from `SDXL_<setting>` (`settings_fields_model`),
- `RenderParams` (contract/render_request.py) is a `GenerationParams` with the render's size,
  kind and adapters added,
- the infotext writes those with an A1111 label (`Declared.infotext`),

and `resolve` applies "request > LoRA sidecar > model sidecar > server setting" in one place,
None-aware (a guidance_scale of 0 is a value, not a missing one). A new parameter is one field
here, the engine code that acts on it, and its row in docs/API.md.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field, create_model
from pydantic.fields import FieldInfo

from .choices import RefinerMode, SchedulerName, ScheduleType, schedule_type_of, scheduler_of


@dataclass(frozen=True)
class Declared:
    """What a generation parameter is besides its type, bounds and default."""

    # The settings field of its server default (SDXL_<SETTING>); None: the field's own name.
    setting: str | None = None
    # Whether a model's or a LoRA's sidecar may give it.
    sidecar: bool = True
    # Other names a sidecar may give it by (spellings older files use).
    aliases: tuple[str, ...] = ()
    # AUTOMATIC1111's infotext label, written when the value is not the declared default; None:
    # not written by the declaration (the infotext writes it in a place and form of its own).
    infotext: str | None = None


class GenerationParams(BaseModel):
    """The generation parameters a request, a sidecar and the server may set; the defaults
    here are the server's (the settings' defaults)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Denoising steps, base and refiner together.
    num_inference_steps: Annotated[
        int, Field(ge=1, le=150), Declared(setting="steps", aliases=("steps",))
    ] = 30
    # Classifier-free guidance; 0 and 1 turn it off (one UNet pass per step).
    guidance_scale: Annotated[float, Field(ge=0.0, le=30.0), Declared()] = 5.0
    # Where the refiner takes over in the ensemble: the base denoises [0, frac).
    high_noise_frac: Annotated[float, Field(gt=0.0, lt=1.0), Declared()] = 0.8
    refiner: Annotated[RefinerMode, Declared()] = RefinerMode.ENSEMBLE
    # Also by AUTOMATIC1111's sampler names ("DPM++ 2M SDE", "Euler a", "DPM++ 2M Karras").
    scheduler: Annotated[SchedulerName, BeforeValidator(scheduler_of), Declared()] = (
        SchedulerName.EULER
    )
    # AUTOMATIC1111's "Schedule type" (or its labels: "Karras", "SGM Uniform"); automatic: the
    # scheduler's own. The infotext writes it beside the sampler, in A1111's form.
    schedule_type: Annotated[ScheduleType, BeforeValidator(schedule_type_of), Declared()] = (
        ScheduleType.AUTOMATIC
    )
    # AUTOMATIC1111's "Clip skip": 1 takes SDXL's own (penultimate) text encoder layer, 2 the
    # one before it (diffusers' clip_skip=1).
    clip_skip: Annotated[int, Field(ge=1, le=2), Declared(infotext="Clip skip")] = 1


@functools.cache
def declared(name: str) -> Declared:
    """The declaration of parameter `name`."""
    for item in GenerationParams.model_fields[name].metadata:
        if isinstance(item, Declared):
            return item
    raise LookupError(f"{name} has no Declared metadata")


PARAM_NAMES = tuple(GenerationParams.model_fields)
SIDECAR_NAMES = tuple(name for name in PARAM_NAMES if declared(name).sidecar)


def setting_name(name: str) -> str:
    """The settings field that holds parameter `name`'s server default."""
    return declared(name).setting or name


def _field(name: str, default: Any, *, optional: bool = False, **extra: Any) -> tuple[Any, Any]:
    """Parameter `name`'s type and its FieldInfo (bounds, metadata) with another default."""
    info = GenerationParams.model_fields[name]
    annotation: Any = info.annotation
    if optional:
        annotation = annotation | None
    return annotation, FieldInfo.merge_field_infos(info, default=default, **extra)


def _optional(name: str, **extra: Any) -> tuple[Any, Any]:
    return _field(name, None, optional=True, **extra)


def request_fields_model() -> type[BaseModel]:
    """The request's optional extensions, one per parameter (None: not asked)."""
    fields = {name: _optional(name) for name in PARAM_NAMES}
    return create_model("GenerationRequestFields", **fields)  # type: ignore[call-overload,no-any-return]


def sidecar_model() -> type[BaseModel]:
    """A sidecar's defaults: the parameters marked `sidecar`, by their request names (and
    their aliases); anything else in the file is an error."""
    fields = {
        name: _optional(name, validation_alias=AliasChoices(name, *declared(name).aliases))
        for name in SIDECAR_NAMES
    }
    config = ConfigDict(frozen=True, extra="forbid")
    return create_model("SidecarDefaults", __config__=config, **fields)  # type: ignore[call-overload,no-any-return]


def settings_fields(base: type[BaseModel]) -> type[BaseModel]:
    """`base` with a field per parameter's server default, named by its setting."""
    fields = {setting_name(name): _field(name, _default(name)) for name in PARAM_NAMES}
    return create_model("GenerationSettings", __base__=base, **fields)  # type: ignore[call-overload,no-any-return]


def _default(name: str) -> Any:
    return GenerationParams.model_fields[name].default


def alias_of(key: str) -> str:
    """The request name of a sidecar key (an alias or the name itself)."""
    for name in SIDECAR_NAMES:
        if key in declared(name).aliases:
            return name
    return key


def given(model: BaseModel | None) -> dict[str, Any]:
    """The parameters a request or a sidecar gives (None: not given)."""
    if model is None:
        return {}
    return {
        name: value for name in PARAM_NAMES if (value := getattr(model, name, None)) is not None
    }


def server_defaults(settings: object) -> dict[str, Any]:
    """The server's default of each parameter, from the settings."""
    return {name: getattr(settings, setting_name(name)) for name in PARAM_NAMES}


def resolve(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Each parameter from the first layer that gives it (not None), first layer first:
    request, LoRA sidecars, model sidecar, server defaults."""
    values: dict[str, Any] = {}
    for name in PARAM_NAMES:
        for layer in layers:
            if layer.get(name) is not None:
                values[name] = layer[name]
                break
    return values


def infotext_fields(params: GenerationParams) -> dict[str, object]:
    """The A1111 infotext fields the declaration writes: each labelled parameter whose value
    is not the declared default."""
    fields: dict[str, object] = {}
    for name in PARAM_NAMES:
        label = declared(name).infotext
        value = getattr(params, name)
        if label is not None and value != _default(name):
            fields[label] = value
    return fields
