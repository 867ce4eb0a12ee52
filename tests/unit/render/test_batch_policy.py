"""How a batch is formed, as a pure function of the queue and the recent demand."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest

from sdxl_service.contract.render_request import RenderParams
from sdxl_service.render.batch_policy import (
    BatchKey,
    Demand,
    after_out_of_memory,
    demand_after_call,
    next_batch,
)
from tests.jobs import make_params


def params(width: int = 64) -> RenderParams:
    return make_params(width=width)


@dataclass(frozen=True)
class Item:
    name: str
    params: RenderParams
    enqueued_at: float = 0.0
    chunks: int = 1

    @property
    def batch_key(self) -> BatchKey:
        return BatchKey(self.params, self.chunks)


def key(width: int = 64) -> BatchKey:
    return BatchKey(params(width))


def same(n: int, at: float = 10.0) -> list[Item]:
    return [Item(str(i), params(), enqueued_at=at) for i in range(n)]


def names(batch: list[Item]) -> list[str]:
    return [item.name for item in batch]


LONE = Demand()  # what a new Batcher knows: one image


def test_the_oldest_image_decides_and_compatible_ones_join_in_order() -> None:
    queue = [Item("a", params()), Item("b", params(128)), Item("c", params())]
    batch, wait = next_batch(
        queue, max_images=8, wait_s=1.0, now=0.0, demand=Demand(key=key(), images=8)
    )
    assert names(batch) == ["a", "c"] and wait == 0.0


def test_a_full_batch_goes_at_once() -> None:
    batch, _ = next_batch(
        same(5), max_images=4, wait_s=1.0, now=10.0, demand=Demand(key=key(), images=9)
    )
    assert names(batch) == ["0", "1", "2", "3"]


def test_a_lone_client_never_waits() -> None:
    batch, wait = next_batch(same(1), max_images=8, wait_s=1.0, now=10.0, demand=LONE)
    assert names(batch) == ["0"] and wait == 0.0


def test_the_batch_goes_when_it_holds_every_image_recent_demand_expects() -> None:
    demand = Demand(key=key(), images=3, idle_since=10.0)
    batch, wait = next_batch(same(3), max_images=8, wait_s=1.0, now=10.0, demand=demand)
    assert names(batch) == ["0", "1", "2"] and wait == 0.0


def test_it_waits_for_the_clients_just_answered_counted_from_when_the_gpu_went_idle() -> None:
    # Four images queued behind the busy GPU since 10.0; it went idle at 12.0
    # after a call that leaves a demand of eight.
    demand = Demand(key=key(), images=8, idle_since=12.0)
    batch, wait = next_batch(same(4, at=10.0), max_images=8, wait_s=0.5, now=12.2, demand=demand)
    assert batch == [] and wait == pytest.approx(0.3)
    batch, wait = next_batch(same(4, at=10.0), max_images=8, wait_s=0.5, now=12.5, demand=demand)
    assert names(batch) == ["0", "1", "2", "3"] and wait == 0.0


def test_an_image_that_arrives_at_an_idle_gpu_waits_from_its_arrival() -> None:
    demand = Demand(key=key(), images=8, idle_since=5.0)
    batch, wait = next_batch(same(1, at=10.0), max_images=8, wait_s=0.5, now=10.1, demand=demand)
    assert batch == [] and wait == pytest.approx(0.4)


def test_every_arrival_of_company_extends_the_wait() -> None:
    demand = Demand(key=key(), images=4, idle_since=10.0)
    queue = [*same(1, at=10.2), *same(1, at=10.6)]
    batch, wait = next_batch(queue, max_images=8, wait_s=0.5, now=10.9, demand=demand)
    assert batch == [] and wait == pytest.approx(0.2)
    batch, _ = next_batch(queue, max_images=8, wait_s=0.5, now=11.1, demand=demand)
    assert len(batch) == 2


def test_demand_beyond_the_batch_size_waits_only_for_a_full_batch() -> None:
    demand = Demand(key=key(), images=20, idle_since=10.0)
    batch, wait = next_batch(same(3), max_images=4, wait_s=0.5, now=10.0, demand=demand)
    assert batch == [] and wait == pytest.approx(0.5)
    batch, _ = next_batch(same(4), max_images=4, wait_s=0.5, now=10.0, demand=demand)
    assert len(batch) == 4


def test_no_waiting_while_other_work_is_queued() -> None:
    queue = [Item("a", params(), enqueued_at=10.0), Item("b", params(128), enqueued_at=10.0)]
    batch, _ = next_batch(
        queue, max_images=4, wait_s=5.0, now=10.0, demand=Demand(key=key(), images=8)
    )
    assert names(batch) == ["a"]


def test_a_zero_wait_never_waits() -> None:
    demand = Demand(key=key(), images=8, idle_since=10.0)
    batch, wait = next_batch(same(1), max_images=8, wait_s=0.0, now=10.0, demand=demand)
    assert names(batch) == ["0"] and wait == 0.0


def test_demand_seen_for_other_params_does_not_hold_an_image_back() -> None:
    demand = Demand(key=key(128), images=8, idle_since=10.0)
    batch, wait = next_batch(same(1), max_images=8, wait_s=0.5, now=10.0, demand=demand)
    assert names(batch) == ["0"] and wait == 0.0


@pytest.mark.parametrize(
    ("queued", "max_images", "demand", "other_params", "demand_of_these_params"),
    list(itertools.product(range(1, 6), range(1, 5), range(1, 7), (False, True), (True, False))),
)
def test_every_state_goes_at_once_or_waits_exactly_as_the_rule_says(
    queued: int, max_images: int, demand: int, other_params: bool, demand_of_these_params: bool
) -> None:
    queue = same(queued, at=10.0) + ([Item("x", params(128), 10.0)] if other_params else [])
    seen_key = key() if demand_of_these_params else key(256)
    seen = Demand(key=seen_key, images=demand, idle_since=11.0)
    batch, wait = next_batch(queue, max_images=max_images, wait_s=0.5, now=11.1, demand=seen)
    expected = min(max_images, demand) if demand_of_these_params else 1
    if other_params or queued >= expected:
        assert names(batch) == [str(i) for i in range(min(queued, max_images))] and wait == 0
    else:
        assert batch == [] and wait == pytest.approx(0.4)
    # Once the wait is over, everything goes.
    batch, wait = next_batch(queue, max_images=max_images, wait_s=0.5, now=11.5, demand=seen)
    assert len(batch) == min(queued, max_images) and wait == 0


def test_demand_after_a_call_counts_its_images_and_those_of_its_params_left_queued() -> None:
    queue = [*same(2), Item("x", params(128)), *same(1)]
    demand = demand_after_call(same(4), queue, now=7.0)
    assert demand == Demand(key=key(), images=7, idle_since=7.0)


def test_an_empty_queue_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        next_batch([], max_images=4, wait_s=0.0, now=0.0, demand=LONE)


def test_images_of_different_chunk_counts_never_share_a_call() -> None:
    """Same params, but a long prompt (2 chunks) between short ones: it waits its turn."""
    queue = [Item("a", params()), Item("long", params(), chunks=2), Item("b", params())]
    demand = Demand(key=key(), images=8)
    batch, _ = next_batch(queue, max_images=8, wait_s=1.0, now=0.0, demand=demand)
    assert names(batch) == ["a", "b"]
    batch, _ = next_batch(queue[1:2], max_images=8, wait_s=0.0, now=0.0, demand=LONE)
    assert names(batch) == ["long"]
    # Demand is per key: a 2-chunk call says nothing of the 1-chunk clients.
    assert demand_after_call(queue[1:2], [queue[0], queue[2]], now=1.0).images == 1


@pytest.mark.parametrize(("size", "halves"), [(1, []), (2, [1, 1]), (5, [2, 3]), (8, [4, 4])])
def test_a_batch_out_of_memory_is_tried_again_in_halves(size: int, halves: list[int]) -> None:
    batch = same(size)
    retries = after_out_of_memory(batch)
    assert [len(part) for part in retries] == halves
    assert [item for part in retries for item in part] == (batch if halves else [])
