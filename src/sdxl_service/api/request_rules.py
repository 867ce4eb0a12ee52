"""The request rules: an Images API request -> what to render and the answer's shape.

Pure functions of the request, the settings and the model's native size (and,
for edits, the uploaded picture): everything about defaults, bounds and which
combinations are refused lives here, as diffusers gathers its checks in
`check_inputs`. A bad value raises `APIError` naming the parameter. What differs between
the kinds of request (generation, edit, variation, upscale) is each kind's `plan_*`; the
table of kinds is request_kinds.py.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ..choices import SCHEDULE_TYPES, HiresUpscaler, RenderKind, SchedulerName, ScheduleType
from ..contract.render_request import (
    HiresParams,
    LoraWeight,
    RenderParams,
    RenderRequest,
    UpscaleParams,
)
from ..generation_params import given, server_defaults
from ..generation_params import resolve as resolve_params
from ..ip_adapter_catalog import IpAdapterCatalog
from ..lora_catalog import LoraCatalog, LoraFile
from ..model_catalog import ModelCatalog, ModelEntry
from ..settings import SERVICE_ID, Settings
from ..upscaler_catalog import UpscalerCatalog
from .encoding import resize_to
from .errors import APIError, excerpt, invalid_value
from .infotext import Provenance
from .inpaint_options import (
    DEFAULT_PADDING,
    RESAMPLE,
    InpaintInput,
    InpaintOptions,
    blur,
    only_masked,
)
from .ip_adapter_requests import IpAdapterSet, ip_adapter_set
from .lora_requests import lora_set, take_inline_loras
from .outpainting import Borders, outpainted
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
    # "Only masked" (api/inpaint_options.py): the region of the kept picture that was
    # rendered, where the rendered image goes back; None: the whole picture.
    paste_region: tuple[int, int, int, int] | None = None
    # For the infotext each image carries (api/infotext.py); None with SDXL_IMAGE_METADATA=false.
    provenance: Provenance | None = None


@dataclass(frozen=True, kw_only=True)
class RenderPlan:
    """What a kind of request renders, before the rules common to all: its prompt, whether it
    edits a picture (and how much of it), and the sizes it answers."""

    prompt: str
    # Share of the schedule re-drawn over the picture; None: text-to-image.
    strength: float | None = None
    strength_param: str = "strength"
    # The size without one asked; None: the picture's.
    default_size: tuple[int, int] | None = AUTO_SIZE_PIXELS
    # A size the kind decides itself (an upscale's), not the request.
    size: tuple[int, int] | None = None
    # The only sizes answered, and the parameter a size outside them is blamed on.
    sizes: tuple[tuple[int, int], ...] = ()
    sizes_of: str = ""  # what comes in those sizes, for the error
    hires: HiresRequest | None = None
    # An upscaler model the picture goes through first (the upscale endpoint's `upscaler`).
    upscaler: str | None = None
    # The picture and mask rendered from, where the kind makes them (an outpainting canvas).
    source: EditSource | None = None
    # A masked edit's mask blur and "Only masked" padding (api/inpaint_options.py).
    inpaint: InpaintOptions = field(default_factory=InpaintOptions)


def plan_generation(req: ImageRequest, source: EditSource | None, settings: Settings) -> RenderPlan:
    assert isinstance(req, ImageGenerationRequest)
    return RenderPlan(prompt=req.prompt, hires=req.hires)


def plan_edit(req: ImageRequest, source: EditSource | None, settings: Settings) -> RenderPlan:
    """img2img over the picture, or inpainting with a mask; at the picture's size by default.
    Outpainting (api/outpainting.py): inpainting of the picture on a larger canvas."""
    assert isinstance(req, ImageEditRequest) and source is not None
    canvas = _outpainted(req, source, settings)
    if canvas is not None:
        source = canvas
    default_strength = EDIT_STRENGTH if source.mask is None else INPAINT_STRENGTH
    strength = req.strength if req.strength is not None else default_strength
    return RenderPlan(
        prompt=req.prompt,
        strength=strength,
        default_size=None,
        size=None if canvas is None else canvas.image.size,
        source=canvas,
        inpaint=_inpaint_options(req, masked=source.mask is not None),
    )


def _inpaint_options(req: ImageEditRequest, *, masked: bool) -> InpaintOptions:
    """The edit's mask blur and inpaint area; refused where they would do nothing (no mask,
    a padding of the whole picture), where A1111 ignores them."""
    given = [
        name
        for name in ("mask_blur", "inpaint_area", "inpaint_padding")
        if getattr(req, name) is not None
    ]
    if given and not masked:
        raise invalid_value(
            given[0],
            f"{given[0]} applies to an edit with a mask (or an outpaint); this one has none.",
        )
    only = req.inpaint_area == "only_masked"
    if req.inpaint_padding is not None and not only:
        raise invalid_value(
            "inpaint_padding",
            "inpaint_padding is the margin of inpaint_area only_masked; give that too, or "
            "drop inpaint_padding.",
        )
    padding = req.inpaint_padding if req.inpaint_padding is not None else DEFAULT_PADDING
    return InpaintOptions(mask_blur=req.mask_blur or 0, padding=padding if only else None)


def _outpainted(req: ImageEditRequest, source: EditSource, s: Settings) -> EditSource | None:
    if req.outpaint is None and req.outpaint_anchor is None:
        return None
    size, size_param = None, "size"
    if req.width is not None or req.height is not None:
        if req.width is None or req.height is None:
            param = "height" if req.height is None else "width"
            raise invalid_value(param, "width and height must be given together.")
        size, size_param = (req.width, req.height), "width"
    elif req.size not in (None, AUTO_SIZE):
        size = parse_size(req.size)
    borders = None if req.outpaint is None else Borders(**req.outpaint.model_dump())
    limits = SizeLimits(s.min_side, s.max_side, s.max_pixels)
    return outpainted(source, borders, req.outpaint_anchor, size, size_param, limits)


def plan_variation(req: ImageRequest, source: EditSource | None, settings: Settings) -> RenderPlan:
    """An edit of a square picture with no prompt, in OpenAI's three sizes."""
    assert isinstance(req, ImageVariationRequest) and source is not None
    if req.stream:
        raise invalid_value("stream", "Variations are answered in one response; drop stream.")
    width, height = source.image.size
    if width != height:
        raise invalid_value(
            "image", f"Variations take a square image; this one is {width}x{height}."
        )
    strength = req.strength if req.strength is not None else VARIATION_STRENGTH
    return RenderPlan(prompt="", strength=strength, sizes=VARIATION_SIZES, sizes_of="Variations")


