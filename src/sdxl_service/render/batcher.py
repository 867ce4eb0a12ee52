"""Cross-request batching of images in the render process.

Images of different requests that share `RenderParams` run as one pipeline
call. This is hand-rolled rather than BentoML's adaptive batching
(`@bentoml.api(batchable=True)`) because we need what its dispatcher does not
do: grouping by compatibility key (it mixes every request into one batch), a
bounded queue that rejects at once (429) instead of queueing, dropping the
queued work of cancelled or timed-out requests, and stopping a running batch at
the next denoising step when nobody waits for any of its images. When a
batch starts is batch_policy.py's decision; the live previews of a batch go to
the jobs that asked for them (pending.py).

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
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable

from PIL.Image import Image

from ..contract.render_request import GenerationOutcome, OutcomeStatus, RenderParams, RenderRequest
from ..engine.render_batch import (
    ImageTask,
    InvalidControlNet,
    InvalidEmbedding,
    InvalidIpAdapter,
    InvalidLora,
    InvalidModel,
    InvalidUpscaler,
    OutOfMemory,
    RenderBatch,
    RenderCancelled,
    image_tasks,
)
from ..metrics import ServiceMetrics
from .batch_policy import Demand, after_out_of_memory, demand_after_call, next_batch
from .pending import (
    PendingRender,
    PreviewFn,
    QueuedImage,
    preview_routing,
    rendered_image,
    step_routing,
)

logger = logging.getLogger(__name__)

RenderFn = Callable[[RenderBatch], list[Image]]
# The 75-token chunks of an image's conditioning (Engine.conditioning_chunks).
ChunkCountFn = Callable[[ImageTask, RenderParams], int]
# Which rendered images the safety checker flags (engine/safety.py SafetyChecker.flags).
ScreenFn = Callable[[list[Image]], list[bool]]

# How long `stop` waits for a render call to notice should_stop; past it the
# (daemon) thread is abandoned so that shutdown never hangs.
_STOP_JOIN_S = 10.0

_SHUTDOWN = "service is shutting down"
_TIMED_OUT = "request timed out"


# What the engine raises when a batch's model, adapter or embedding cannot be used, and the
# outcome each is. An embedding was checked per request before it was queued
# (api/serving.py): only a file changed since then gets here.
REFUSALS: dict[type[Exception], OutcomeStatus] = {
    InvalidLora: OutcomeStatus.INVALID_LORA,
    InvalidModel: OutcomeStatus.INVALID_MODEL,
    InvalidUpscaler: OutcomeStatus.INVALID_UPSCALER,
    InvalidControlNet: OutcomeStatus.INVALID_CONTROLNET,
    InvalidIpAdapter: OutcomeStatus.INVALID_IP_ADAPTER,
    InvalidEmbedding: OutcomeStatus.INVALID_EMBEDDING,
}
_REFUSED = tuple(REFUSALS)


class Batcher:
    """Queues the images of `RenderRequest`s and renders compatible ones together.

    The Batcher owns the request deadline (`RenderRequest.deadline`): no other
    component of the service acts on it. Everything it does with it sits in
    the "deadline" section below.
    """

    def __init__(
        self,
        render: RenderFn,
        *,
        max_batch_images: int,
        batch_wait_ms: int,
        metrics: ServiceMetrics | None = None,
        chunk_count: ChunkCountFn | None = None,
        screen: ScreenFn | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_batch_images < 1 or batch_wait_ms < 0:
            raise ValueError("max_batch_images >= 1 and batch_wait_ms >= 0")
        self._render = render
        self._chunk_count = chunk_count
        # SDXL_SAFETY_CHECKER: every rendered batch goes through it before any job sees it.
        self._screen = screen
        self._max_batch = max_batch_images
        self._batch_wait_s = batch_wait_ms / 1000
        self._metrics = metrics
        # Unix time, the scale of RenderRequest.deadline.
        self._clock = clock

        self._cond = threading.Condition()
        self._queue: collections.deque[QueuedImage] = collections.deque()
        self._pending: dict[str, list[PendingRender]] = {}
        self._demand = Demand()
        self._stopping = False
        # Started by the first submit.
        self._thread = threading.Thread(target=self._work, name="sdxl-batch-worker", daemon=True)

    # --- public -------------------------------------------------------------

    async def submit(
        self,
        job: RenderRequest,
        *,
        on_preview: PreviewFn | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> GenerationOutcome:
        """Renders the job's images, batched with compatible work of other jobs.

        Expected failures come back as the outcome's status, never raised.
        `on_preview(image index in the seeds, preview index, image)` gets the
        job's `partial_images` previews per image, on the worker thread, until
        the job is answered; `on_step(steps done)` hears of each denoising step
        of the batches its images are in, on the worker thread too.
        """
        n = len(job.seeds)
        if n == 0:
            return GenerationOutcome(status=OutcomeStatus.OK)
        if self._past_deadline(job):
            late = "request timed out before it was queued"
            return self._rejected(GenerationOutcome(status=OutcomeStatus.TIMEOUT, message=late))

        with self._cond:
            if self._stopping:
                return self._rejected(
                    GenerationOutcome(status=OutcomeStatus.ERROR, message=_SHUTDOWN)
                )
            # No queue limit here: SDXL_MAX_QUEUE_IMAGES is kept by the HTTP
            # process's render client, the one place every worker's calls pass.
            future = asyncio.get_running_loop().create_future()
            now = time.monotonic()
            pending = PendingRender(
                job=job,
                future=future,
                results=[None] * n,
                on_preview=on_preview,
                on_step=on_step,
                submitted_at=now,
            )
            self._pending.setdefault(job.request_id, []).append(pending)
            for index, task in enumerate(image_tasks(job)):
                self._queue.append(
                    QueuedImage(pending=pending, index=index, task=task, enqueued_at=now)
                )
            self._gauges_locked()
            if self._thread.ident is None:
                self._thread.start()
            self._cond.notify_all()

        try:
            return await self._outcome_by_deadline(pending)
        except asyncio.CancelledError:
            self.cancel(job.request_id)
            raise

    def cancel(self, request_id: str) -> bool:
        """Drops the request's queued images; stops its running batch if nobody
        else waits for it. True when there was something to cancel."""
        with self._cond:
            pendings = [p for p in self._pending.get(request_id, []) if not p.finished]
            self._finish_all(pendings, OutcomeStatus.CANCELLED, "request cancelled")
            return bool(pendings)

    async def stop(self) -> None:
        """Answers everything still pending with ERROR and ends the worker thread."""
        with self._cond:
            self._stopping = True
            everything = [p for pendings in self._pending.values() for p in pendings]
            self._finish_all(everything, OutcomeStatus.ERROR, _SHUTDOWN)
            self._cond.notify_all()
        if self._thread.ident is not None:  # started, and no submit starts it any more
            # A running render sees should_stop() and ends at its next step.
            await asyncio.to_thread(self._thread.join, _STOP_JOIN_S)
            if self._thread.is_alive():
                logger.warning("batch worker still rendering after %.0f s; abandoned", _STOP_JOIN_S)

    # --- the deadline: acted on here and nowhere else in the service ---------
    # A job past its deadline gets TIMEOUT: on time from `submit`'s wait even
    # while a render step runs; its queued images are dropped before the next
    # batch is picked (`_expire_queued_locked`); its running images stop at the
    # next denoising step once no job of the batch is still wanted (`_unwanted`).

    def _past_deadline(self, job: RenderRequest) -> bool:
        return job.deadline is not None and self._clock() >= job.deadline

    async def _outcome_by_deadline(self, pending: PendingRender) -> GenerationOutcome:
        deadline = pending.job.deadline
        timeout = None if deadline is None else max(0.0, deadline - self._clock())
        try:
            # shield: a timeout must not cancel the future the worker resolves.
            return await asyncio.wait_for(asyncio.shield(pending.future), timeout)
        except TimeoutError:
            self._finish_all([pending], OutcomeStatus.TIMEOUT, _TIMED_OUT)
            # Whatever decided first (the images may have just arrived).
            return await pending.future

    def _expire_locked(self, pendings: Iterable[PendingRender]) -> None:
        expired = [p for p in pendings if not p.finished and self._past_deadline(p.job)]
        self._finish_all(expired, OutcomeStatus.TIMEOUT, _TIMED_OUT)

    def _expire_queued_locked(self) -> None:
        self._expire_locked(dict.fromkeys(q.pending for q in self._queue))

    def _unwanted(self, pendings: list[PendingRender]) -> bool:
        """A batch's should_stop, polled at every denoising step."""
        with self._cond:
            return self._stopping or all(p.finished or self._past_deadline(p.job) for p in pendings)

    # --- refusals -----------------------------------------------------------

    def _rejected(self, outcome: GenerationOutcome) -> GenerationOutcome:
        if self._metrics is not None:
            self._metrics.reject(outcome.status.value)
        return outcome

    # --- outcomes ----------------------------------------------------------

    def _finish_all(
        self, pendings: Iterable[PendingRender], status: OutcomeStatus, message: str
    ) -> None:
        """Answers every job not answered yet; the first outcome decided stands."""
        # The lock is re-entrant (Condition's default RLock): callers that
        # hold it already may call this too.
        with self._cond:
            for pending in list(pendings):
                self._finish_locked(pending, GenerationOutcome(status=status, message=message))

    def _finish_locked(self, pending: PendingRender, outcome: GenerationOutcome) -> None:
        if pending.finished:
            return
        pending.finished = True
        if any(q.pending is pending for q in self._queue):
            self._queue = collections.deque(q for q in self._queue if q.pending is not pending)
        same_id = self._pending[pending.job.request_id]  # every unfinished job is there
        same_id.remove(pending)
        if not same_id:
            del self._pending[pending.job.request_id]
        if self._metrics is not None and outcome.status is not OutcomeStatus.OK:
            self._metrics.reject(outcome.status.value)
        self._gauges_locked()
        # RuntimeError: its loop is closed, nobody can await the outcome any more.
        with contextlib.suppress(RuntimeError):
            pending.future.get_loop().call_soon_threadsafe(_resolve, pending.future, outcome)

    def _gauges_locked(self) -> None:
        if self._metrics is not None:
            self._metrics.set_queue_depth(len(self._queue))
            self._metrics.set_requests_in_flight(sum(map(len, self._pending.values())))

    # --- worker thread ------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                images = self._next_batch_locked()
            if images is None:
                return
            try:
                self._run(images)
            except Exception:
                # _run answers its jobs itself; this keeps the worker alive
                # whatever goes wrong in the bookkeeping.
                logger.exception("batch worker: unexpected failure")
                pendings = dict.fromkeys(q.pending for q in images)
                self._finish_all(pendings, OutcomeStatus.ERROR, "internal error")

    def _next_batch_locked(self) -> list[QueuedImage] | None:
        """Waits for work and takes the next batch (batch_policy.py); None when stopping."""
        while True:
            if self._stopping:
                return None
            self._expire_queued_locked()
            if not self._queue:
                self._cond.wait()
                continue
            self._count_chunks_locked()
            selected, wait_s = next_batch(
                self._queue,
                max_images=self._max_batch,
                wait_s=self._batch_wait_s,
                now=time.monotonic(),
                demand=self._demand,
            )
            if selected:
                break
            self._cond.wait(wait_s)

        taken = set(map(id, selected))
        self._queue = collections.deque(q for q in self._queue if id(q) not in taken)
        self._gauges_locked()
        if self._metrics is not None:
            now = time.monotonic()
            for q in selected:
                self._metrics.observe_stage("queue_wait", now - q.enqueued_at)
        return selected

    def _count_chunks_locked(self) -> None:
        """Each newly queued image's chunk count, part of its batch key (batch_policy.py).

        Here, on the worker thread: the engine's tokenizers are used by one thread only.
        """
        for queued in self._queue:
            if queued.chunks is None:
                counted = self._chunk_count(queued.task, queued.params) if self._chunk_count else 1
                queued.chunks = counted

    def _run(self, images: list[QueuedImage]) -> None:
        with self._cond:
            # A job may have been answered (failed, cancelled) while an
            # earlier half of an OOM split ran.
            images = [q for q in images if not q.pending.finished]
        if not images:
            return
        pendings = list(dict.fromkeys(q.pending for q in images))
        params = images[0].pending.job.params
        preview_counts, on_preview = preview_routing(images)
        batch = RenderBatch(
            params=params,
            tasks=[q.task for q in images],
            should_stop=functools.partial(self._unwanted, pendings),
            on_preview=on_preview,
            preview_counts=preview_counts,
            on_step=step_routing(pendings),
        )
        started = time.monotonic()
        try:
            rendered = self._render(batch)
            flagged = self._screened(rendered)
        except RenderCancelled:
            with self._cond:
                # Why should_stop said yes, first match wins: shutdown, the
                # deadline, else every job was cancelled.
                if self._stopping:
                    self._finish_all(pendings, OutcomeStatus.ERROR, _SHUTDOWN)
                self._expire_locked(pendings)
                self._finish_all(pendings, OutcomeStatus.CANCELLED, "request cancelled")
            return
        except OutOfMemory:
            retries = after_out_of_memory(images)
            if retries:
                logger.warning("out of memory rendering %d images; retrying in halves", len(images))
                for retry in retries:
                    self._run(retry)
                return
            size = f"{params.width}x{params.height}"
            message = f"out of GPU memory rendering one {size} image; try a smaller size or n"
            self._finish_all(pendings, OutcomeStatus.OUT_OF_MEMORY, message)
            return
        except _REFUSED as exc:
            # Every job of the batch asked for the same models and adapters: all get the answer.
            status = next(status for kind, status in REFUSALS.items() if isinstance(exc, kind))
            self._finish_all(pendings, status, str(exc))
            return
        except Exception as exc:
            logger.exception("render of %d images failed", len(images))
            message = f"image generation failed: {type(exc).__name__}: {exc}"
            self._finish_all(pendings, OutcomeStatus.ERROR, message)
            return

        elapsed = time.monotonic() - started
        if len(rendered) != len(images):
            logger.error("render returned %d images for %d tasks", len(rendered), len(images))
            self._finish_all(pendings, OutcomeStatus.ERROR, "internal error")
            return

        if self._metrics is not None:
            self._metrics.observe_batch(len(images))
            self._metrics.count_images(len(images))
            if any(flagged):
                self._metrics.count_flagged(sum(flagged))
        with self._cond:
            # Before any job is answered: a client answered now and back at
            # once must not count as one more that was waiting.
            self._demand = demand_after_call(images, self._queue, time.monotonic())
            # Images that arrive after their job's deadline are not delivered.
            self._expire_locked(pendings)
            for pending in pendings:
                pending.render_seconds += elapsed
            now = time.monotonic()
            for q, image, withheld in zip(images, rendered, flagged, strict=True):
                if q.pending.finished:
                    continue
                if withheld:
                    # Its pixels go no further than this worker.
                    q.pending.flagged.add(q.index)
                else:
                    q.pending.results[q.index] = rendered_image(q.task.seed, image)
                if q.pending.complete():
                    render_s = q.pending.render_seconds
                    waited_s = max(0.0, now - q.pending.submitted_at - render_s)
                    self._finish_locked(q.pending, q.pending.outcome(render_s, waited_s))

    def _screened(self, rendered: list[Image]) -> list[bool]:
        """Which of the batch's images the safety checker flags (none without one)."""
        if self._screen is None or not rendered:
            return [False] * len(rendered)
        started = time.monotonic()
        flagged = self._screen(rendered)
        if self._metrics is not None:
            self._metrics.observe_stage("safety_check", time.monotonic() - started)
        if len(flagged) != len(rendered):
            raise RuntimeError(f"{len(flagged)} verdicts for {len(rendered)} images")
        return flagged


def _resolve(future: asyncio.Future[GenerationOutcome], outcome: GenerationOutcome) -> None:
    if not future.done():
        future.set_result(outcome)
