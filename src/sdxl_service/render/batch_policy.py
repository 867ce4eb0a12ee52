"""How a batch is formed: which queued images render together, and when.

A pure function of the queue and of what the Batcher saw recently, so the
policy can change (and be tested) apart from the Batcher's threads and
bookkeeping.

Why "recent demand": closed-loop clients (each sends its next request when
the last one is answered) split into groups that never meet if the GPU starts
on whatever is queued the moment it frees up. With 8 clients, half of them
render while the other half queues; when the first half is answered, the
second starts at once and the first comes back while it runs, and so on. A
batch that waits a little for the clients just answered, but only when recent
traffic says they exist, merges the halves; a lone client never waits.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from ..contract.render_request import RenderParams


@dataclass(frozen=True)
class BatchKey:
    """What the images of one pipeline call share."""

    params: RenderParams
    # The 75-token chunks of an image's conditioning (its prompt's or its negative's,
    # the longer): padding a shorter prompt with empty chunks would change its image,
    # so images of different counts never share a call (engine/prompts.py counts them).
    chunks: int = 1


class Queued(Protocol):
    @property
    def batch_key(self) -> BatchKey: ...

    @property
    def enqueued_at(self) -> float: ...  # time.monotonic()


Item = TypeVar("Item", bound=Queued)


@dataclass(frozen=True, kw_only=True)
class Demand:
    """What the Batcher saw when its last pipeline call ended."""

    # The key of that call: the clients it answered come back with it, and
    # what it says of them says nothing of other keys' traffic.
    key: BatchKey | None = None
    # Images of that call plus those of its key queued when it ended: how
    # many images were active, so how many its closed-loop clients may bring
    # back. A Batcher that has rendered nothing yet knows of one.
    images: int = 1
    # time.monotonic() when the GPU went idle; the company-wait starts here at
    # the earliest, so images that queued behind a busy GPU are not held back
    # for the whole wait again.
    idle_since: float = float("-inf")


def demand_after_call(rendered: Sequence[Queued], queue: Iterable[Queued], now: float) -> Demand:
    """The demand a pipeline call of `rendered` leaves, `queue` waiting at its end."""
    key = rendered[0].batch_key
    queued = sum(1 for item in queue if item.batch_key == key)
    return Demand(key=key, images=len(rendered) + queued, idle_since=now)


def next_batch(
    queue: Sequence[Item], *, max_images: int, wait_s: float, now: float, demand: Demand
) -> tuple[list[Item], float]:
    """The images to render next, or none and how long to wait for company.

    FIFO: the oldest queued image decides the key (params and chunk count),
    then same-key images join in queue order, up to `max_images`. The batch
    goes at once when it holds min(max_images, demand.images) images: a full
    batch, or every image recent traffic of this key says is coming (so a
    lone client, demand 1, never waits, nor does a key not rendered last).
    Otherwise it waits for company as long as it comes: until `wait_s` after
    the later of the GPU going idle and the newest image's arrival, since
    answered clients come back one after another, as the HTTP service answers
    them; as the batch goes once demand is met, that is at most
    min(max_images, demand) - 1 gaps of `wait_s`. It never waits while
    other-key work is queued: with a backlog the GPU should not idle, and
    that work would wait too.
    """
    if not queue:
        raise ValueError("next_batch needs a queued image")
    head = queue[0]
    selected = [item for item in queue if item.batch_key == head.batch_key][:max_images]
    expected = min(max_images, demand.images) if head.batch_key == demand.key else 1
    if len(selected) >= expected or len(selected) < len(queue):
        return selected, 0.0
    left = max(demand.idle_since, max(item.enqueued_at for item in selected)) + wait_s - now
    return (selected, 0.0) if left <= 0 else ([], left)


def after_out_of_memory(batch: Sequence[Item]) -> list[list[Item]]:
    """The batches to try instead of one that ran out of GPU memory: its two halves, in
    order (each may halve again); none for a single image, which fails."""
    if len(batch) < 2:
        return []
    half = len(batch) // 2
    return [list(batch[:half]), list(batch[half:])]
