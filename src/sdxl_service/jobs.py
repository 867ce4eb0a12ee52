"""The work that travels from the HTTP service to the pipeline service, and back.

`GenerationJob` / `GenerationOutcome` are pydantic because they cross the
process boundary between the two BentoML services; `RenderBatch` and friends
are plain dataclasses used inside the pipeline process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from pydantic import BaseModel, ConfigDict


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


@dataclass(frozen=True)
class ImageTask:
    prompt: str
    negative_prompt: str
    seed: int


@dataclass
class RenderBatch:
    """One pipeline call: compatible images, one generator (seed) per image."""

    params: RenderParams
    tasks: list[ImageTask]
    # Polled at every denoising step; True aborts the call with RenderCancelled.
    should_stop: Callable[[], bool] = field(default=lambda: False)


class GenerationJob(BaseModel):
    """One request's images (n of them, seeds seed..seed+n-1)."""

    model_config = ConfigDict(frozen=True)

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
    # Unix time after which nobody waits for the images any more.
    deadline: float | None = None

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
        )

    def tasks(self) -> list[ImageTask]:
        return [ImageTask(self.prompt, self.negative_prompt, seed) for seed in self.seeds]


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
