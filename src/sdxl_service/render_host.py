"""The render process: loads the engine in the background and feeds it batches.

Loading SDXL takes minutes; doing it off the event loop keeps /livez and the
render service's own APIs answering (LOADING, with Retry-After) meanwhile.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from .batching import Batcher
from .jobs import GenerationJob, GenerationOutcome, OutcomeStatus, still_loading
from .metrics import ServiceMetrics
from .settings import Settings

logger = logging.getLogger(__name__)


class RenderHost:
    def __init__(self, settings: Settings, metrics: ServiceMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        if metrics is not None:
            metrics.count_render_worker_start()
        self.engine: Any = None
        self.load_error: str | None = None
        self._batcher: Batcher | None = None
        self._loader = threading.Thread(target=self._load, name="sdxl-load", daemon=True)
        self._loader.start()

    def _load(self) -> None:
        try:
            from .engine import Engine  # torch and diffusers load here, in this process only

            observer = self.metrics.observe_stage if self.metrics else None
            engine = Engine.load(self.settings, stage_observer=observer, metrics=self.metrics)
            # The first call pays for kernel selection (and compilation when on);
            # pay it before /readyz says yes, not in a user's request.
            engine.warmup()
            self._batcher = Batcher(
                engine.render,
                max_batch_images=self.settings.max_batch_images,
                batch_wait_ms=self.settings.batch_wait_ms,
                max_queue_images=self.settings.max_queue_images,
                metrics=self.metrics,
            )
            self.engine = engine
            logger.info("pipelines loaded and warm: %s", engine.describe())
        except Exception as exc:
            logger.exception("loading the pipelines failed")
            self.load_error = f"{type(exc).__name__}: {exc}"

    def is_ready(self) -> bool:
        return self._batcher is not None

    def is_alive(self) -> bool:
        # A failed load will not heal itself: let the orchestrator restart us.
        return self.load_error is None

    async def generate(self, job: GenerationJob) -> GenerationOutcome:
        if self.load_error:
            return GenerationOutcome(
                status=OutcomeStatus.ERROR, message=f"The model failed to load: {self.load_error}"
            )
        if self._batcher is None:
            return still_loading()
        return await self._batcher.submit(job)

    async def stop(self) -> None:
        if self._batcher is not None:
            await self._batcher.stop()

    def cancel(self, request_id: str) -> bool:
        return self._batcher is not None and self._batcher.cancel(request_id)

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"loaded": self.is_ready(), "error": self.load_error}
        if self.engine is not None:
            info.update(self.engine.describe())
        return info
