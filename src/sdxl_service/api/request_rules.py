"""The request rules: an Images API request -> the job to render and the answer's shape.

Pure functions of the request, the settings and the model's native size (and,
for edits, the uploaded picture): everything about defaults, bounds and which
combinations are refused lives here, as diffusers gathers its checks in
`check_inputs`. A bad value raises `APIError` naming the parameter.
"""

from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any

from PIL import Image

from ..choices import RenderKind
from ..contract.render_request import HiresParams, LoraWeight, RenderParams, RenderRequest
from ..lora_catalog import LoraCatalog
from ..model_catalog import ModelCatalog, ModelDefaults, ModelEntry
from ..settings import SERVICE_ID, Settings
from .encoding import resize_to
from .errors import APIError, excerpt, invalid_value
from .infotext import Provenance
from .lora_requests import lora_set, take_inline_loras
from .schemas import (
    OPENAI_IMAGE_MODEL_PREFIX,
    OPENAI_IMAGE_MODELS,
    HiresRequest,
    ImageEditRequest,
    ImageGenerationRequest,
    ImageRequest,
    ImageUpscaleRequest,
    ImageVariationRequest,
)
from .sizing import AUTO_SIZE, SizeLimits, fit_size, parse_size, render_size
from .uploads import EditSource

AUTO_SIZE_PIXELS = (1024, 1024)
# Default `strength` (share of the schedule re-drawn) of an edit without a mask,
# with one (OpenAI repaints the transparent region from scratch; what lies
# under it is often erased pixels), and of a variation (keeps the composition).
EDIT_STRENGTH = 0.75
INPAINT_STRENGTH = 1.0
VARIATION_STRENGTH = 0.6
VARIATION_SIZES = ((256, 256), (512, 512), (1024, 1024))
# OpenAI quality -> denoising steps (base + refiner together).
QUALITY_STEPS = {"low": 20, "medium": 30, "standard": 30, "high": 50, "hd": 50}


@dataclass(frozen=True, kw_only=True)
class ResolvedRequest:
    job: RenderRequest
    width: int  # the size answered, which may differ from the job's render size
    height: int
    response_format: str
    output_format: str
    output_compression: int | None
    quality: str
    # Inpainting, at the answered size: the picture, whose pixels are kept
    # exactly outside the mask (diffusers keeps them only in latent space,
    # through a lossy VAE round trip), and the mask.
    kept_picture: Image.Image | None = None
    repaint_mask: Image.Image | None = None
    # For the infotext each image carries (api/infotext.py); None with SDXL_IMAGE_METADATA=false.
    provenance: Provenance | None = None


def resolve_generation(
    req: ImageGenerationRequest,
    settings: Settings,
    native_resolution: int,
    catalog: LoraCatalog | None = None,
    models: ModelCatalog | None = None,
) -> ResolvedRequest:
    return _resolve(
        req,
        settings,
        native_resolution,
        prompt=req.prompt,
        catalog=catalog,
        models=models,
        hires=req.hires,
    )


def resolve_edit(
    req: ImageEditRequest,
    source: EditSource,
    settings: Settings,
    native_resolution: int,
    catalog: LoraCatalog | None = None,
    models: ModelCatalog | None = None,
) -> ResolvedRequest:
    """img2img over the picture, or inpainting with a mask; at the picture's size by default.

    Resizes the picture, so this takes CPU time: call it off the event loop.
    """
    default_strength = EDIT_STRENGTH if source.mask is None else INPAINT_STRENGTH
    return _resolve(
        req,
        settings,
        native_resolution,
        prompt=req.prompt,
        source=source,
        strength=req.strength or default_strength,
        default_size=None,
        catalog=catalog,
        models=models,
    )


def resolve_variation(
    req: ImageVariationRequest,
    source: EditSource,
    settings: Settings,
    native_resolution: int,
    catalog: LoraCatalog | None = None,
    models: ModelCatalog | None = None,
) -> ResolvedRequest:
    """An edit of a square picture with no prompt, in OpenAI's three sizes."""
    if req.stream:
        raise invalid_value("stream", "Variations are answered in one response; drop stream.")
    width, height = source.image.size
    if width != height:
        raise invalid_value(
            "image", f"Variations take a square image; this one is {width}x{height}."
        )
    resolved = _resolve(
        req,
        settings,
        native_resolution,
        prompt="",
        source=source,
        strength=req.strength or VARIATION_STRENGTH,
        catalog=catalog,
        models=models,
    )
    if (resolved.width, resolved.height) not in VARIATION_SIZES:
        sizes = ", ".join(f"{w}x{h}" for w, h in VARIATION_SIZES)
        param = "size" if req.width is None else "width"
        raise invalid_value(param, f"Variations come in {sizes}.")
    return resolved


