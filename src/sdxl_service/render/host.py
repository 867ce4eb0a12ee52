"""The render process: loads the engine in the background and feeds it batches.

Loading SDXL takes minutes; doing it off the event loop keeps /livez and the
render service's own APIs answering (LOADING, with Retry-After) meanwhile.
`stream` is one request's way through a worker: the events the HTTP service
reads (which worker took it, previews, the outcome). Closing the stream is how
the HTTP service cancels: it reaches the worker that holds the work, where a
cancel call could land on any worker of the shared socket.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator
from typing import Any

from ..contract.render_request import (
    GenerationOutcome,
    OutcomeStatus,
    RenderedImage,
    RenderEvent,
    RenderEventType,
    RenderRequest,
    loading_outcome,
)
from ..contract.worker_registry import WorkerRegistry, WorkerState, WorkerStatus
from ..engine.config import EngineConfig
from ..metrics import ServiceMetrics
from ..settings import Settings
from .batcher import Batcher

logger = logging.getLogger(__name__)


class RenderHost:
    def __init__(
        self,
        settings: Settings,
        metrics: ServiceMetrics | None = None,
        *,
        worker: int = 1,
        workers: int = 1,
        device: str | None = None,
        registry: WorkerRegistry | None = None,
    ) -> None:
        self.settings = settings
        self._device = device
        self.metrics = metrics
        self.worker = worker
        self.workers = workers
        self.registry = registry
        if metrics is not None:
            metrics.count_render_worker_start()
        self.engine: Any = None
        self.load_error: str | None = None
        self._batcher: Batcher | None = None
        # A safety checker screens every image (SDXL_SAFETY_CHECKER): no previews then.
        self._screens = False
        # Jobs this worker holds (queued or rendering): "busy" for callers that
        # would rather reach an idle worker.
        self._held = 0
        self._publish(WorkerState.LOADING)
        self._loader = threading.Thread(target=self._load, name="sdxl-load", daemon=True)
        self._loader.start()

    def _publish(self, state: WorkerState) -> None:
        if self.registry is None:
            return
        try:
            status = WorkerStatus(self.worker, os.getpid(), state, self.settings.device)
            self.registry.publish(status)
        except OSError:
            logger.warning("could not publish worker %d state", self.worker, exc_info=True)

    def _load(self) -> None:
        try:
            from ..engine import Engine  # torch and diffusers load here, in this process only

            self._pick_device()
            observer = self.metrics.observe_stage if self.metrics else None
            config = EngineConfig.of(self.settings)
            engine = Engine.load(config, stage_observer=observer, metrics=self.metrics)
            # On a GPU the first call pays for kernel selection (and compilation when
            # on): paid before /readyz says yes, not in a user's request.
            warmed = engine.warmup()
            self._screens = engine.safety is not None
            self._batcher = Batcher(
                engine.render,
                max_batch_images=self.settings.max_batch_images,
                batch_wait_ms=self.settings.batch_wait_ms,
                metrics=self.metrics,
                chunk_count=engine.conditioning_chunks,
                screen=None if engine.safety is None else engine.safety.flags,
            )
            self.engine = engine
            logger.info(
                "worker %d: pipelines loaded%s: %s",
                self.worker,
                " and warm" if warmed else " (no warm-up: SDXL_WARMUP)",
                engine.describe(),
            )
            self._publish(WorkerState.READY)
        except Exception as exc:
            logger.exception("loading the pipelines failed")
            self.load_error = f"{type(exc).__name__}: {exc}"
            self._publish(WorkerState.FAILED)

    def _pick_device(self) -> None:
        """This worker's GPU (worker_plan.py), when the settings leave the device open;
        without one, its share of the CPU cores.

        Only with CUDA at hand: without a GPU BentoML still hands the worker
        `CUDA_VISIBLE_DEVICES=0` for the service's one declared GPU.
        """
        import torch

        if self._device and self.settings.device in ("auto", "cuda") and torch.cuda.is_available():
            self.settings = self.settings.model_copy(update={"device": self._device})
        elif self.workers > 1:
            # Workers sharing the CPU: torch's one thread per core in each
            # would oversubscribe the cores many times over.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.workers))

    def is_ready(self) -> bool:
        return self._batcher is not None

    def is_alive(self) -> bool:
        # A failed load will not heal itself: let the orchestrator restart us.
        return self.load_error is None

    async def stream(
        self, job: RenderRequest, only_if_idle: bool = False
    ) -> AsyncIterator[RenderEvent]:
        """ACCEPTED (or BUSY), the job's previews as they are made, then its OUTCOME.

        BUSY: the caller asked for a worker that can start the job now, and
        this one holds work or is still loading.

        Closing the stream early (the caller went away) cancels the job.
        """
        if only_if_idle and (self._held or not self.is_ready()):
            yield RenderEvent(type=RenderEventType.BUSY, worker=self.worker)
            return
        yield RenderEvent(type=RenderEventType.ACCEPTED, worker=self.worker)
        outcome = self._not_serving()
        if outcome is not None:
            yield RenderEvent(type=RenderEventType.OUTCOME, outcome=outcome)
            return
        assert self._batcher is not None
        if job.partial_images and self._screens:
            # A preview shows the image before the checker has seen it: none are made
            # while one is on (OpenAI too may send fewer partial images than asked).
            job = job.model_copy(update={"partial_images": 0})
        if not job.partial_images and not job.report_progress:
            # Nothing to relay while it renders: await the outcome itself, with
            # no preview queue and no extra task (fewer event-loop turns on the
            # way out). Cancelling the stream's task cancels the submit.
            self._held += 1
            try:
                outcome = await self._batcher.submit(job)
            finally:
                self._held -= 1
            yield RenderEvent(type=RenderEventType.OUTCOME, outcome=outcome)
            return
        previews: asyncio.Queue[RenderEvent] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def on_preview(index: int, partial_index: int, image: RenderedImage) -> None:
            event = RenderEvent(
                type=RenderEventType.PARTIAL, index=index, partial_index=partial_index, image=image
            )
            loop.call_soon_threadsafe(previews.put_nowait, event)

        def on_step(step: int) -> None:
            event = RenderEvent(type=RenderEventType.PROGRESS, step=step)
            loop.call_soon_threadsafe(previews.put_nowait, event)

        self._held += 1
        # The Batcher cancels the job's images when this task is cancelled.
        task = asyncio.ensure_future(
            self._batcher.submit(
                job,
                on_preview=on_preview if job.partial_images else None,
                on_step=on_step if job.report_progress else None,
            )
        )
        try:
            while not task.done():
                waiting = asyncio.ensure_future(previews.get())
                await asyncio.wait({task, waiting}, return_when=asyncio.FIRST_COMPLETED)
                if waiting.done():
                    yield waiting.result()
                else:
                    waiting.cancel()
            while not previews.empty():
                yield previews.get_nowait()
            yield RenderEvent(type=RenderEventType.OUTCOME, outcome=task.result())
        finally:
            self._held -= 1
            if not task.done():
                task.cancel()

    def _not_serving(self) -> GenerationOutcome | None:
        if self.load_error:
            return GenerationOutcome(
                status=OutcomeStatus.ERROR, message=f"The model failed to load: {self.load_error}"
            )
        if self._batcher is None:
            return loading_outcome()
        return None

    async def stop(self) -> None:
        if self._batcher is not None:
            await self._batcher.stop()

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"loaded": self.is_ready(), "error": self.load_error}
        if self.engine is not None:
            info.update(self.engine.describe())
        return info

    def describe_upscalers(self) -> dict[str, Any] | None:
        """The upscaler models of SDXL_UPSCALER_DIR as spandrel reads them (architecture and
        scale, or a problem), by name; None until the engine has loaded. Loads files on the
        CPU the first time: call it off the event loop."""
        if self.engine is None:
            return None
        return dict(self.engine.upscalers.describe())