def plan_upscale(req: ImageRequest, source: EditSource | None, settings: Settings) -> RenderPlan:
    """The picture at `scale` times its size (to multiples of 8), denoised again at
    `denoising_strength` as an edit of it: the Lanczos resize is the edit's own."""
    assert isinstance(req, ImageUpscaleRequest) and source is not None
    if req.stream:
        raise invalid_value("stream", "Upscales are answered in one response; drop stream.")
    for param in ("size", "width", "height"):
        if getattr(req, param) is not None:
            raise invalid_value(param, "An upscale is the image's size times scale; give scale.")
    if source.mask is not None:
        raise invalid_value("mask", "Upscales take no mask.")
    if req.denoising_strength == 0 and req.upscaler is None:
        raise invalid_value(
            "denoising_strength",
            "denoising_strength 0 upscales without a denoising pass, which needs an upscaler "
            "model; name one in upscaler or raise denoising_strength.",
        )
    width, height = (max(8, round(side * req.scale / 8) * 8) for side in source.image.size)
    limits = SizeLimits(settings.min_side, settings.max_side, settings.max_pixels)
    try:
        limits.check(width, height)
    except ValueError as exc:
        w, h = source.image.size
        message = f"scale {req.scale} of the {w}x{h} image makes {width}x{height}: {exc}."
        raise invalid_value("scale", message) from None
    return RenderPlan(
        prompt=req.prompt,
        strength=req.denoising_strength,
        strength_param="denoising_strength",
        size=(width, height),
        upscaler=req.upscaler,
    )


@dataclass(frozen=True)
class ModelChoice:
    """What a request's `model` picks: a model of SDXL_MODELS_DIR (None: the default pair),
    and a LoRA on it, each with its catalog entry (looked up once per request)."""

    name: str | None = None
    lora: LoraFile | None = None
    entry: ModelEntry | None = None

    @property
    def defaults(self) -> dict[str, Any]:
        """The model's sidecar defaults."""
        return self.entry.defaults.given() if self.entry is not None else {}


