"""Runs queued image jobs through the synchronous endpoints' own path, and sends their webhooks.

A job is its stored request validated again and handed to `ImagesServing`
(`resolve`, then `render`): the same rules, queue, batching, LoRAs and limits
as the synchronous call, so the result is that call's `ImagesResponse` for the
same body and seed. Jobs are taken oldest first while the images they render
stay within SDXL_MAX_BATCH_IMAGES (one job at least), so they batch with each
other and with synchronous requests but cannot fill the whole queue.

Each run holds a lease on its job, renewed every few seconds. A renewal that
fails means the job was cancelled (or, on a shared database, taken over after
this replica looked dead): the run stops at the next step, as a disconnected
client's does. At start, jobs left running by a service that died go back to
the queue (at most SDXL_JOB_ATTEMPTS runs each); on a shared database that
happens to jobs whose lease ran out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from ...settings import Settings
from ..errors import APIError, invalid_value, validation_error
from ..files import FileStore
from ..request_kinds import KINDS
from ..serving import ImagesServing
from .records import JobRecord, JobStatus, WebhookState
from .retry import RetryPolicy, Verdict
from .store import JobStore
from .webhooks import WebhookDelivery, WebhookEvent

logger = logging.getLogger(__name__)

# A run's hold on its job: renewed every RENEW_S; a replica silent for LEASE_S is dead.
LEASE_S = 30.0
RENEW_S = 2.0
# A running job's progress is written at most this often.
PROGRESS_S = 0.5
# How often the queue is looked at without a wake-up (jobs put there by another
# replica, or put back while the render service was busy).
POLL_S = 1.0
# Expired jobs (and their files) are deleted this often.
PURGE_INTERVAL_S = 60.0
_FILE_ID = re.compile(r"/images/files/([A-Za-z0-9_-]{43})$")


def result_file_ids(job: JobRecord) -> list[str]:
    """The ids of the `url` files of a job's result."""
    data = (job.result or {}).get("data", [])
    matches = (_FILE_ID.search(str(item.get("url") or "")) for item in data)
    return [match.group(1) for match in matches if match]