def resolve_upscale(
    req: ImageUpscaleRequest,
    source: EditSource,
    settings: Settings,
    native_resolution: int,
    catalog: LoraCatalog | None = None,
    models: ModelCatalog | None = None,
) -> ResolvedRequest:
    """The picture at `scale` times its size (to multiples of 8), denoised again at
    `denoising_strength` as an edit of it: the Lanczos resize is the edit's own."""
    if req.stream:
        raise invalid_value("stream", "Upscales are answered in one response; drop stream.")
    for param in ("size", "width", "height"):
        if getattr(req, param) is not None:
            raise invalid_value(param, "An upscale is the image's size times scale; give scale.")
    if source.mask is not None:
        raise invalid_value("mask", "Upscales take no mask.")
    width, height = (max(8, round(side * req.scale / 8) * 8) for side in source.image.size)
    limits = SizeLimits(settings.min_side, settings.max_side, settings.max_pixels)
    try:
        limits.check(width, height)
    except ValueError as exc:
        w, h = source.image.size
        message = f"scale {req.scale} of the {w}x{h} image makes {width}x{height}: {exc}."
        raise invalid_value("scale", message) from None
    sized = req.model_copy(update={"width": width, "height": height})
    return _resolve(
        sized,
        settings,
        native_resolution,
        prompt=req.prompt,
        source=source,
        strength=req.denoising_strength,
        strength_param="denoising_strength",
        default_size=None,
        catalog=catalog,
        models=models,
    )


@dataclass(frozen=True)
class ModelChoice:
    """What a request's `model` picks: a model of SDXL_MODELS_DIR (None: the default pair),
    a LoRA on it, and the model's sidecar defaults."""

    name: str | None = None
    lora: str | None = None
    entry: ModelEntry | None = None

    @property
    def defaults(self) -> ModelDefaults:
        return self.entry.defaults if self.entry is not None else ModelDefaults()


def model_choice(
    model: str | None,
    settings: Settings,
    catalog: LoraCatalog | None = None,
    models: ModelCatalog | None = None,
) -> ModelChoice:
    """The model (and LoRA) `model` names: this server (`<service>` or `<service>:<lora>`), an
    OpenAI image model or one of the default's weights (the default pair), a model of
    SDXL_MODELS_DIR (`<name>` or `<name>:<lora>`); 404 for anything else, 400 naming `model`
    for a model of the folder that cannot render (its problem, a bad sidecar included)."""
    if model is None or model in (SERVICE_ID, *OPENAI_IMAGE_MODELS):
        return ModelChoice()
    if model.startswith(OPENAI_IMAGE_MODEL_PREFIX) or model in (
        settings.base_model,
        settings.refiner_model,
    ):
        return ModelChoice()
    name, _, lora = model.partition(":")
    found = catalog.find(lora) if lora and catalog is not None else None
    if found is None and (lora or model.endswith(":")):
        raise _unknown_model(model)
    if name == SERVICE_ID:
        return ModelChoice(lora=lora or None)
    entry = models.find(name) if models is not None else None
    if entry is None:
        raise _unknown_model(model)
    if entry.problem is not None:
        raise invalid_value("model", f"{entry.problem}.", code="invalid_model")
    return ModelChoice(name=name, lora=lora or None, entry=entry)


def _unknown_model(model: str) -> APIError:
    return APIError(
        404,
        f"The model '{excerpt(model)}' does not exist; this server serves '{SERVICE_ID}' "
        "and the models GET /v1/models lists.",
        param="model",
        code="model_not_found",
    )


def _steps(req: ImageRequest, settings: Settings, defaults: ModelDefaults) -> int:
    """The request's steps, its quality's, the model's sidecar default, the server's."""
    if req.num_inference_steps:
        return req.num_inference_steps
    if req.quality in QUALITY_STEPS:
        return QUALITY_STEPS[req.quality]
    return defaults.steps or settings.steps