def model_choice(
    model: str | None,
    settings: Settings,
    loras: Mapping[str, LoraFile] | None = None,
    models: ModelCatalog | None = None,
) -> ModelChoice:
    """The model (and LoRA) `model` names: this server (`<service>` or `<service>:<lora>`), an
    OpenAI image model or one of the default's weights (the default pair), a model of
    SDXL_MODELS_DIR (`<name>` or `<name>:<lora>`); 404 for anything else, 400 naming `model`
    for a model of the folder that cannot render (its problem, a bad sidecar included).
    `loras`: the LoRA folder as this request sees it."""
    if model is None or model in (SERVICE_ID, *OPENAI_IMAGE_MODELS):
        return ModelChoice()
    if model.startswith(OPENAI_IMAGE_MODEL_PREFIX) or model in (
        settings.base_model,
        settings.refiner_model,
    ):
        return ModelChoice()
    name, _, lora_name = model.partition(":")
    lora = (loras or {}).get(lora_name) if lora_name else None
    if lora is None and (lora_name or model.endswith(":")):
        raise _unknown_model(model)
    if name == SERVICE_ID:
        return ModelChoice(lora=lora)
    entry = models.find(name) if models is not None else None
    if entry is None:
        raise _unknown_model(model)
    if entry.problem is not None:
        raise invalid_value("model", f"{entry.problem}.", code="invalid_model")
    return ModelChoice(name=name, lora=lora, entry=entry)


def _check_schedule_type(scheduler: SchedulerName, schedule_type: ScheduleType) -> None:
    """A schedule type the scheduler has (automatic: its own, always)."""
    kinds = SCHEDULE_TYPES[scheduler]
    if schedule_type is ScheduleType.AUTOMATIC or schedule_type in kinds:
        return
    takes = ", ".join(sorted(kinds)) or "none but its own"
    raise invalid_value(
        "schedule_type",
        f"The scheduler {scheduler.value} has no {schedule_type.value} schedule; it takes "
        f"automatic and {takes}.",
        code="unsupported_value",
    )


def _unknown_model(model: str) -> APIError:
    return APIError(
        404,
        f"The model '{excerpt(model)}' does not exist; this server serves '{SERVICE_ID}' "
        "and the models GET /v1/models lists.",
        param="model",
        code="model_not_found",
    )


def _asked(req: ImageRequest) -> dict[str, Any]:
    """The generation parameters the request gives; its quality stands for steps."""
    asked = given(req)
    if "num_inference_steps" not in asked and req.quality in QUALITY_STEPS:
        asked["num_inference_steps"] = QUALITY_STEPS[req.quality]
    return asked


