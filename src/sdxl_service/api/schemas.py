"""OpenAI Images API request and response models.

Fields the schema does not know are accepted and ignored (the legacy openai
client sends whatever keywords it is given); they are logged, never an error.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ..choices import HiresUpscaler
from ..generation_params import request_fields_model
from .control_requests import MAX_UNITS_LISTED, ControlNetRequest
from .inpaint_options import InpaintArea
from .outpainting import Anchor
from .sizing import AUTO_SIZE, parse_size

logger = logging.getLogger(__name__)

OPENAI_IMAGE_MODELS = ("dall-e-2", "dall-e-3")
OPENAI_IMAGE_MODEL_PREFIX = "gpt-image-"
MAX_NAME_CHARS = 256
# The real bound is SDXL_MAX_LORAS; this one only keeps absurd lists out.
MAX_LORAS_LISTED = 64
MAX_USER_CHARS = 1024
# Prompts are bounded by SDXL_MAX_PROMPT_CHARS in api/request_rules.py; this bound
# only keeps an absurd body from reaching it.
MAX_TEXT_CHARS = 100_000
# The real bounds are the server's sizes; this one only keeps absurd borders out.
MAX_OUTPAINT_PIXELS = 16384
# torch generators take 64-bit seeds; leave room for seed + i.
MAX_SEED = 2**63 - 1 - 64

Quality = Literal["standard", "hd", "low", "medium", "high", "auto"]
OutputFormat = Literal["png", "jpeg", "webp"]


# What a structured field holds, for the error when a multipart form's JSON text is not JSON.
_JSON_SHAPES = {
    "loras": "a JSON list of {name, scale}",
    "controlnets": "a JSON list of units {name, image, ...}",
    "ip_adapters": "a JSON list of {name, images, scale}",
    "outpaint": "a JSON object of left, right, top, bottom",
}


def json_form_field(value: Any, info: ValidationInfo) -> Any:
    """Multipart forms carry a list or object field as one JSON text field; JSON bodies give
    it as it is."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            name = info.field_name or "the field"
            raise ValueError(f"{name} must be {_JSON_SHAPES.get(name, 'JSON')}") from None
    return value


class OpenAIModel(BaseModel):
    """Base of every request model: unknown fields are kept aside and logged."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _log_ignored_fields(self) -> OpenAIModel:
        if self.model_extra:
            logger.info("ignoring unknown request fields: %s", sorted(self.model_extra))
        return self


class LoraRequest(BaseModel):
    """One LoRA of a request; names and scale bounds are checked in lora_requests.py."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=MAX_NAME_CHARS)
    scale: float = 1.0


