"""What the Batcher keeps for each job and each queued image, and how an
engine preview finds its way back to the job and image it belongs to."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from PIL.Image import Image

from ..contract.render_request import (
    CONTENT_POLICY_MESSAGE,
    GenerationOutcome,
    OutcomeStatus,
    RenderedImage,
    RenderParams,
    RenderRequest,
)
from ..engine.render_batch import ImageTask
from .batch_policy import BatchKey

logger = logging.getLogger(__name__)

# (index of the image in the job's seeds, preview index from 0, the preview)
PreviewFn = Callable[[int, int, RenderedImage], None]
# The engine's side: (task index in the batch, preview index, image).
EnginePreviewFn = Callable[[int, int, Image], None]


@dataclass(eq=False, kw_only=True)
class PendingRender:
    job: RenderRequest
    future: asyncio.Future[GenerationOutcome]  # of the submitting event loop
    results: list[RenderedImage | None]  # in seed order, None until rendered
    # Indices (in seed order) of the images the safety checker flagged: withheld, never sent.
    flagged: set[int] = field(default_factory=set)
    on_preview: PreviewFn | None = None
    on_step: Callable[[int], None] | None = None
    # Set once, under the batcher's lock, by whoever decides the outcome.
    finished: bool = False
    submitted_at: float = 0.0  # time.monotonic()
    # Seconds of the pipeline calls that made its images (Server-Timing).
    render_seconds: float = 0.0

    def complete(self) -> bool:
        """Every image rendered, or flagged."""
        return all(r is not None or i in self.flagged for i, r in enumerate(self.results))

    def outcome(self, render_s: float, waited_s: float) -> GenerationOutcome:
        """The answer once complete: the images, and the seeds of those flagged; when every
        image was flagged, CONTENT_POLICY_VIOLATION."""
        seeds = self.job.seeds
        flagged_seeds = [seeds[i] for i in sorted(self.flagged)]
        if len(flagged_seeds) == len(seeds):
            return GenerationOutcome(
                status=OutcomeStatus.CONTENT_POLICY_VIOLATION, message=CONTENT_POLICY_MESSAGE
            )
        return GenerationOutcome(
            status=OutcomeStatus.OK,
            images=[r for r in self.results if r is not None],
            flagged_seeds=flagged_seeds,
            render_s=render_s,
            waited_s=waited_s,
        )


@dataclass(eq=False, kw_only=True)
class QueuedImage:
    pending: PendingRender
    index: int  # position in the job's seeds
    task: ImageTask
    enqueued_at: float  # time.monotonic()
    # Counted by the batcher's worker thread, the one that uses the engine's tokenizers.
    chunks: int | None = None

    @property
    def params(self) -> RenderParams:
        return self.pending.job.params

    @property
    def batch_key(self) -> BatchKey:
        return BatchKey(self.params, self.chunks or 1)


def rendered_image(seed: int, image: Image) -> RenderedImage:
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return RenderedImage(seed=seed, width=rgb.width, height=rgb.height, rgb=rgb.tobytes())


def preview_routing(
    images: Sequence[QueuedImage],
) -> tuple[tuple[int, ...], EnginePreviewFn | None]:
    """`RenderBatch.preview_counts` and `on_preview` for a batch of `images`.

    Only images whose job gave a callback get previews; a batch where none
    did gets all-zero counts and no callback, so the engine decodes nothing.
    """
    counts = tuple(q.pending.job.partial_images if q.pending.on_preview else 0 for q in images)
    if not any(counts):
        return counts, None

    def route(task: int, preview: int, image: Image) -> None:
        q = images[task]
        callback = q.pending.on_preview
        # Read without the Batcher's lock, which a slow callback must not hold
        # up: `finished` only ever turns True, so a race costs one late preview.
        if callback is None or q.pending.finished:
            return
        try:
            callback(q.index, preview, rendered_image(q.task.seed, image))
        except Exception:
            # One job's broken stream must not fail the images of the batch.
            logger.exception("preview callback of request %s failed", q.pending.job.request_id)

    return counts, route


def step_routing(pendings: Sequence[PendingRender]) -> Callable[[int], None] | None:
    """`RenderBatch.on_step` for a batch of these jobs: each job that asked hears of every step."""
    listeners = [p for p in pendings if p.on_step is not None]
    if not listeners:
        return None

    def route(step: int) -> None:
        for pending in listeners:
            if pending.on_step is not None and not pending.finished:
                try:
                    pending.on_step(step)
                except Exception:
                    logger.exception("step callback of request %s failed", pending.job.request_id)

    return route