def resolve(
    plan_of: Callable[[ImageRequest, EditSource | None, Settings], RenderPlan],
    req: ImageRequest,
    source: EditSource | None,
    settings: Settings,
    native_resolution: int,
    catalog: LoraCatalog | None = None,
    models: ModelCatalog | None = None,
    upscalers: UpscalerCatalog | None = None,
    ip_adapters: IpAdapterCatalog | None = None,
) -> ResolvedRequest:
    """A request of the kind `plan_of` plans (request_kinds.py) -> what it renders and how it
    is answered. An edit's `source` is resized here, which takes CPU time: call it off the
    event loop."""
    s = settings
    plan = plan_of(req, source, s)
    source = plan.source or source
    # 1. What the request may ask at all. The LoRA folder is read once for the whole request.
    prompt, inline = take_inline_loras(plan.prompt)
    asked = [(lora.name, lora.scale) for lora in req.loras or []] + inline
    wants_loras = bool(asked) or ":" in (req.model or "")
    folder = catalog.snapshot() if wants_loras and catalog is not None else {}
    choice = model_choice(req.model, s, folder, models)
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
    for param, text in (("prompt", plan.prompt), ("negative_prompt", req.negative_prompt or "")):
        if len(text) > s.max_prompt_chars:
            message = f"The {param} is longer than {s.max_prompt_chars} characters."
            raise invalid_value(param, message)
    output_format = req.output_format or "png"
    if req.output_compression is not None and output_format == "png":
        raise invalid_value(
            "output_compression", "output_compression applies to jpeg and webp only."
        )
    # LoRAs: the list, the prompt's inline tags and the model's suffix add up.
    if choice.lora is not None:
        asked.append((choice.lora.name, 1.0))
    loras = lora_set(asked, folder, s.max_loras) if asked else ()
    # IP-Adapters: their pictures decoded here (CPU time, off the event loop as edits are).
    adapters = ip_adapter_set(
        req.ip_adapters or [], ip_adapters, max_adapters=s.control_cache, max_pixels=s.max_pixels
    )

    # 2. The size answered, and the (possibly larger) size rendered.
    width, height = plan.size or _requested_size(req, s, plan.default_size, source)
    if plan.sizes and (width, height) not in plan.sizes:
        sizes = ", ".join(f"{w}x{h}" for w, h in plan.sizes)
        raise invalid_value(
            "size" if req.width is None else "width", f"{plan.sizes_of} come in {sizes}."
        )
    render_w, render_h = render_size(
        width, height, native_resolution, render_native=s.render_native, max_pixels=s.max_pixels
    )

    # 3. Sampling: the request's own parameters, then its LoRAs' sidecars (the first named
    #    first: a few-step LoRA needs its sampler whatever the checkpoint), the model's
    #    sidecar, the server's settings.
    lora_defaults = [folder[name].defaults.given() for name in dict.fromkeys(n for n, _ in asked)]
    sampling = resolve_params(_asked(req), *lora_defaults, choice.defaults, server_defaults(s))
    _check_schedule_type(sampling["scheduler"], sampling["schedule_type"])
    steps = sampling["num_inference_steps"]
    seed = req.seed if req.seed is not None else secrets.randbelow(2**32)
    strength = 1.0 if plan.strength is None else plan.strength
    upscale = None
    if plan.upscaler is not None:
        assert source is not None
        upscaler = _upscaler_model(plan.upscaler, "upscaler", upscalers)
        upscale = UpscaleParams(
            upscaler=upscaler,
            source_width=source.image.width,
            source_height=source.image.height,
        )
    if source is not None and int(steps * strength) < 1 and not (upscale and strength == 0):
        # diffusers runs the last int(steps * strength) steps of the schedule.
        param = plan.strength_param
        raise invalid_value(
            param,
            f"{param} {strength} of {steps} steps runs no denoising step; "
            f"raise {param} or num_inference_steps.",
        )
    kind = RenderKind.TEXT_TO_IMAGE
    if source is not None:
        kind = RenderKind.IMAGE_TO_IMAGE if source.mask is None else RenderKind.INPAINT
    params = RenderParams(
        **sampling,
        width=render_w,
        height=render_h,
        kind=kind,
        strength=strength,
        loras=loras,
        hires=(
            None
            if plan.hires is None
            else _hires(plan.hires, render_w, render_h, steps, s, upscalers)
        ),
        model=choice.name,
        upscale=upscale,
        ip_adapters=adapters.adapters,
    )

    # 4. Edits: the picture at the render size; inpainting keeps it and the mask
    #    at the answered size for compositing.
    pictures: dict[str, Any] = {}
    kept_picture = repaint = region = inpaint = None
    if upscale is not None:
        # At its own size: the upscaler model takes it in the render worker.
        assert source is not None
        pictures["init_image"] = source.image.convert("RGB").tobytes()
    elif source is not None and source.mask is not None:
        inpaint = plan.inpaint
        kept_picture, repaint, rendered = _inpaint_input(
            source, inpaint, (width, height), (render_w, render_h)
        )
        pictures["init_image"] = rendered.picture.tobytes()
        pictures["mask"] = rendered.mask.tobytes()
        region = rendered.region
    elif source is not None:
        pictures["init_image"] = resize_to(source.image, render_w, render_h).tobytes()

    job = RenderRequest(
        request_id=uuid.uuid4().hex,
        params=params,
        prompt=prompt,
        negative_prompt=req.negative_prompt or "",
        seeds=[seed + i for i in range(n)],
        deadline=time.time() + s.request_timeout,
        # As OpenAI does: previews only for streams, ignored otherwise.
        partial_images=(req.partial_images or 0) if req.stream else 0,
        ip_adapter_images=adapters.pictures,
        **pictures,
    )
    return ResolvedRequest(
        job=job,
        width=width,
        height=height,
        response_format=req.response_format or _default_response_format(req),
        output_format=output_format,
        output_compression=req.output_compression,
        quality=req.quality or "auto",
        kept_picture=kept_picture,
        repaint_mask=repaint,
        paste_region=region,
        provenance=(
            _provenance(s, loras, folder, catalog, choice, adapters, ip_adapters, inpaint, region)
            if s.image_metadata
            else None
        ),
    )