class IpAdapterRequest(BaseModel):
    """One IP-Adapter of a request: an adapter of SDXL_IP_ADAPTER_DIR, its pictures (base64 or
    data: URLs) and scale; names, counts, pictures and bounds are checked in
    ip_adapter_requests.py, which names the parameter (`ip_adapters[0].images[2]`)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=MAX_NAME_CHARS)
    # The real bound (4) is ip_adapter_requests.py's; this one keeps absurd lists out.
    images: list[str] = Field(default_factory=list, max_length=64)
    scale: float = 0.6


if TYPE_CHECKING:
    # mypy sees no generated field; code reads them through generation_params.given.
    _GenerationFields = BaseModel
else:
    _GenerationFields = request_fields_model()


class ImageRequest(OpenAIModel, _GenerationFields):
    """What every Images endpoint takes: OpenAI's common parameters and this server's extensions.

    Edits and variations take them as multipart form fields (strings that
    pydantic converts), generations as JSON.
    """

    # Bounds on every free-text field: a megabyte of text costs memory and time
    # in both processes before any rule could refuse it.
    model: str | None = Field(default=None, max_length=MAX_NAME_CHARS)
    n: int | None = Field(default=None, ge=1)
    size: str | None = Field(default=None, max_length=MAX_NAME_CHARS)
    quality: Quality | None = None
    response_format: Literal["url", "b64_json"] | None = None
    output_format: OutputFormat | None = None
    output_compression: int | None = Field(default=None, ge=0, le=100)
    background: Literal["transparent", "opaque", "auto"] | None = None
    stream: bool | None = None
    partial_images: int | None = Field(default=None, ge=0, le=3)
    user: str | None = Field(default=None, max_length=MAX_USER_CHARS)

    # Extensions (the current openai client sends them with extra_body).
    negative_prompt: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    # The generation parameters (num_inference_steps, guidance_scale, ...) come from
    # generation_params.py, one optional field each.
    width: int | None = Field(default=None, ge=8)
    height: int | None = Field(default=None, ge=8)
    loras: list[LoraRequest] | None = Field(default=None, max_length=MAX_LORAS_LISTED)
    # ControlNet units (api/control_requests.py checks them against SDXL_CONTROLNET_DIR).
    controlnets: list[ControlNetRequest] | None = Field(default=None, max_length=MAX_UNITS_LISTED)

    # Pictures as part of the prompt (api/ip_adapter_requests.py).
    ip_adapters: list[IpAdapterRequest] | None = Field(default=None, max_length=MAX_LORAS_LISTED)

    _json_form_fields = field_validator("loras", "controlnets", "ip_adapters", mode="before")(
        json_form_field
    )

    @field_validator("size")
    @classmethod
    def _size_is_wxh_or_auto(cls, size: str | None) -> str | None:
        if size is not None and size != AUTO_SIZE:
            parse_size(size)
        return size


class HiresRequest(BaseModel):
    """AUTOMATIC1111's hires fix, with its defaults: render at the size divided by `scale`,
    upscale, then denoise again at the size (request_rules.py checks the sizes it makes)."""

    model_config = ConfigDict(extra="forbid")

    scale: float = Field(default=2.0, ge=1.0, le=2.0)
    # The second pass's schedule; None: the request's steps (A1111's "Hires steps" 0).
    steps: int | None = Field(default=None, ge=1, le=150)
    denoising_strength: float = Field(default=0.7, gt=0.0, le=1.0)
    # latent, lanczos (HiresUpscaler), or an upscaler model of SDXL_UPSCALER_DIR by name.
    upscaler: str = Field(default=HiresUpscaler.LATENT.value, min_length=1, max_length=128)


class ImageGenerationRequest(ImageRequest):
    prompt: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    style: Literal["vivid", "natural"] | None = None
    moderation: Literal["low", "auto"] | None = None
    # Extension: the hires fix (generations only).
    hires: HiresRequest | None = None


class OutpaintRequest(BaseModel):
    """Pixels added on each side of an edit's picture (api/outpainting.py); the answer's size
    is the picture's plus these, rounded up to multiples of 8 (within the server's bounds)."""

    model_config = ConfigDict(extra="forbid")

    left: int = Field(default=0, ge=0, le=MAX_OUTPAINT_PIXELS)
    right: int = Field(default=0, ge=0, le=MAX_OUTPAINT_PIXELS)
    top: int = Field(default=0, ge=0, le=MAX_OUTPAINT_PIXELS)
    bottom: int = Field(default=0, ge=0, le=MAX_OUTPAINT_PIXELS)


class ImageEditRequest(ImageRequest):
    """The form fields of POST /images/edits; `image` and `mask` are its files."""

    prompt: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    input_fidelity: Literal["high", "low"] | None = None
    # Extension: how much of the picture is re-drawn, from 0 (nothing) to 1 (all).
    strength: float | None = Field(default=None, gt=0.0, le=1.0)
    # Extensions: outpainting, by borders or onto a larger `size` at an anchor (not both).
    outpaint: OutpaintRequest | None = None
    outpaint_anchor: Anchor | None = None
    # Extensions: AUTOMATIC1111's inpainting options, for edits with a mask (or an outpaint):
    # the mask blurred, and "Only masked" with its padding (api/inpaint_options.py).
    mask_blur: int | None = Field(default=None, ge=0, le=64)
    inpaint_area: InpaintArea | None = None
    inpaint_padding: int | None = Field(default=None, ge=0, le=256)

    _json_form_field = field_validator("outpaint", mode="before")(json_form_field)


class ImageVariationRequest(ImageRequest):
    """The form fields of POST /images/variations; `image` is its file."""

    strength: float | None = Field(default=None, gt=0.0, le=1.0)


class ImageUpscaleRequest(ImageRequest):
    """The form fields of POST /images/upscale (an extension, as LocalAI has one): the picture
    resized by `scale` with Lanczos, then denoised again as an edit of it; `image` is its file."""

    prompt: str = Field(default="", max_length=MAX_TEXT_CHARS)
    scale: float = Field(default=2.0, ge=1.0, le=4.0)
    # Low by default: an upscale keeps the picture and adds detail. 0 (with `upscaler` only):
    # the upscaler model's picture alone, no denoising pass.
    denoising_strength: float = Field(default=0.3, ge=0.0, le=1.0)
    # An upscaler model of SDXL_UPSCALER_DIR the picture goes through first (its own scale,
    # then Lanczos to `scale`); None: Lanczos alone. Not `model`: that picks the checkpoint.
    upscaler: str | None = Field(default=None, min_length=1, max_length=128)


class ImageError(BaseModel):
    """Why one image of an answer is missing (the OpenAI error envelope's `error`)."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None
    seed: int
    # An image the safety checker flagged (SDXL_SAFETY_CHECKER): no b64_json or url, and
    # this (content_policy_violation) instead.
    error: ImageError | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    size: str
    output_format: OutputFormat
    quality: str
    background: Literal["opaque"] = "opaque"


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "stabilityai"
    preset: str | None = None
    warning: str | None = None
    details: dict[str, Any] = {}
    lora: dict[str, Any] | None = None  # a LoRA's card: name, format, components
    # An upscaler model's card: name, format, and (from the render worker) architecture, scale.
    upscaler: dict[str, Any] | None = None
    # A ControlNet's card: name, format, whether it is a Union model (and its control types).
    controlnet: dict[str, Any] | None = None
    # An IP-Adapter's card: name, kind, image tokens, image encoder.
    ip_adapter: dict[str, Any] | None = None
    # A textual-inversion embedding's card: name, vectors (tokens it takes in a prompt).
    embedding: dict[str, Any] | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
