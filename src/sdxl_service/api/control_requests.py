"""A request's ControlNet units: `controlnets`, each checked, its control image decoded, fitted
to the render size and (canny) preprocessed, in the HTTP process.

The result goes into the render request: the units' names, scales, start/end and Union modes
into its params (the batch key), the control images beside its init image, one per unit, as
raw RGB at the render size; with the hires fix, a second set fitted to its first pass's size
(the units act in both passes, as sd-webui-controlnet's default "Hires-Fix Option: Both" has
them). On an upscale a unit may leave out its image: it takes the picture being upscaled
(the "tile" recipe), its map fitted to the final size like any. Every bad unit is a 400
naming its parameter by its path
(`controlnets[1].image`); a model the folder lists with a problem (an SD 1.5 ControlNet) is
refused here, before anything is queued.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..contract.render_request import ControlNetParams, RenderRequest
from ..controlnet_catalog import ControlNetFile
from ..settings import Settings
from .control_maps import (
    CANNY_HIGH,
    CANNY_LOW,
    canny_map,
    fit_crop_and_resize,
    pixel_perfect_resolution,
)
from .errors import excerpt, invalid_value
from .infotext import ControlNetUnitText, Provenance
from .inline_images import decode_inline_image
from .inpaint_options import Region, resize_and_fill
from .uploads import InvalidUpload

# The real bound is SDXL_MAX_CONTROLNETS; this one only keeps absurd lists out of validation.
MAX_UNITS_LISTED = 64
# diffusers' `control_mode` of xinsir's ControlNet Union (and ProMax, which adds tile and
# repaint), by the names of the maps each index stands for.
UNION_MODES = {
    "openpose": 0,
    "depth": 1,
    "hed": 2,
    "pidi": 2,
    "scribble": 2,
    "ted": 2,
    "canny": 3,
    "lineart": 3,
    "anime_lineart": 3,
    "mlsd": 3,
    "normal": 4,
    "segment": 5,
    "tile": 6,
    "repaint": 7,
}


class ControlNetRequest(BaseModel):
    """One ControlNet unit as a request gives it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=256)
    # base64 or a data: URL; the body limit bounds its size. None: the uploaded picture, on
    # the endpoints whose units default to it (the upscale's), else a 400.
    image: str | None = None
    scale: float = Field(default=1.0, ge=0.0, le=2.0)
    start: float = Field(default=0.0, ge=0.0, le=1.0)
    end: float = Field(default=1.0, ge=0.0, le=1.0)
    preprocessor: Literal["none", "canny"] = "none"
    # canny's thresholds (AUTOMATIC1111's defaults).
    low: int = Field(default=CANNY_LOW, ge=1, le=255)
    high: int = Field(default=CANNY_HIGH, ge=1, le=255)
    # A Union model's map kind: a name of UNION_MODES or diffusers' control_mode integer.
    mode: str | int | None = None

    @model_validator(mode="after")
    def _thresholds_in_order(self) -> ControlNetRequest:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        return self


def with_controlnets(
    job: RenderRequest,
    provenance: Provenance | None,
    units: Sequence[ControlNetRequest],
    folder: Mapping[str, ControlNetFile],
    settings: Settings,
    only_masked: tuple[Region, tuple[int, int]] | None = None,
    own_picture: Image.Image | None = None,
) -> tuple[RenderRequest, Provenance | None]:
    """`job` with `units` in it (and their infotext in `provenance`); 400 naming the unit's
    parameter for anything wrong. `folder`: SDXL_CONTROLNET_DIR as this request sees it.
    `only_masked`: the region an "Only masked" edit renders, and the answer's size it is a
    region of (api/inpaint_options.py). `own_picture`: what a unit without an image takes
    (the picture an upscale enlarges, as sd-webui-controlnet takes img2img's input); None: a
    unit must bring its image. Decodes and resizes pictures: call it off the event loop."""
    if not units:
        return job, provenance
    params = job.params
    if len(units) > settings.max_controlnets:
        raise invalid_value(
            "controlnets",
            f"At most {settings.max_controlnets} ControlNet units per request, got {len(units)}.",
        )
    if params.upscale is not None and params.strength == 0:
        # The upscaler model's picture alone runs no denoising pass for a unit to steer (A1111
        # runs no diffusion either); refused rather than dropped, so no unit is silently unused.
        raise invalid_value(
            "controlnets",
            "ControlNet units steer the denoising pass, and denoising_strength 0 runs none; "
            "raise denoising_strength or drop controlnets.",
        )
    entries = [_entry(unit, index, folder) for index, unit in enumerate(units)]
    for index, entry in enumerate(entries):
        if entry.union != entries[0].union:
            raise invalid_value(
                f"controlnets[{index}].name",
                "A request's ControlNets are all Union models or none is (diffusers runs the "
                "two kinds in different pipelines).",
                code="invalid_controlnet",
            )
    # The hires fix runs the units in both passes: each pass gets the map fitted to its size.
    hires = params.hires
    first_size = (
        (params.width, params.height) if hires is None else (hires.first_width, hires.first_height)
    )
    chosen: list[ControlNetParams] = []
    images: list[bytes] = []
    first_pass_images: list[bytes] = []
    texts: list[ControlNetUnitText] = []
    for index, (unit, entry) in enumerate(zip(units, entries, strict=True)):
        param = f"controlnets[{index}]"
        if unit.start >= unit.end:
            raise invalid_value(
                f"{param}.start", f"start ({unit.start:g}) must be before end ({unit.end:g})."
            )
        mode = _mode(unit, entry, param)
        picture = _unit_picture(unit, param, own_picture)
        images.append(_control_map(picture, unit, params.width, params.height, only_masked))
        if hires is not None:
            first_pass_images.append(_control_map(picture, unit, *first_size))
        chosen.append(
            ControlNetParams(
                name=entry.name, scale=unit.scale, start=unit.start, end=unit.end, mode=mode
            )
        )
        canny = unit.preprocessor == "canny"
        texts.append(
            ControlNetUnitText(
                module=unit.preprocessor,
                model=entry.name,
                weight=unit.scale,
                guidance_start=unit.start,
                guidance_end=unit.end,
                # A1111 computes Pixel Perfect against the first pass's size.
                processor_res=(
                    pixel_perfect_resolution(picture.size, *first_size) if canny else None
                ),
                threshold_a=unit.low if canny else None,
                threshold_b=unit.high if canny else None,
                hr_option="Both" if hires is not None else None,
            )
        )
    new_params = params.model_copy(update={"controlnets": tuple(chosen)})
    new_job = RenderRequest.model_validate(
        {
            **dict(job),
            "params": new_params,
            "control_images": tuple(images),
            "first_pass_control_images": tuple(first_pass_images),
        }
    )
    if provenance is not None:
        provenance = replace(provenance, controlnets=tuple(texts))
    return new_job, provenance