def _upscaler_model(name: str, param: str, upscalers: UpscalerCatalog | None) -> str:
    """An upscaler model of SDXL_UPSCALER_DIR by name; 400 naming `param` for any other name.
    Whether spandrel knows the file is the render worker's to say (serving.py asks it)."""
    if upscalers is None or upscalers.find(name) is None:
        builtin = " latent, lanczos and" if param == "hires.upscaler" else ""
        raise invalid_value(
            param,
            f"There is no upscaler '{excerpt(name)}'; this server has{builtin} the upscaler "
            "models GET /v1/models lists (owned_by upscaler_dir).",
            code="upscaler_not_found",
        )
    return name


def _hires(
    hires: HiresRequest,
    width: int,
    height: int,
    steps: int,
    s: Settings,
    upscalers: UpscalerCatalog | None = None,
) -> HiresParams:
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
    if hires.upscaler in HiresUpscaler._value2member_map_:
        upscaler, upscaler_model = HiresUpscaler(hires.upscaler), None
    else:
        # A model's picture is taken to the size with Lanczos: the Lanczos path in pixels.
        upscaler = HiresUpscaler.LANCZOS
        upscaler_model = _upscaler_model(hires.upscaler, "hires.upscaler", upscalers)
    return HiresParams(
        first_width=first_width,
        first_height=first_height,
        scale=hires.scale,
        steps=hires_steps,
        denoising_strength=hires.denoising_strength,
        upscaler=upscaler,
        upscaler_model=upscaler_model,
    )


def _provenance(
    s: Settings,
    loras: tuple[LoraWeight, ...],
    folder: Mapping[str, LoraFile],
    catalog: LoraCatalog | None,
    choice: ModelChoice,
    adapters: IpAdapterSet | None = None,
    ip_adapters: IpAdapterCatalog | None = None,
    inpaint: InpaintOptions | None = None,
    region: tuple[int, int, int, int] | None = None,
) -> Provenance:
    hashes = {}
    for lora in loras:
        digest = catalog.short_hash(folder[lora.name]) if catalog is not None else None
        if digest is not None:
            hashes[lora.name] = digest
    base = s.base_model if choice.entry is None else str(choice.entry.path)
    modules = {}
    for adapter in adapters.adapters if adapters is not None else ():
        entry = ip_adapters.find(adapter.name) if ip_adapters is not None else None
        # The extension's preprocessor for the encoder: ViT-H is clip_h, bigG clip_g.
        if entry is not None:
            modules[adapter.name] = (
                "ip-adapter_clip_h" if entry.encoder_name == "ViT-H" else "ip-adapter_clip_g"
            )
    return Provenance(
        base_model=base,
        refiner_model=s.refiner_model,
        lora_hashes=hashes,
        ip_adapter_modules=modules,
        # A1111 writes a masked edit's mask blur, 0 included (its UI's default is 4).
        mask_blur=None if inpaint is None else inpaint.mask_blur,
        masked_area_padding=None if inpaint is None or region is None else inpaint.padding,
    )


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


def _inpaint_input(
    source: EditSource,
    options: InpaintOptions,
    answered: tuple[int, int],
    render: tuple[int, int],
) -> tuple[Image.Image, Image.Image, InpaintInput]:
    """A masked edit's picture and (blurred) mask at the answered size, which the rendered
    image goes back over, and what is rendered: the whole picture, or "Only masked"'s region
    of it (the whole when the mask left nothing at the answered size)."""
    assert source.mask is not None
    kept = resize_to(source.image, *answered)
    repaint = blur(_resize_mask(source.mask, *answered), options.mask_blur)
    if options.padding is not None:
        cropped = only_masked(kept, repaint, *render, options.padding)
        if cropped is not None:
            return kept, repaint, cropped
    picture = resize_to(source.image, *render)
    if options.mask_blur == 0:
        return kept, repaint, InpaintInput(picture, _resize_mask(source.mask, *render))
    # The blurred mask taken to the render size as the inpaint pipeline's mask processor does.
    return kept, repaint, InpaintInput(picture, repaint.resize(render, RESAMPLE))


def _resize_mask(mask: Image.Image, width: int, height: int) -> Image.Image:
    # Nearest: the mask stays two-valued.
    if mask.size == (width, height):
        return mask
    return mask.resize((width, height), Image.Resampling.NEAREST)
