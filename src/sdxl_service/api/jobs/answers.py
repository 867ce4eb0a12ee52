"""The image job as the endpoints answer it and webhooks send it: pydantic models, for the
OpenAPI document and for the tests that check real answers against them.

`JobRecord.public()` (records.py) builds the answer; these models describe it,
field for field (`extra="forbid"`: a field the answer gains or loses without
them fails the tests). The routes declare them as `response_model` and answer
the dict as it is, as app.py does for images: the answer stays exactly what it
was (no field added as null, none re-serialized).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..request_kinds import KINDS
from ..schemas import ImagesResponse
from .records import JobStatus, WebhookState

_EXACT = ConfigDict(extra="forbid")


class ImageJobProgress(BaseModel):
    model_config = _EXACT

    step: int = Field(
        description="Denoising steps done, base and refiner together (both passes of a "
        "hires fix), out of `steps`; `steps` once the job succeeded."
    )
    steps: int = Field(description="The steps of the whole render.")
    images_done: int = Field(description="Images finished (all at once: one batch).")
    images: int = Field(description="Images the job makes (`n`).")


class ImageJobError(BaseModel):
    """The OpenAI error envelope's `error`, as the synchronous call would have answered."""

    model_config = _EXACT

    message: str
    type: str
    param: str | None
    code: str | None


class WebhookAttempt(BaseModel):
    model_config = _EXACT

    attempt: int = Field(description="1 for the first attempt, then 2, ...")
    at: int = Field(description="Unix time of the attempt.")
    status_code: int | None = Field(description="The receiver's answer; null: none came.")
    error: str | None = Field(description="Why it was no delivery; null for a 2xx.")
    duration_ms: float | None = Field(
        default=None, description="How long the attempt took (absent when the URL was refused)."
    )


class ImageJobWebhook(BaseModel):
    model_config = _EXACT

    url: str
    state: WebhookState | None
    attempts: list[WebhookAttempt]


class ImageJob(BaseModel):
    """An image job: POST /v1/images/jobs answers it (202), GET reads it, webhooks send it."""

    model_config = _EXACT

    id: str
    object: Literal["image.job"]
    kind: Annotated[str, Field(json_schema_extra={"enum": list(KINDS)})] = Field(
        description="The kind of request the job renders (POST /v1/images/jobs' `kind`)."
    )
    status: JobStatus
    created_at: int
    started_at: int | None
    finished_at: int | None
    expires_at: int | None = Field(description="When the job and its files are deleted.")
    queue_position: int | None = Field(
        description="Queued jobs only: how many jobs run before it (0: next)."
    )
    attempts: int = Field(description="Runs so far (SDXL_JOB_ATTEMPTS at most).")
    progress: ImageJobProgress
    result: ImagesResponse | None = Field(
        description="Once succeeded: the synchronous call's answer for the same body and seed."
    )
    error: ImageJobError | None
    metadata: dict[str, str] | None
    webhook: ImageJobWebhook | None


class ImageJobList(BaseModel):
    """A page of jobs, newest first (GET /v1/images/jobs)."""

    model_config = _EXACT

    object: Literal["list"]
    data: list[ImageJob]
    first_id: str | None
    last_id: str | None
    has_more: bool


class ImageJobDeleted(BaseModel):
    model_config = _EXACT

    id: str
    object: Literal["image.job.deleted"]
    deleted: bool
