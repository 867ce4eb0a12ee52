"""Cross-request batching of images in the pipeline process.

Images of different requests that share `RenderParams` run as one pipeline
call. This is hand-rolled rather than BentoML's adaptive batching
(`@bentoml.api(batchable=True)`) because we need what its dispatcher does not
do: grouping by compatibility key (it mixes every request into one batch), a
bounded queue that rejects at once (429) instead of queueing, dropping the
queued work of cancelled or timed-out requests, and stopping a running batch at
the next denoising step when nobody waits for any of its images.

Threads: `submit` runs on the service's event loop; one worker thread makes
every render call, because the GPU runs one call at a time and a call takes
seconds that the event loop must not wait on. State shared between them sits
behind one lock; futures are resolved on their own loop with
`call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL.Image import Image

from sdxl_service.jobs import (
    GenerationJob,
    GenerationOutcome,
    ImageTask,
    OutcomeStatus,
    OutOfMemory,
    RenderBatch,
    RenderCancelled,
    RenderedImage,
    RenderParams,
)
from sdxl_service.metrics import ServiceMetrics

logger = logging.getLogger(__name__)

RenderFn = Callable[[RenderBatch], list[Image]]

# Weight of the latest pipeline call in the seconds-per-image estimate behind
# Retry-After: recent enough to follow a change of sizes, smooth enough to
# ignore one odd call.
_EWMA_WEIGHT = 0.3
# How long `stop` waits for a render call to notice should_stop; past it the
# (daemon) thread is abandoned so that shutdown never hangs.
_STOP_JOIN_S = 10.0


@dataclass(eq=False)
class _PendingJob:
    job: GenerationJob
    params: RenderParams
    future: asyncio.Future[GenerationOutcome]
    loop: asyncio.AbstractEventLoop
    results: list[RenderedImage | None]
    remaining: int
    # Set once, under the scheduler's lock, by whoever decides the outcome.
    finished: bool = False

    def expired(self, now: float) -> bool:
        return self.job.deadline is not None and now >= self.job.deadline


@dataclass(eq=False)
class _QueuedImage:
    pending: _PendingJob
    index: int  # position in the job's seeds
    task: ImageTask
    enqueued_at: float = field(default_factory=time.monotonic)


class Batcher:
    """Queues the images of `GenerationJob`s and renders compatible ones together."""

    def __init__(
        self,
        render: RenderFn,
        *,
        max_batch_images: int,
        batch_wait_ms: int,
        max_queue_images: int,
        metrics: ServiceMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_batch_images < 1 or max_queue_images < 1 or batch_wait_ms < 0:
            raise ValueError("max_batch_images, max_queue_images >= 1 and batch_wait_ms >= 0")
        self._render = render
        self._max_batch = max_batch_images
        self._batch_wait_s = batch_wait_ms / 1000
        self._max_queue = max_queue_images
        self._metrics = metrics
        # Unix time, the scale of GenerationJob.deadline.
        self._clock = clock

        self._cond = threading.Condition()
        self._queue: collections.deque[_QueuedImage] = collections.deque()
        self._running: list[_QueuedImage] = []
        self._pending: dict[str, list[_PendingJob]] = {}
        self._seconds_per_image: float | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None

    # --- public -------------------------------------------------------------

    @property
    def queued_images(self) -> int:
        with self._cond:
            return len(self._queue)

    @property
    def running_images(self) -> int:
        with self._cond:
            return len(self._running)

    def start(self) -> None:
        """Starts the worker thread; `submit` does it on first use."""
        with self._cond:
            if self._stopping:
                raise RuntimeError("scheduler is stopped")
            self._start_locked()

    def _start_locked(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._work, name="sdxl-batch-worker", daemon=True
            )
            self._thread.start()

    async def stop(self) -> None:
        """Answers everything still pending with ERROR and ends the worker thread."""
        with self._cond:
            self._stopping = True
            for pendings in list(self._pending.values()):
                for pending in pendings:
                    self._finish_locked(pending, _outcome(OutcomeStatus.ERROR, _SHUTDOWN))
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            # A running render sees should_stop() and ends at its next step.
            await asyncio.to_thread(thread.join, _STOP_JOIN_S)
            if thread.is_alive():
                logger.warning("batch worker still rendering after %.0f s; abandoned", _STOP_JOIN_S)

    async def submit(self, job: GenerationJob) -> GenerationOutcome:
        """Renders the job's images, batched with compatible work of other jobs.

        Expected failures come back as the outcome's status, never raised.
        """
        loop = asyncio.get_running_loop()
        n = len(job.seeds)
        if n == 0:
            return GenerationOutcome(status=OutcomeStatus.OK)
        if job.deadline is not None and self._clock() >= job.deadline:
            return self._rejected(OutcomeStatus.TIMEOUT, "request timed out before it was queued")

        with self._cond:
            if self._stopping:
                return self._rejected(OutcomeStatus.ERROR, _SHUTDOWN)
            # Images nobody waits for any more (cancelled, timed out) stop at
            # their next denoising step: they must not turn new work away.
            backlog = len(self._queue) + sum(not q.pending.finished for q in self._running)
            if backlog + n > self._max_queue:
                return self._queue_full_locked(backlog, n)
            pending = _PendingJob(
                job=job,
                params=job.params,
                future=loop.create_future(),
                loop=loop,
                results=[None] * n,
                remaining=n,
            )
            self._pending.setdefault(job.request_id, []).append(pending)
            now = time.monotonic()
            for index, task in enumerate(job.tasks()):
                self._queue.append(_QueuedImage(pending, index, task, enqueued_at=now))
            self._gauges_locked()
            self._start_locked()
            self._cond.notify_all()

        try:
            timeout = None if job.deadline is None else max(0.0, job.deadline - self._clock())
            try:
                # shield: a timeout must not cancel the future the worker resolves.
                return await asyncio.wait_for(asyncio.shield(pending.future), timeout)
            except TimeoutError:
                with self._cond:
                    self._finish_locked(
                        pending, _outcome(OutcomeStatus.TIMEOUT, "request timed out")
                    )
                # Whatever decided first (the images may have just arrived).
                return await pending.future
        except asyncio.CancelledError:
            self.cancel(job.request_id)
            raise

    def cancel(self, request_id: str) -> bool:
        """Drops the request's queued images; stops its running batch if nobody
        else waits for it. True when there was something to cancel."""
        with self._cond:
            pendings = [p for p in self._pending.get(request_id, []) if not p.finished]
            for pending in pendings:
                self._finish_locked(pending, _outcome(OutcomeStatus.CANCELLED, "request cancelled"))
            return bool(pendings)

    # --- admission ----------------------------------------------------------

    def _rejected(self, status: OutcomeStatus, message: str) -> GenerationOutcome:
        if self._metrics is not None:
            self._metrics.reject(status.value)
        return _outcome(status, message)

    def _queue_full_locked(self, backlog: int, n: int) -> GenerationOutcome:
        if n > self._max_queue:
            message = (
                f"request for {n} images exceeds the queue capacity of "
                f"{self._max_queue} images; ask for fewer images per request"
            )
        else:
            message = (
                f"server busy: {backlog} images queued or rendering "
                f"(limit {self._max_queue}); retry later"
            )
        # Time until enough images finished for this request to fit.
        excess = min(backlog, backlog + n - self._max_queue)
        per_image = self._seconds_per_image or 1.0
        outcome = self._rejected(OutcomeStatus.QUEUE_FULL, message)
        outcome.retry_after = float(max(1, math.ceil(excess * per_image)))
        return outcome

    # --- bookkeeping (callers hold self._cond) ------------------------------

    def _finish_locked(self, pending: _PendingJob, outcome: GenerationOutcome) -> None:
        if pending.finished:
            return
        pending.finished = True
        if any(q.pending is pending for q in self._queue):
            self._queue = collections.deque(q for q in self._queue if q.pending is not pending)
        same_id = self._pending.get(pending.job.request_id, [])
        if pending in same_id:
            same_id.remove(pending)
        if not same_id:
            self._pending.pop(pending.job.request_id, None)
        if self._metrics is not None and outcome.status is not OutcomeStatus.OK:
            self._metrics.reject(outcome.status.value)
        self._gauges_locked()
        # RuntimeError: its loop is closed, nobody can await the outcome any more.
        with contextlib.suppress(RuntimeError):
            pending.loop.call_soon_threadsafe(_resolve, pending.future, outcome)

    def _gauges_locked(self) -> None:
        if self._metrics is not None:
            self._metrics.set_queue_depth(len(self._queue))
            self._metrics.set_requests_in_flight(sum(map(len, self._pending.values())))

    def _expire_locked(self, pending: _PendingJob) -> None:
        self._finish_locked(pending, _outcome(OutcomeStatus.TIMEOUT, "request timed out"))

    def _drop_dead_locked(self) -> None:
        now = self._clock()
        for pending in {q.pending for q in self._queue if q.pending.expired(now)}:
            self._expire_locked(pending)

    # --- worker thread ------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                images = self._next_batch_locked()
                if images is None:
                    return
                self._running = images
                self._gauges_locked()
            try:
                self._run(images)
            except Exception:
                # _run answers its jobs itself; this keeps the worker alive
                # whatever goes wrong in the bookkeeping.
                logger.exception("batch worker: unexpected failure")
                with self._cond:
                    for pending in {q.pending for q in images}:
                        self._finish_locked(
                            pending, _outcome(OutcomeStatus.ERROR, "internal error")
                        )
            finally:
                with self._cond:
                    self._running = []
                    self._gauges_locked()

    def _next_batch_locked(self) -> list[_QueuedImage] | None:
        """Waits for work and picks the next batch; None when stopping.

        FIFO: the oldest queued image decides the params, then same-params
        images join in queue order. If the batch is not full it waits for
        company until the oldest image has waited batch_wait_ms — counted from
        its arrival, so work that already queued behind a busy GPU is not held
        back further. It does not wait while other-params work is queued: with
        a backlog the GPU should not idle, and that work would wait too.
        """
        while True:
            if self._stopping:
                return None
            self._drop_dead_locked()
            if not self._queue:
                self._cond.wait()
                continue
            head = self._queue[0]
            selected = [q for q in self._queue if q.pending.params == head.pending.params]
            selected = selected[: self._max_batch]
            if len(selected) >= self._max_batch or len(selected) < len(self._queue):
                break
            left = head.enqueued_at + self._batch_wait_s - time.monotonic()
            if left <= 0:
                break
            self._cond.wait(left)

        taken = set(map(id, selected))
        self._queue = collections.deque(q for q in self._queue if id(q) not in taken)
        if self._metrics is not None:
            now = time.monotonic()
            for q in selected:
                self._metrics.observe_stage("queue_wait", now - q.enqueued_at)
        return selected

    def _run(self, images: list[_QueuedImage]) -> None:
        with self._cond:
            # A job may have been answered (failed, cancelled) while an
            # earlier half of an OOM split ran.
            images = [q for q in images if not q.pending.finished]
        if not images:
            return
        pendings = list({id(q.pending): q.pending for q in images}.values())

        def should_stop() -> bool:
            with self._cond:
                if self._stopping:
                    return True
                now = self._clock()
                return all(p.finished or p.expired(now) for p in pendings)

        batch = RenderBatch(
            params=images[0].pending.params,
            tasks=[q.task for q in images],
            should_stop=should_stop,
        )
        started = time.monotonic()
        try:
            rendered = self._render(batch)
        except RenderCancelled:
            with self._cond:
                for pending in pendings:
                    if self._stopping:
                        status, message = OutcomeStatus.ERROR, _SHUTDOWN
                    elif pending.expired(self._clock()):
                        status, message = OutcomeStatus.TIMEOUT, "request timed out"
                    else:
                        status, message = OutcomeStatus.CANCELLED, "request cancelled"
                    self._finish_locked(pending, _outcome(status, message))
            return
        except OutOfMemory:
            if len(images) > 1:
                half = len(images) // 2
                logger.warning(
                    "out of memory rendering %d images; retrying as %d + %d",
                    len(images),
                    half,
                    len(images) - half,
                )
                self._run(images[:half])
                self._run(images[half:])
                return
            params = images[0].pending.params
            message = (
                f"out of GPU memory rendering one {params.width}x{params.height} image; "
                "try a smaller size or n"
            )
            with self._cond:
                self._finish_locked(pendings[0], _outcome(OutcomeStatus.OUT_OF_MEMORY, message))
            return
        except Exception as exc:
            logger.exception("render of %d images failed", len(images))
            message = f"image generation failed: {type(exc).__name__}: {exc}"
            with self._cond:
                for pending in pendings:
                    self._finish_locked(pending, _outcome(OutcomeStatus.ERROR, message))
            return

        elapsed = time.monotonic() - started
        if len(rendered) != len(images):
            logger.error("render returned %d images for %d tasks", len(rendered), len(images))
            with self._cond:
                for pending in pendings:
                    self._finish_locked(pending, _outcome(OutcomeStatus.ERROR, "internal error"))
            return

        per_image = elapsed / len(images)
        if self._metrics is not None:
            self._metrics.observe_batch(len(images))
            self._metrics.count_images(len(images))
        with self._cond:
            self._seconds_per_image = (
                per_image
                if self._seconds_per_image is None
                else _EWMA_WEIGHT * per_image + (1 - _EWMA_WEIGHT) * self._seconds_per_image
            )
            now = self._clock()
            for q, image in zip(images, rendered, strict=True):
                pending = q.pending
                if pending.finished:
                    continue
                if pending.expired(now):
                    self._expire_locked(pending)
                    continue
                if image.mode != "RGB":
                    image = image.convert("RGB")
                pending.results[q.index] = RenderedImage(
                    seed=q.task.seed, width=image.width, height=image.height, rgb=image.tobytes()
                )
                pending.remaining -= 1
                if pending.remaining == 0:
                    results = [r for r in pending.results if r is not None]
                    self._finish_locked(
                        pending, GenerationOutcome(status=OutcomeStatus.OK, images=results)
                    )


_SHUTDOWN = "service is shutting down"


def _outcome(status: OutcomeStatus, message: str) -> GenerationOutcome:
    return GenerationOutcome(status=status, message=message)


def _resolve(future: asyncio.Future[GenerationOutcome], outcome: GenerationOutcome) -> None:
    if not future.done():
        future.set_result(outcome)