def _unit_picture(
    unit: ControlNetRequest, param: str, own_picture: Image.Image | None
) -> Image.Image:
    """The unit's picture: its image decoded, or the request's own picture when it has none."""
    if unit.image is None:
        if own_picture is None:
            raise invalid_value(
                f"{param}.image",
                "A ControlNet unit needs an image here (only an upscale's units default to the "
                "picture being upscaled).",
            )
        return own_picture
    try:
        return decode_inline_image(unit.image, f"{param}.image")
    except InvalidUpload as exc:
        raise invalid_value(exc.param, str(exc)) from None


def _control_map(
    picture: Image.Image,
    unit: ControlNetRequest,
    width: int,
    height: int,
    only_masked: tuple[Region, tuple[int, int]] | None = None,
) -> bytes:
    """The unit's map at width x height: the picture fitted (Crop and Resize), then canny's
    edges of it when asked (made at that size: api/control_maps.py), raw RGB. "Only masked":
    fitted to the answer's size, then its region cut and fitted to width x height as diffusers'
    ControlNet inpaint pipeline fits its control image with `padding_mask_crop` (the crop,
    `resize_mode="fill"`), so the map lies where the picture's region does."""
    if only_masked is None:
        fitted = fit_crop_and_resize(picture, width, height)
    else:
        region, answered = only_masked
        whole = Image.fromarray(fit_crop_and_resize(picture, *answered))
        fitted = np.asarray(resize_and_fill(whole.crop(region), width, height))
    if unit.preprocessor == "canny":
        fitted = canny_map(fitted, unit.low, unit.high)
    return fitted.tobytes()


def _entry(
    unit: ControlNetRequest, index: int, folder: Mapping[str, ControlNetFile]
) -> ControlNetFile:
    entry = folder.get(unit.name)
    param = f"controlnets[{index}].name"
    if entry is None:
        raise invalid_value(
            param,
            f"There is no ControlNet '{excerpt(unit.name)}'; GET /v1/models lists the available "
            "ones (owned_by controlnet_dir).",
            code="controlnet_not_found",
        )
    if entry.problem is not None:
        raise invalid_value(
            param,
            f"ControlNet '{unit.name}' cannot be used: {entry.problem}.",
            code="invalid_controlnet",
        )
    return entry


def _mode(unit: ControlNetRequest, entry: ControlNetFile, param: str) -> int | None:
    """The unit's Union control_mode; None for other models (which take none)."""
    if not entry.union:
        if unit.mode is not None:
            raise invalid_value(
                f"{param}.mode",
                f"ControlNet '{entry.name}' is not a Union model; mode is for Union models only.",
            )
        return None
    names = ", ".join(name for name, value in UNION_MODES.items() if value < entry.control_types)
    if unit.mode is None:
        raise invalid_value(
            f"{param}.mode",
            f"ControlNet '{entry.name}' is a Union model: give the map's mode ({names}).",
        )
    mode = UNION_MODES.get(unit.mode) if isinstance(unit.mode, str) else unit.mode
    if mode is None and isinstance(unit.mode, str) and unit.mode.isdigit():
        mode = int(unit.mode)
    if mode is None or not 0 <= mode < entry.control_types:
        raise invalid_value(
            f"{param}.mode",
            f"'{excerpt(str(unit.mode))}' is not a mode of ControlNet '{entry.name}'; it takes "
            f"{names}, or 0 to {entry.control_types - 1}.",
        )
    return mode