def _resolve(
    req: ImageRequest,
    settings: Settings,
    native_resolution: int,
    *,
    prompt: str,
    source: EditSource | None = None,
    strength: float = 1.0,
    strength_param: str = "strength",
    default_size: tuple[int, int] | None = AUTO_SIZE_PIXELS,
    catalog: LoraCatalog | None = None,
    models: ModelCatalog | None = None,
    hires: HiresRequest | None = None,
) -> ResolvedRequest:
    s = settings
    # 1. What the request may ask at all.
    choice = model_choice(req.model, s, catalog, models)
    defaults = choice.defaults
    if req.background == "transparent":
        raise invalid_value(
            "background",
            "SDXL cannot make transparent images; use background 'opaque' or 'auto'.",
            code="unsupported_value",
        )
    if req.stream and req.response_format == "url":
        raise invalid_value(
            "response_format", "Streamed images are sent as b64_json; drop response_format."
        )
    n = req.n or 1
    if n > s.max_n:
        raise invalid_value("n", f"n must be between 1 and {s.max_n}, got {n}.")
    for param, text in (("prompt", prompt), ("negative_prompt", req.negative_prompt or "")):
        if len(text) > s.max_prompt_chars:
            message = f"The {param} is longer than {s.max_prompt_chars} characters."
            raise invalid_value(param, message)
    output_format = req.output_format or "png"
    if req.output_compression is not None and output_format == "png":
        raise invalid_value(
            "output_compression", "output_compression applies to jpeg and webp only."
        )
    # LoRAs: the list, the prompt's inline tags and the model's suffix add up.
    prompt, inline = take_inline_loras(prompt)
    asked = [(lora.name, lora.scale) for lora in req.loras or []] + inline
    if choice.lora is not None:
        asked.append((choice.lora, 1.0))
    loras = lora_set(asked, catalog, s.max_loras) if asked else ()
    # A LoRA's sidecar speaks over the model's (a few-step LoRA needs its sampler whatever
    # the checkpoint); between LoRAs, the first named.
    for name in reversed(dict.fromkeys(name for name, _ in asked)):
        found = catalog.find(name) if catalog is not None else None
        if found is not None:
            defaults = found.defaults.over(defaults)

    # 2. The size answered, and the (possibly larger) size rendered.
    width, height = _requested_size(req, s, default_size, source)
    render_w, render_h = render_size(
        width, height, native_resolution, render_native=s.render_native, max_pixels=s.max_pixels
    )

    # 3. Sampling: steps, guidance, refiner, scheduler, seeds.
    quality = req.quality or "auto"
    # The request's own fields, then the model's sidecar defaults, then the server's.
    steps = _steps(req, s, defaults)
    seed = req.seed if req.seed is not None else secrets.randbelow(2**32)
    if source is not None and int(steps * strength) < 1:
        # diffusers runs the last int(steps * strength) steps of the schedule.
        raise invalid_value(
            strength_param,
            f"{strength_param} {strength} of {steps} steps runs no denoising step; "
            f"raise {strength_param} or num_inference_steps.",
        )
    kind = RenderKind.TEXT_TO_IMAGE
    if source is not None:
        kind = RenderKind.IMAGE_TO_IMAGE if source.mask is None else RenderKind.INPAINT
    params = RenderParams(
        width=render_w,
        height=render_h,
        steps=steps,
        guidance_scale=_first(req.guidance_scale, defaults.guidance_scale, s.guidance_scale),
        high_noise_frac=req.high_noise_frac or defaults.high_noise_frac or s.high_noise_frac,
        refiner=req.refiner or defaults.refiner or s.refiner,
        scheduler=req.scheduler or defaults.scheduler or s.scheduler,
        kind=kind,
        strength=strength,
        loras=loras,
        clip_skip=req.clip_skip or defaults.clip_skip or s.clip_skip,
        hires=None if hires is None else _hires(hires, render_w, render_h, steps, s),
        model=choice.name,
    )

    # 4. Edits: the picture at the render size; inpainting keeps it and the mask
    #    at the answered size for compositing.
    pictures: dict[str, Any] = {}
    kept_picture = repaint = None
    if source is not None:
        pictures["init_image"] = resize_to(source.image, render_w, render_h).tobytes()
        if source.mask is not None:
            pictures["mask"] = _resize_mask(source.mask, render_w, render_h).tobytes()
            kept_picture = resize_to(source.image, width, height)
            repaint = _resize_mask(source.mask, width, height)

    job = RenderRequest(
        request_id=uuid.uuid4().hex,
        params=params,
        prompt=prompt,
        negative_prompt=req.negative_prompt or "",
        seeds=[seed + i for i in range(n)],
        deadline=time.time() + s.request_timeout,
        # As OpenAI does: previews only for streams, ignored otherwise.
        partial_images=(req.partial_images or 0) if req.stream else 0,
        **pictures,
    )
    return ResolvedRequest(
        job=job,
        width=width,
        height=height,
        response_format=req.response_format or _default_response_format(req),
        output_format=output_format,
        output_compression=req.output_compression,
        quality=quality,
        kept_picture=kept_picture,
        repaint_mask=repaint,
        provenance=_provenance(s, loras, catalog, choice) if s.image_metadata else None,
    )


