"""The image job endpoints' behaviour: submit, read, list, cancel, delete.

A submission is resolved exactly as its synchronous call would be (so every
bad value is the same 400, before anything is stored), its seed fixed, the
queue asked whether its images fit (429 otherwise, nothing stored), and its
record written before the 202 answers. With API keys a key sees only its own
jobs: someone else's job is the same 404 as an unknown one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...contract.render_request import GenerationOutcome, RenderParams
from ...settings import Settings
from ..errors import APIError, excerpt, invalid_value, outcome_error
from ..request_kinds import KINDS
from ..schemas import ImageRequest
from ..serving import ImagesServing
from .records import JobRecord, JobStatus, WebhookState, new_job_id, owner_of
from .runner import JobRunner, result_file_ids
from .store import JobStore
from .submissions import JOB_FIELDS
from .webhooks import WebhookHosts, WebhookRefused

DEFAULT_PAGE = 20
MAX_PAGE = 100

Admission = Callable[[int, int], GenerationOutcome | None]


def progress_steps(params: RenderParams) -> int:
    """The denoising steps a job's progress counts to: the render's `steps`, and with the
    hires fix the second pass's too, which the engine counts on from the first's (the
    last int(steps * denoising_strength) of a schedule of hires' steps, as an edit)."""
    hires = params.hires
    if hires is None:
        return params.num_inference_steps
    return params.num_inference_steps + int(hires.steps * hires.denoising_strength)


@dataclass(frozen=True, kw_only=True)
class JobSubmission:
    kind: str  # a kind of request_kinds.KINDS
    request: ImageRequest
    image: bytes | None = None
    mask: bytes | None = None
    webhook_url: str | None = None
    metadata: dict[str, str] | None = None
    base_url: str
    api_key: str | None = None


class JobsServing:
    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        images: ImagesServing,
        runner: JobRunner,
        *,
        admission: Admission | None = None,
        hosts: WebhookHosts | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.images = images
        self.runner = runner
        self.admission = admission
        self.hosts = hosts or WebhookHosts(settings.webhook_hosts)
        # With API keys, each key its own jobs; without, everybody's are everybody's.
        self.scoped = bool(settings.api_keys) or settings.api_keys_file is not None
        self._clock = clock

    def owner(self, api_key: str | None) -> str | None:
        """Whose jobs a caller sees: None (all) without API keys."""
        return owner_of(api_key) if self.scoped else None

    async def submit(self, submission: JobSubmission) -> dict[str, Any]:
        req = submission.request
        if req.stream:
            raise invalid_value(
                "stream", "An image job answers when it ends: stream is not available for jobs."
            )
        if submission.webhook_url is not None:
            await self._check_webhook(submission.webhook_url)
        kind = KINDS[submission.kind]
        resolved = await self.images.resolve(kind, req, submission.image, submission.mask)
        n = len(resolved.job.seeds)
        if self.admission is not None:
            waiting = await asyncio.to_thread(self.store.queued_images)
            refusal = self.admission(n, waiting)
            if refusal is not None:
                raise outcome_error(refusal)
        fields = {
            key: value
            for key, value in req.model_dump(mode="json", exclude_none=True).items()
            if key not in JOB_FIELDS
        }
        # The seed the images get, fixed now: a run after a restart makes the same images.
        fields["seed"] = resolved.job.seeds[0]
        job = JobRecord(
            id=new_job_id(),
            owner=owner_of(submission.api_key) if self.scoped else "",
            kind=submission.kind,
            status=JobStatus.QUEUED,
            created_at=self._clock(),
            images=n,
            steps=progress_steps(resolved.job.params),
            request=fields,
            base_url=submission.base_url,
            image=submission.image,
            mask=submission.mask,
            webhook_url=submission.webhook_url,
            metadata=submission.metadata,
            webhook_state=WebhookState.PENDING if submission.webhook_url else None,
        )
        await asyncio.to_thread(self.store.insert, job)
        self.runner.wake()
        position = await asyncio.to_thread(self.store.queue_position, job.id)
        return job.public(position)

    async def _check_webhook(self, url: str) -> None:
        if self.settings.webhook_secret is None:
            raise invalid_value(
                "webhook_url",
                "This server sends no webhooks: it has no SDXL_WEBHOOK_SECRET to sign them.",
                code="webhooks_disabled",
            )
        try:
            await self.hosts.check(url)
        except WebhookRefused as exc:
            raise invalid_value("webhook_url", str(exc), code="webhook_url_refused") from None

    async def get(self, job_id: str, api_key: str | None) -> dict[str, Any]:
        job = await self._job(job_id, api_key)
        return await self._public(job)

    async def list(self, api_key: str | None, after: str | None, limit: int) -> dict[str, Any]:
        if not 1 <= limit <= MAX_PAGE:
            raise invalid_value("limit", f"limit must be between 1 and {MAX_PAGE}, got {limit}.")
        found = await asyncio.to_thread(
            self.store.page, self.owner(api_key), after=after, limit=limit, now=self._clock()
        )
        if found is None:
            raise invalid_value("after", f"No such job: '{excerpt(after or '')}'.")
        jobs, has_more = found
        data = [await self._public(job) for job in jobs]
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": has_more,
        }

    async def cancel(self, job_id: str, api_key: str | None) -> dict[str, Any]:
        job = await self._job(job_id, api_key)
        now = self._clock()
        if not await asyncio.to_thread(
            self.store.cancel, job.id, now=now, ttl=self.settings.job_ttl
        ):
            raise APIError(
                409,
                f"The job has already ended ({job.status.value}); only a queued or running job "
                "can be cancelled.",
                param="job_id",
                code="job_finished",
            )
        await self.runner.cancelled(job.id)
        return await self.get(job.id, api_key)

    async def delete(self, job_id: str, api_key: str | None) -> dict[str, Any]:
        job = await self._job(job_id, api_key)
        if not job.status.finished:
            raise APIError(
                409,
                f"The job is {job.status.value}: cancel it first, or wait until it ends.",
                param="job_id",
                code="job_not_finished",
            )
        for file_id in result_file_ids(job):
            await asyncio.to_thread(self.runner.files.delete, file_id)
        await asyncio.to_thread(self.store.delete, job.id)
        return {"id": job.id, "object": "image.job.deleted", "deleted": True}

    async def _job(self, job_id: str, api_key: str | None) -> JobRecord:
        job = await asyncio.to_thread(
            self.store.get, job_id, self.owner(api_key), now=self._clock()
        )
        if job is None:
            raise APIError(
                404, f"No such job: '{excerpt(job_id)}'.", param="job_id", code="job_not_found"
            )
        return job

    async def _public(self, job: JobRecord) -> dict[str, Any]:
        position = None
        if job.status is JobStatus.QUEUED:
            position = await asyncio.to_thread(self.store.queue_position, job.id)
        return job.public(position)
