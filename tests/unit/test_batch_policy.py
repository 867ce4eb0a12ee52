"""How a batch is formed, as a pure function of the queue."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from sdxl_service.batch_policy import next_batch
from sdxl_service.choices import RefinerMode, SchedulerName
from sdxl_service.jobs import RenderParams


def params(width: int = 64) -> RenderParams:
    return RenderParams(
        width=width,
        height=64,
        steps=4,
        guidance_scale=5.0,
        high_noise_frac=0.8,
        refiner=RefinerMode.ENSEMBLE,
        scheduler=SchedulerName.EULER,
    )


@dataclass(frozen=True)
class Item:
    name: str
    params: RenderParams
    enqueued_at: float = 0.0


def test_the_oldest_image_decides_and_compatible_ones_join_in_order() -> None:
    queue = [Item("a", params()), Item("b", params(128)), Item("c", params())]
    batch, wait = next_batch(queue, max_images=8, wait_s=0.0, now=0.0)
    assert [item.name for item in batch] == ["a", "c"] and wait == 0.0


def test_a_full_batch_goes_at_once() -> None:
    queue = [Item(str(i), params(), enqueued_at=10.0) for i in range(5)]
    batch, _ = next_batch(queue, max_images=4, wait_s=1.0, now=10.0)
    assert [item.name for item in batch] == ["0", "1", "2", "3"]


def test_a_lone_image_waits_for_company_until_its_wait_is_over() -> None:
    queue = [Item("a", params(), enqueued_at=10.0)]
    batch, wait = next_batch(queue, max_images=4, wait_s=0.5, now=10.2)
    assert batch == [] and wait == pytest.approx(0.3)
    batch, wait = next_batch(queue, max_images=4, wait_s=0.5, now=10.5)
    assert [item.name for item in batch] == ["a"] and wait == 0.0


def test_no_waiting_while_other_work_is_queued() -> None:
    queue = [Item("a", params(), enqueued_at=10.0), Item("b", params(128), enqueued_at=10.0)]
    batch, _ = next_batch(queue, max_images=4, wait_s=5.0, now=10.0)
    assert [item.name for item in batch] == ["a"]


def test_an_empty_queue_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        next_batch([], max_images=4, wait_s=0.0, now=0.0)
