"""The work that travels from the HTTP service to the pipeline service, and back.

`GenerationJob` / `GenerationOutcome` are pydantic because they cross the
process boundary between the two BentoML services; `RenderBatch` and friends
are plain dataclasses used inside the pipeline process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, model_validator


class RenderKind(StrEnum):
    TEXT_TO_IMAGE = "text_to_image"  # generations
    IMAGE_TO_IMAGE = "image_to_image"  # edits without a mask, variations
    INPAINT = "inpaint"  # edits with a mask: only the masked region is repainted


class RefinerMode(StrEnum):
    ENSEMBLE = "ensemble"  # base denoises [0, frac), refiner [frac, 1] on latents
    SEQUENTIAL = "sequential"  # refiner img2img over the finished base image
    NONE = "none"  # base only


class OutcomeStatus(StrEnum):
    OK = "ok"
    QUEUE_FULL = "queue_full"
    LOADING = "loading"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    OUT_OF_MEMORY = "out_of_memory"
    ERROR = "error"


@dataclass(frozen=True)
class RenderParams:
    """Everything the images of one pipeline call must share."""

    width: int
    height: int
    steps: int
    guidance_scale: float
    high_noise_frac: float
    refiner: RefinerMode
    scheduler: str
    # Last and defaulted, so text-to-image callers (benchmarks) need not name them.
    kind: RenderKind = RenderKind.TEXT_TO_IMAGE
    # Share of the schedule an edit re-noises and denoises (1.0 for text-to-image).
    strength: float = 1.0


@dataclass(frozen=True)
class ImageTask:
    prompt: str
    negative_prompt: str
    seed: int
    # Per image rather than per batch, so that edits of different pictures with
    # the same RenderParams still share a pipeline call. The images of one job
    # share the same bytes objects. Megabytes each: kept out of reprs and logs.
    init_image: bytes | None = field(default=None, repr=False)  # RGB, params' width x height
    mask: bytes | None = field(default=None, repr=False)  # L, 255 where the image is repainted


@dataclass
class RenderBatch:
    """One pipeline call: compatible images, one generator (seed) per image."""

    params: RenderParams
    tasks: list[ImageTask]
    # Polled at every denoising step; True aborts the call with RenderCancelled.
    should_stop: Callable[[], bool] = field(default=lambda: False)


class GenerationJob(BaseModel):
    """One request's images (n of them, seeds seed..seed+n-1)."""

    # bytes travel as base64 in the JSON between the two services.
    model_config = ConfigDict(frozen=True, ser_json_bytes="base64", val_json_bytes="base64")

    request_id: str
    prompt: str
    negative_prompt: str = ""
    seeds: list[int]
    width: int  # render resolution, multiples of 8
    height: int
    steps: int
    guidance_scale: float
    high_noise_frac: float
    refiner: RefinerMode
    scheduler: str
    kind: RenderKind = RenderKind.TEXT_TO_IMAGE
    strength: float = Field(default=1.0, gt=0.0, le=1.0)
    # Edits: the picture already resized to the render resolution (raw RGB,
    # row-major) and, for inpainting, its mask (raw L, 255 = repaint).
    init_image: bytes | None = Field(default=None, repr=False)
    mask: bytes | None = Field(default=None, repr=False)
    # Unix time after which nobody waits for the images any more.
    deadline: float | None = None

    @model_validator(mode="after")
    def _images_fit_the_kind(self) -> GenerationJob:
        wants_image = self.kind is not RenderKind.TEXT_TO_IMAGE
        wants_mask = self.kind is RenderKind.INPAINT
        pixels = self.width * self.height
        if wants_image != (self.init_image is not None) or wants_mask != (self.mask is not None):
            raise ValueError(f"a {self.kind} job takes init_image={wants_image}, mask={wants_mask}")
        if self.init_image is not None and len(self.init_image) != 3 * pixels:
            raise ValueError(f"init_image must be {self.width}x{self.height} RGB bytes")
        if self.mask is not None and len(self.mask) != pixels:
            raise ValueError(f"mask must be {self.width}x{self.height} L bytes")
        return self

    @property
    def params(self) -> RenderParams:
        return RenderParams(
            width=self.width,
            height=self.height,
            steps=self.steps,
            guidance_scale=self.guidance_scale,
            high_noise_frac=self.high_noise_frac,
            refiner=self.refiner,
            scheduler=self.scheduler,
            kind=self.kind,
            strength=self.strength,
        )

    def tasks(self) -> list[ImageTask]:
        return [
            ImageTask(self.prompt, self.negative_prompt, seed, self.init_image, self.mask)
            for seed in self.seeds
        ]


class RenderCancelled(Exception):
    """Raised from inside a pipeline call when nobody waits for its images."""


class OutOfMemory(Exception):
    """The accelerator ran out of memory; its cache was already released."""


class RenderedImage(BaseModel):
    # bytes travel as base64 in the JSON between the two services.
    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

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
    # Seconds the caller should wait before retrying (queue full, loading).
    retry_after: float | None = None