class JobRunner:
    def __init__(
        self,
        store: JobStore,
        images: ImagesServing,
        files: FileStore,
        settings: Settings,
        webhooks: WebhookDelivery | None = None,
        clock: Callable[[], float] = time.time,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.store = store
        self.images = images
        self.files = files
        self.settings = settings
        self.webhooks = webhooks
        self.retry = retry or RetryPolicy(settings.job_attempts)
        self.max_images = settings.max_batch_images
        self._clock = clock
        self._wake = asyncio.Event()
        self._running: dict[str, tuple[asyncio.Task[None], int]] = {}
        self._deliveries: set[asyncio.Task[None]] = set()
        self._main: asyncio.Task[None] | None = None
        self._not_before = 0.0
        self._stopping = False

    # ---- life ------------------------------------------------------------------------

    def start(self) -> None:
        self._main = asyncio.get_running_loop().create_task(self.run(), name="job-runner")

    async def stop(self) -> None:
        """Stops taking jobs; runs in progress go back to the queue (their attempt not
        counted: a clean stop is no failure) for the next start."""
        self._stopping = True
        tasks = [t for t, _ in self._running.values()] + list(self._deliveries)
        if self._main is not None:
            tasks.append(self._main)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def wake(self) -> None:
        self._wake.set()

    @property
    def running_images(self) -> int:
        return sum(n for _, n in self._running.values())

    async def run(self) -> None:
        now = self._clock()
        failed = await asyncio.to_thread(
            self.store.recover,
            now=now,
            max_attempts=self.settings.job_attempts,
            ttl=self.settings.job_ttl,
            everything=self.store.embedded,
        )
        if failed:
            logger.warning(
                "%d image job(s) failed: the service kept stopping under them", len(failed)
            )
        for job in await asyncio.to_thread(self.store.pending_webhooks):
            self._send_webhook(job)
        last_recovery, last_purge = now, now - PURGE_INTERVAL_S
        while True:
            self._wake.clear()
            now = self._clock()
            if now - last_purge >= PURGE_INTERVAL_S:
                try:
                    await asyncio.to_thread(self.purge_expired)
                except Exception:
                    logger.exception("purging expired image jobs failed")
                last_purge = now
            if not self.store.embedded and now - last_recovery >= LEASE_S / 2:
                # Another replica's runs whose lease ran out: that replica died.
                for job_id in await asyncio.to_thread(
                    self.store.recover,
                    now=now,
                    max_attempts=self.settings.job_attempts,
                    ttl=self.settings.job_ttl,
                    everything=False,
                ):
                    await self._ended(job_id)
                last_recovery = now
            await self._take_jobs()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_S)

    async def _take_jobs(self) -> None:
        while not self._stopping and self._clock() >= self._not_before:
            room = self.max_images - self.running_images
            if self._running and room <= 0:
                return
            job = await asyncio.to_thread(
                self.store.claim_next,
                now=self._clock(),
                lease_s=LEASE_S,
                # Alone, a job of more images than a batch still runs.
                max_images=room if self._running else 2**31,
            )
            if job is None:
                return
            task = asyncio.get_running_loop().create_task(self._run(job), name=f"job-{job.id}")
            self._running[job.id] = (task, job.images)

    # ---- one run -------------------------------------------------------------------

    async def _run(self, job: JobRecord) -> None:
        token = job.runner_token
        assert token is not None
        run = asyncio.current_task()
        assert run is not None
        steps = [0]
        keeper = asyncio.ensure_future(self._keep_lease(job, token, run, steps))
        ended = False
        try:
            ended = await self._render(job, token, steps)
        except asyncio.CancelledError:
            if self._stopping:
                with contextlib.suppress(Exception):
                    await asyncio.shield(
                        asyncio.to_thread(self.store.release, job.id, token, count_attempt=False)
                    )
            raise
        finally:
            keeper.cancel()
            self._running.pop(job.id, None)
            self._wake.set()
        if ended:
            await self._ended(job.id)

    async def _render(self, job: JobRecord, token: str, steps: list[int]) -> bool:
        """Renders the job and stores its end; True when this run ended it.

        `steps[0]`: the denoising steps done so far, for `_keep_lease` to write.
        """
        now = self._clock

        def on_step(step: int) -> None:
            # A sequential refiner runs steps of its own after the base's: never past 100 %,
            # and never back (a step reported late, after a later one).
            steps[0] = max(steps[0], min(step, job.steps))

        try:
            kind = KINDS.get(job.kind)
            if kind is None:  # written by a newer version of the service
                raise invalid_value("kind", f"This server runs no jobs of kind '{job.kind}'.")
            request = kind.request.model_validate(job.request)
            resolved = await self.images.resolve(kind, request, job.image, job.mask)
            response = await self.images.render(resolved, job.base_url, self.files, on_step)
        except ValidationError as exc:
            error = validation_error(RequestValidationError(exc.errors()))
            return await self._fail(job, token, error.body()["error"])
        except APIError as error:
            # Decided on the render outcome the error answers (None: a refusal of the
            # request itself, which a second run would only repeat).
            decision = self.retry.after_outcome(error.outcome, job.attempts, error.retry_after)
            if not decision.requeue:
                return await self._fail(job, token, error.body()["error"])
            not_before = now() + decision.delay_s
            if decision.verdict is Verdict.LATER:
                # The render service is full or loading for every job, not just this one.
                self._not_before = not_before
            await asyncio.to_thread(
                self.store.release,
                job.id,
                token,
                count_attempt=decision.count_attempt,
                not_before=not_before,
            )
            return False
        except Exception:
            logger.exception("image job %s failed", job.id)
            internal = APIError(500, "The server failed to run the job.", code="internal_error")
            return await self._fail(job, token, internal.body()["error"])
        result = response.model_dump(mode="json", exclude_none=True)
        return await asyncio.to_thread(
            self.store.finish,
            job.id,
            token,
            JobStatus.SUCCEEDED,
            now=now(),
            ttl=self.settings.job_ttl,
            result=result,
            images_done=len(response.data),
        )

    async def _fail(self, job: JobRecord, token: str, error: dict[str, Any]) -> bool:
        return await asyncio.to_thread(
            self.store.finish,
            job.id,
            token,
            JobStatus.FAILED,
            now=self._clock(),
            ttl=self.settings.job_ttl,
            error=error,
        )

    async def _keep_lease(
        self, job: JobRecord, token: str, run: asyncio.Task[None], steps: list[int]
    ) -> None:
        """Writes the run's progress, and renews its lease every RENEW_S."""
        written, renewed = 0, time.monotonic()
        while True:
            await asyncio.sleep(PROGRESS_S)
            if steps[0] != written:
                written = steps[0]
                await asyncio.to_thread(
                    self.store.progress, job.id, token, step=written, images_done=0
                )
            if time.monotonic() - renewed < RENEW_S:
                continue
            renewed = time.monotonic()
            held = await asyncio.to_thread(
                self.store.renew, job.id, token, lease_until=self._clock() + LEASE_S
            )
            if not held:
                # Cancelled, perhaps on another replica: stop at the next step.
                run.cancel()
                return

    # ---- cancellation and the end of a job ----------------------------------------------

    async def cancelled(self, job_id: str) -> None:
        """The job was just cancelled in the store: stop its run here, if any, and say so."""
        entry = self._running.get(job_id)
        if entry is not None:
            entry[0].cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await entry[0]
        await self._ended(job_id)

    async def _ended(self, job_id: str) -> None:
        job = await asyncio.to_thread(self.store.get, job_id, now=self._clock())
        if job is not None and job.webhook_state is WebhookState.PENDING:
            self._send_webhook(job)

    def _send_webhook(self, job: JobRecord) -> None:
        if self.webhooks is None or job.webhook_url is None:
            return
        task = asyncio.get_running_loop().create_task(self._deliver(job, self.webhooks))
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def _deliver(self, job: JobRecord, webhooks: WebhookDelivery) -> None:
        assert job.webhook_url is not None
        event = WebhookEvent(
            message_id=f"msg_{job.id.removeprefix('imgjob_')}",
            event_type=f"image.job.{job.status.value}",
            data=job.public(),
        )

        async def record(attempts: list[dict[str, Any]]) -> None:
            job.webhook_attempts = attempts
            await asyncio.to_thread(
                self.store.record_webhook, job.id, attempts, WebhookState.PENDING
            )

        try:
            delivered = await webhooks.deliver(job.webhook_url, event, record, job.webhook_attempts)
        except Exception:
            logger.exception("webhook of image job %s failed", job.id)
            delivered = False
        state = WebhookState.DELIVERED if delivered else WebhookState.FAILED
        await asyncio.to_thread(self.store.record_webhook, job.id, job.webhook_attempts, state)

    # ---- housekeeping -------------------------------------------------------------------

    def purge_expired(self) -> int:
        """Deletes expired jobs and their files (blocking: from a thread)."""
        jobs = self.store.expired(now=self._clock())
        for job in jobs:
            for file_id in result_file_ids(job):
                self.files.delete(file_id)
        return self.store.purge(job.id for job in jobs)
