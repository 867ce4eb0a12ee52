"""The work that travels from the HTTP service to the render service, and back.

One definition of each, keyword-only, pydantic because they cross the process
boundary between the two BentoML services. What only the render worker uses (a
pipeline call's images, the engine's exceptions) is engine/render_batch.py.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..choices import HiresUpscaler, RenderKind
from ..generation_params import GenerationParams

# bytes in JSON are base64, not lists: an edit's picture and mask on their way
# to a render worker. Rendered pixels come back raw (contract/wire.py).
_WIRE_BYTES = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")


class OutcomeStatus(StrEnum):
    OK = "ok"
    QUEUE_FULL = "queue_full"
    LOADING = "loading"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    OUT_OF_MEMORY = "out_of_memory"
    # The render worker died (killed, CUDA failure) while it held the images.
    WORKER_RESTARTED = "worker_restarted"
    # A LoRA named by the request could not be applied (not an SDXL LoRA, damaged).
    INVALID_LORA = "invalid_lora"
    # The model of SDXL_MODELS_DIR the request picked could not be loaded.
    INVALID_MODEL = "invalid_model"
    # The upscaler model of SDXL_UPSCALER_DIR the request picked could not be loaded.
    INVALID_UPSCALER = "invalid_upscaler"
    # A ControlNet of SDXL_CONTROLNET_DIR the request named could not be loaded.
    INVALID_CONTROLNET = "invalid_controlnet"
    # An IP-Adapter of SDXL_IP_ADAPTER_DIR the request named could not be loaded.
    INVALID_IP_ADAPTER = "invalid_ip_adapter"
    # Every image of the request was flagged by the safety checker (SDXL_SAFETY_CHECKER).
    CONTENT_POLICY_VIOLATION = "content_policy_violation"
    # An embedding of SDXL_EMBEDDINGS_DIR a prompt names could not be used.
    INVALID_EMBEDDING = "invalid_embedding"
    ERROR = "error"


class LoraWeight(BaseModel):
    """One LoRA adapter of a render, by name (a file of SDXL_LORA_DIR), and its scale."""

    model_config = ConfigDict(frozen=True)

    name: str
    scale: float


class ControlNetParams(BaseModel):
    """One ControlNet unit of a render, by name (a model of SDXL_CONTROLNET_DIR), as diffusers'
    ControlNet pipelines take it; its control image travels per image (RenderRequest)."""

    model_config = ConfigDict(frozen=True)

    name: str
    scale: float = 1.0  # controlnet_conditioning_scale
    start: float = 0.0  # control_guidance_start, a share of the whole schedule
    end: float = 1.0  # control_guidance_end
    mode: int | None = None  # a Union model's control_mode; None for other models


class IpAdapterWeight(BaseModel):
    """One IP-Adapter of a render, by name (a file of SDXL_IP_ADAPTER_DIR), its scale, and how
    many pictures each image gives it (their embeddings' shape, so part of the batch key)."""

    model_config = ConfigDict(frozen=True)

    name: str
    scale: float = Field(ge=0.0, le=2.0)
    images: int = Field(default=1, ge=1, le=4)


class RgbPicture(BaseModel):
    """A picture at its own size, raw RGB, row-major (an IP-Adapter's image)."""

    model_config = ConfigDict(frozen=True, **_WIRE_BYTES)

    width: int = Field(ge=1)
    height: int = Field(ge=1)
    rgb: bytes = Field(repr=False)

    @model_validator(mode="after")
    def _rgb_fits_the_size(self) -> Self:
        if len(self.rgb) != 3 * self.width * self.height:
            raise ValueError(f"rgb must be {self.width}x{self.height} RGB bytes")
        return self


class HiresParams(BaseModel):
    """AUTOMATIC1111's hires fix: a first pass at a smaller size, upscaled to the render size,
    then denoised again there as an edit of it (base, and the refiner for its share)."""

    model_config = ConfigDict(frozen=True)

    first_width: int  # the first pass's render size, multiples of 8
    first_height: int
    scale: float  # as asked: the render size is about this times the first pass's
    # The second pass runs the last int(steps * denoising_strength) steps of a schedule
    # of `steps`, as an edit does.
    steps: int = Field(ge=1)
    denoising_strength: float = Field(gt=0.0, le=1.0)
    upscaler: HiresUpscaler
    # A model of SDXL_UPSCALER_DIR by name: the decoded first pass through it, then Lanczos to
    # the render size (upscaler is then LANCZOS); None: `upscaler` alone.
    upscaler_model: str | None = None


class UpscaleParams(BaseModel):
    """An upscale through a model of SDXL_UPSCALER_DIR: the init image comes at the source's
    size, goes through the model (its own scale), then Lanczos to the render size; the
    denoising pass follows unless the strength is 0."""

    model_config = ConfigDict(frozen=True)

    upscaler: str
    source_width: int = Field(ge=1)
    source_height: int = Field(ge=1)


class RenderParams(GenerationParams):
    """Everything the images of one pipeline call must share (hashable: the batch key): the
    generation parameters (generation_params.py), and the render's size, kind and adapters."""

    width: int  # render resolution, multiples of 8
    height: int
    kind: RenderKind = RenderKind.TEXT_TO_IMAGE
    # Share of the schedule an edit re-noises and denoises (1.0 for text-to-image); 0 only
    # with `upscale`: the upscaler model's picture alone, no denoising pass.
    strength: float = Field(default=1.0, ge=0.0, le=1.0)
    # Sorted by name: the same set is the same batch key, whatever the order asked.
    loras: tuple[LoraWeight, ...] = ()
    # Text-to-image only: render smaller first, upscale, denoise again (None: one pass).
    hires: HiresParams | None = None
    # A model of SDXL_MODELS_DIR by name; None: the default base (SDXL_BASE_MODEL). Part of
    # the batch key, so requests batch per model.
    model: str | None = None
    # Image-to-image only: the init image through an upscaler model first (None: it comes
    # at the render size already).
    upscale: UpscaleParams | None = None
    # ControlNet units in the order asked (the batch key: the same models, scales, start/end
    # and modes batch together); their control images travel per image, at the render size
    # (with `upscale`, the upscaled size: they steer the denoising pass after the model).
    controlnets: tuple[ControlNetParams, ...] = ()
    # In the request's order (the order of `ip_adapter_image_embeds`); each image of the render
    # brings its own pictures for them (RenderRequest.ip_adapter_images).
    ip_adapters: tuple[IpAdapterWeight, ...] = ()

    @model_validator(mode="after")
    def _hires_is_for_text_to_image(self) -> Self:
        if self.hires is not None and self.kind is not RenderKind.TEXT_TO_IMAGE:
            raise ValueError(f"the hires fix is for text-to-image renders, not {self.kind}")
        if self.upscale is not None and self.kind is not RenderKind.IMAGE_TO_IMAGE:
            raise ValueError(f"an upscaler model is for image-to-image renders, not {self.kind}")
        if self.controlnets and self.upscale is not None and self.strength == 0:
            raise ValueError("ControlNet units steer a denoising pass; strength 0 runs none")
        if self.strength == 0 and self.upscale is None:
            raise ValueError("strength 0 renders nothing without an upscaler model")
        return self

    @property
    def init_size(self) -> tuple[int, int]:
        """The size the init image comes at: the source's when an upscaler model takes it."""
        if self.upscale is not None:
            return self.upscale.source_width, self.upscale.source_height
        return self.width, self.height


class RenderRequest(BaseModel):
    """One request's images (n of them, seeds seed..seed+n-1)."""

    model_config = ConfigDict(frozen=True, **_WIRE_BYTES)

    request_id: str
    params: RenderParams
    prompt: str
    negative_prompt: str = ""
    seeds: list[int]
    # Edits: the picture already resized to the render resolution (raw RGB,
    # row-major) and, for inpainting, its mask (raw L, 255 = repaint).
    init_image: bytes | None = Field(default=None, repr=False)
    mask: bytes | None = Field(default=None, repr=False)
    # One control image per ControlNet unit of params, fitted to the render size (raw RGB).
    control_images: tuple[bytes, ...] = Field(default=(), repr=False)
    # With the hires fix: the units' maps again, fitted to its first pass's size
    # (hires.first_width x first_height), for that pass; the second pass takes
    # `control_images`. Empty without the hires fix.
    first_pass_control_images: tuple[bytes, ...] = Field(default=(), repr=False)
    # One tuple of pictures per IP-Adapter of `params.ip_adapters`, in its order; the n
    # images of the request share them (encoded once).
    ip_adapter_images: tuple[tuple[RgbPicture, ...], ...] = Field(default=(), repr=False)
    # Unix time after which nobody waits for the images any more; the batcher
    # is the one component that acts on it.
    deadline: float | None = None
    # Previews streamed per image while it renders (stream=true, partial_images).
    partial_images: int = Field(default=0, ge=0, le=3)
    # PROGRESS events after each denoising step (an image job's progress).
    report_progress: bool = False

    @model_validator(mode="after")
    def _images_fit_the_kind(self) -> Self:
        kind = self.params.kind
        wants_image = kind is not RenderKind.TEXT_TO_IMAGE
        wants_mask = kind is RenderKind.INPAINT
        width, height = self.params.init_size
        if wants_image != (self.init_image is not None) or wants_mask != (self.mask is not None):
            raise ValueError(f"a {kind} job takes init_image={wants_image}, mask={wants_mask}")
        if self.init_image is not None and len(self.init_image) != 3 * width * height:
            raise ValueError(f"init_image must be {width}x{height} RGB bytes")
        if self.mask is not None and len(self.mask) != width * height:
            raise ValueError(f"mask must be {width}x{height} L bytes")
        render_size = 3 * self.params.width * self.params.height
        if len(self.control_images) != len(self.params.controlnets) or any(
            len(image) != render_size for image in self.control_images
        ):
            raise ValueError(
                f"one {self.params.width}x{self.params.height} RGB control image per ControlNet "
                "unit"
            )
        hires = self.params.hires
        first_pass: tuple[int, ...] = ()
        if hires is not None:
            first_pass = (3 * hires.first_width * hires.first_height,) * len(
                self.params.controlnets
            )
        if tuple(len(image) for image in self.first_pass_control_images) != first_pass:
            raise ValueError(
                "one control image per ControlNet unit at the hires fix's first pass size, "
                "none without the hires fix"
            )
        counts = tuple(adapter.images for adapter in self.params.ip_adapters)
        if tuple(len(pictures) for pictures in self.ip_adapter_images) != counts:
            raise ValueError(f"ip_adapter_images must hold {counts} pictures per IP-Adapter")
        return self


class RenderedImage(BaseModel):
    model_config = _WIRE_BYTES

    seed: int
    width: int
    height: int
    # Raw RGB bytes, row-major; PNG/JPEG/WEBP encoding happens in the HTTP
    # service so the GPU process never waits on it.
    rgb: bytes


class GenerationOutcome(BaseModel):
    status: OutcomeStatus
    message: str = ""
    images: list[RenderedImage] = []
    # OK: the seeds of the images the safety checker flagged, withheld (never in `images`).
    flagged_seeds: list[int] = []
    # Seconds the caller should wait before retrying (queue full, loading).
    retry_after: float | None = None
    # OK: seconds of the pipeline calls that made the images (whole batches),
    # and the rest of the job's time in the worker (queue, waiting for company).
    render_s: float | None = None
    waited_s: float | None = None


# Why an image was withheld (content_policy_violation), in the words OpenAI's own rejections
# begin with.
CONTENT_POLICY_MESSAGE = (
    "Your request was rejected as a result of our safety system: the safety checker flagged "
    "the generated image, which is not returned."
)

# Seconds a client should wait while the render process starts or loads.
LOADING_RETRY_AFTER = 10.0


def loading_outcome(
    message: str = "The model is still loading; try again shortly.",
) -> GenerationOutcome:
    """The answer while the models load or the render process (re)starts."""
    return GenerationOutcome(
        status=OutcomeStatus.LOADING, message=message, retry_after=LOADING_RETRY_AFTER
    )


class RenderEventType(StrEnum):
    ACCEPTED = "accepted"  # a worker took the job: `worker`
    BUSY = "busy"  # the worker is busy and the caller asked for an idle one: ask again
    PARTIAL = "partial"  # a preview: `index` (image of the job), `partial_index`, `image`
    PROGRESS = "progress"  # denoising steps done so far: `step`
    OUTCOME = "outcome"  # the last event: `outcome`


class RenderEvent(BaseModel):
    """One line of the render stream from a render worker to the HTTP service."""

    model_config = _WIRE_BYTES

    type: RenderEventType
    worker: int | None = None
    index: int | None = None
    partial_index: int | None = None
    image: RenderedImage | None = None
    step: int | None = None
    outcome: GenerationOutcome | None = None
