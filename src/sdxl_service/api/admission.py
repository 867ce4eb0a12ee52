"""Whether a request's images fit in the queue, and when to come back if not.

The queue holds at most `SDXL_MAX_QUEUE_IMAGES` images waiting or rendering;
past it a request gets 429 with a Retry-After estimated from how long recent
pipeline calls took per image.
"""

from __future__ import annotations

import math

from ..contract.render_request import GenerationOutcome, OutcomeStatus

# Weight of the latest pipeline call in the seconds-per-image estimate behind
# Retry-After: recent enough to follow a change of sizes, smooth enough to
# ignore one odd call.
EWMA_WEIGHT = 0.3


class QueueCapacity:
    def __init__(self, max_images: int) -> None:
        if max_images < 1:
            raise ValueError("max_images must be at least 1")
        self.max_images = max_images
        self.seconds_per_image: float | None = None

    def refusal(self, backlog: int, n: int) -> GenerationOutcome | None:
        """QUEUE_FULL when `n` more images do not fit beside `backlog`; None when they do."""
        if backlog + n <= self.max_images:
            return None
        if n > self.max_images:
            message = (
                f"request for {n} images exceeds the queue capacity of "
                f"{self.max_images} images; ask for fewer images per request"
            )
        else:
            message = (
                f"server busy: {backlog} images queued or rendering "
                f"(limit {self.max_images}); retry later"
            )
        # Time until enough images finished for this request to fit.
        excess = min(backlog, backlog + n - self.max_images)
        retry_after = max(1, math.ceil(excess * (self.seconds_per_image or 1.0)))
        return GenerationOutcome(
            status=OutcomeStatus.QUEUE_FULL, message=message, retry_after=float(retry_after)
        )

    def record_call(self, seconds: float, images: int) -> None:
        per_image, old = seconds / images, self.seconds_per_image
        self.seconds_per_image = per_image if old is None else old + EWMA_WEIGHT * (per_image - old)
