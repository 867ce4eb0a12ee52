"""How a batch is formed: which queued images render together, and when.

A pure function of the queue, so the policy can change (and be tested) apart
from the Batcher's threads and bookkeeping.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

from .jobs import RenderParams


class Queued(Protocol):
    @property
    def params(self) -> RenderParams: ...

    @property
    def enqueued_at(self) -> float: ...  # time.monotonic()


Item = TypeVar("Item", bound=Queued)


def next_batch(
    queue: Sequence[Item], *, max_images: int, wait_s: float, now: float
) -> tuple[list[Item], float]:
    """The images to render next, or none and how long to wait for company.

    FIFO: the oldest queued image decides the params, then same-params images
    join in queue order, up to `max_images`. If the batch is not full it waits
    for company until the oldest image has waited `wait_s`, counted from its
    arrival, so work that already queued behind a busy GPU is not held back
    further. It does not wait while other-params work is queued: with a
    backlog the GPU should not idle, and that work would wait too.
    """
    if not queue:
        raise ValueError("next_batch needs a queued image")
    head = queue[0]
    selected = [item for item in queue if item.params == head.params][:max_images]
    if len(selected) >= max_images or len(selected) < len(queue):
        return selected, 0.0
    left = head.enqueued_at + wait_s - now
    return (selected, 0.0) if left <= 0 else ([], left)