def _hires(hires: HiresRequest, width: int, height: int, steps: int, s: Settings) -> HiresParams:
    """The hires fix's first pass: the render size divided by `scale`, to multiples of 8,
    within SDXL_MIN_SIDE; the final size is the render size, already within the limits."""

    def first(side: int) -> int:
        return max(8, round(side / hires.scale / 8) * 8)

    first_width, first_height = first(width), first(height)
    if min(first_width, first_height) < s.min_side:
        raise invalid_value(
            "hires.scale",
            f"hires scale {hires.scale} of {width}x{height} makes a first pass of "
            f"{first_width}x{first_height}, under this server's smallest side "
            f"{s.min_side}; lower the scale or raise the size.",
        )
    hires_steps = hires.steps or steps
    if int(hires_steps * hires.denoising_strength) < 1:
        raise invalid_value(
            "hires.denoising_strength",
            f"hires denoising_strength {hires.denoising_strength} of {hires_steps} steps runs "
            "no denoising step; raise it or hires.steps.",
        )
    return HiresParams(
        first_width=first_width,
        first_height=first_height,
        scale=hires.scale,
        steps=hires_steps,
        denoising_strength=hires.denoising_strength,
        upscaler=hires.upscaler,
    )


def _first(*values: float | None) -> float:
    return next(value for value in values if value is not None)


def _provenance(
    s: Settings, loras: tuple[LoraWeight, ...], catalog: LoraCatalog | None, choice: ModelChoice
) -> Provenance:
    hashes = {}
    for lora in loras:
        digest = catalog.short_hash(lora.name) if catalog is not None else None
        if digest is not None:
            hashes[lora.name] = digest
    base = s.base_model if choice.entry is None else str(choice.entry.path)
    return Provenance(base_model=base, refiner_model=s.refiner_model, lora_hashes=hashes)


def _default_response_format(req: ImageRequest) -> str:
    # OpenAI answers dall-e-2/3 with a url unless asked otherwise, and clients
    # built for them (LangChain's DallEAPIWrapper) read only the url. Everyone
    # else (the Prem app, gpt-image clients, no model) gets b64_json, which
    # the registry's example reads; so do streams, which carry images inline.
    if req.model in OPENAI_IMAGE_MODELS and not req.stream:
        return "url"
    return "b64_json"


def _requested_size(
    req: ImageRequest,
    settings: Settings,
    default_size: tuple[int, int] | None,
    source: EditSource | None,
) -> tuple[int, int]:
    limits = SizeLimits(settings.min_side, settings.max_side, settings.max_pixels)
    if req.width is not None or req.height is not None:
        if req.width is None or req.height is None:
            param = "height" if req.height is None else "width"
            raise invalid_value(param, "width and height must be given together.")
        width, height, param = req.width, req.height, "width"
    elif req.size not in (None, AUTO_SIZE):
        (width, height), param = parse_size(req.size), "size"
    elif default_size is not None:
        # No size asked: the default, brought within this server's bounds
        # (a server limited to 512 px answers "auto" at 512, not a 400).
        return fit_size(*default_size, limits)
    elif source is not None:
        try:
            return fit_size(*source.image.size, limits)
        except ValueError as exc:
            message = f"No size this server renders fits the image ({exc}); give a size."
            raise invalid_value("image", message) from None
    else:
        raise ValueError("default_size=None needs an edit source")
    try:
        limits.check(width, height)
    except ValueError as exc:
        raise invalid_value(param, f"Invalid size: {exc}.") from None
    return width, height


def _resize_mask(mask: Image.Image, width: int, height: int) -> Image.Image:
    # Nearest: the mask stays two-valued.
    if mask.size == (width, height):
        return mask
    return mask.resize((width, height), Image.Resampling.NEAREST)
