"""Batcher: grouping, fairness, backpressure, cancellation, deadlines, faults.

The render functions here run on the batcher's worker thread. Tests that need
a definite queue state hold the worker inside a "gate" render until the jobs
they need are queued, and wait for states (an event the render sets, a metric,
an outcome), so no test depends on how fast a thread wakes up. Every Batcher
comes from the `make_batcher` fixture, which stops it even when the test fails.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client import CollectorRegistry

from sdxl_service.contract.render_request import (
    ControlNetParams,
    GenerationOutcome,
    IpAdapterWeight,
    OutcomeStatus,
    RenderedImage,
    RenderRequest,
    RgbPicture,
)
from sdxl_service.engine import Engine
from sdxl_service.engine.render_batch import (
    InvalidControlNet,
    InvalidEmbedding,
    InvalidIpAdapter,
    InvalidLora,
    OutOfMemory,
    RenderBatch,
    RenderCancelled,
)
from sdxl_service.metrics import ServiceMetrics
from sdxl_service.render.batcher import REFUSALS, Batcher
from tests import polling
from tests.jobs import make_job

# Generous: only reached when a behaviour is broken, never in a passing run.
WAIT_S = 10.0
GUARD_S = 30.0

pytestmark = pytest.mark.timeout(60)

RenderFn = Callable[[RenderBatch], list[Image.Image]]


asyncio_test = polling.asyncio_test(GUARD_S)


def seed_image(seed: int, size: int) -> Image.Image:
    return Image.new("RGB", (size, size), (seed % 256, seed // 256 % 256, 7))


class FakeRender:
    """Records every call; images encode their seed so order can be checked.

    A task whose prompt is in `gates` blocks the call until that event is set
    (polling should_stop like diffusers' step callback); `fail(batch)` may
    return an exception to raise instead of rendering.
    """

    def __init__(self, fail: Callable[[RenderBatch], Exception | None] | None = None) -> None:
        self.calls: list[list[tuple[str, int]]] = []
        self.batches: list[RenderBatch] = []
        self.gates: dict[str, threading.Event] = {}
        self.started: dict[str, threading.Event] = {}
        self.stopped_by_callback: list[str] = []
        self.fail = fail
        self.lock = threading.Lock()

    def gate(self, prompt: str) -> threading.Event:
        self.started[prompt] = threading.Event()
        self.gates[prompt] = threading.Event()
        return self.gates[prompt]

    def __call__(self, batch: RenderBatch) -> list[Image.Image]:
        with self.lock:
            self.calls.append([(t.prompt, t.seed) for t in batch.tasks])
            self.batches.append(batch)
        if self.fail is not None and (exc := self.fail(batch)) is not None:
            raise exc
        for prompt in {t.prompt for t in batch.tasks}:
            if prompt in self.gates:
                self.started[prompt].set()
                deadline = time.monotonic() + WAIT_S
                while not self.gates[prompt].is_set() and time.monotonic() < deadline:
                    if batch.should_stop():
                        self.stopped_by_callback.append(prompt)
                        raise RenderCancelled()
                    time.sleep(0.002)
        return [seed_image(t.seed, batch.params.width) for t in batch.tasks]

    def seeds_seen(self, prompt: str) -> list[int]:
        return [seed for call in self.calls for p, seed in call if p == prompt]

    def prompts_per_call(self) -> list[list[str]]:
        return [sorted({p for p, _ in call}) for call in self.calls]


class FakeClock:
    """Unix time that moves only when a test says so (deadlines without waiting)."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def render() -> FakeRender:
    return FakeRender()


@pytest.fixture
def make_batcher(registry: CollectorRegistry) -> Iterator[Callable[..., Batcher]]:
    """`make_batcher(render, **options)`; every Batcher made is stopped after
    the test, passed or failed, so no worker thread outlives it."""
    made: list[Batcher] = []

    def make(render: RenderFn, **options: Any) -> Batcher:
        settings: dict[str, Any] = dict(max_batch_images=8, batch_wait_ms=0)
        settings.update(options)
        batcher = Batcher(render, metrics=ServiceMetrics(registry), **settings)
        made.append(batcher)
        return batcher

    yield make
    for batcher in made:
        # The test's event loop is closed by now: outcomes still sent have
        # nobody to await them, and stop() tolerates that. A gate render
        # sees should_stop and ends, so the worker thread ends too.
        asyncio.run(batcher.stop())


def gauge(
    registry: CollectorRegistry, name: str, labels: dict[str, str] | None = None
) -> float | None:
    """The sum over the samples with these labels, whatever other labels they
    carry (the render worker's); None when there are none."""
    values = [
        sample.value
        for family in registry.collect()
        for sample in family.samples
        if sample.name == name and (labels or {}).items() <= sample.labels.items()
    ]
    return sum(values) if values else None


async def queued(registry: CollectorRegistry, images: int) -> None:
    """Waits until `images` images are queued (submitted, not yet rendering)."""
    await polling.until(
        lambda: gauge(registry, "sdxl_queue_images") == images, f"{images} queued images", WAIT_S
    )


async def wait_event(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, WAIT_S), "render never started"


async def hold_worker(
    render: FakeRender, batcher: Batcher, n: int = 1, size: int = 16
) -> tuple[threading.Event, asyncio.Task[GenerationOutcome]]:
    """Keeps the worker busy in a render of its own until the event is set
    (of other params than make_job's unless `size` says otherwise)."""
    release = render.gate("gate")
    task = asyncio.create_task(batcher.submit(make_job("gate", n, width=size, seed=90_000)))
    await wait_event(render.started["gate"])
    return release, task


def assert_ok(outcome: GenerationOutcome, seeds: list[int], size: int = 8) -> None:
    assert outcome.status is OutcomeStatus.OK, outcome.message
    assert [im.seed for im in outcome.images] == seeds
    for im in outcome.images:
        assert (im.width, im.height) == (size, size)
        assert im.rgb == seed_image(im.seed, size).tobytes()


MakeBatcher = Callable[..., Batcher]


# --- grouping ---------------------------------------------------------------


@asyncio_test
async def test_compatible_jobs_share_one_render_call(
    render: FakeRender, make_batcher: MakeBatcher, registry: CollectorRegistry
) -> None:
    batcher = make_batcher(render)
    release, gate = await hold_worker(render, batcher)
    a = asyncio.create_task(batcher.submit(make_job("a", 2, seed=10)))
    b = asyncio.create_task(batcher.submit(make_job("b", 3, seed=20)))
    await queued(registry, 5)
    release.set()
    assert_ok(await a, [10, 11])
    assert_ok(await b, [20, 21, 22])
    await gate
    assert render.calls[1:] == [[("a", 10), ("a", 11), ("b", 20), ("b", 21), ("b", 22)]]


@asyncio_test
async def test_batch_wait_gathers_a_job_that_arrives_later(
    render: FakeRender, make_batcher: MakeBatcher, registry: CollectorRegistry
) -> None:
    # The batch fills at 2 images, so the long wait is never spent in full
    # (the gate brings 2 of its own).
    batcher = make_batcher(render, max_batch_images=2, batch_wait_ms=WAIT_S * 1000)
    release, gate = await hold_worker(render, batcher, n=2, size=8)
    a = asyncio.create_task(batcher.submit(make_job("a", seed=1)))
    await queued(registry, 1)
    release.set()
    # The gate's answer comes from the worker, which then turns to a, alone.
    await gate
    b = asyncio.create_task(batcher.submit(make_job("b", seed=2)))
    assert_ok(await a, [1])
    assert_ok(await b, [2])
    assert render.prompts_per_call()[1:] == [["a", "b"]]


@asyncio_test
async def test_incompatible_jobs_render_separately_without_waiting(
    render: FakeRender, make_batcher: MakeBatcher, registry: CollectorRegistry
) -> None:
    # Other-params work in the queue means no waiting for company: with a
    # 100 s batch wait, the test would run into its guard otherwise.
    # The gate and c fill their batches, so they never wait either.
    batcher = make_batcher(render, batch_wait_ms=100_000, max_batch_images=4)
    release, gate = await hold_worker(render, batcher, n=4)
    a = asyncio.create_task(batcher.submit(make_job("a", seed=1, width=8)))
    b = asyncio.create_task(batcher.submit(make_job("b", seed=2, width=16)))
    c = asyncio.create_task(batcher.submit(make_job("c", 4, seed=3, width=8, steps=3)))
    await queued(registry, 6)
    release.set()
    assert_ok(await a, [1])
    assert_ok(await b, [2], size=16)
    assert_ok(await c, [3, 4, 5, 6])
    await gate
    assert render.prompts_per_call()[1:] == [["a"], ["b"], ["c"]]


# An hour: a test that waits it out is broken, and runs into its guard.
HOUR_MS = 3_600_000


@asyncio_test
async def test_a_lone_client_never_waits_for_company(
    render: FakeRender, make_batcher: MakeBatcher
) -> None:
    batcher = make_batcher(render, batch_wait_ms=HOUR_MS)
    for i in range(3):  # one request after another, as one closed-loop client sends them
        assert_ok(await asyncio.wait_for(batcher.submit(make_job(f"a{i}", seed=i)), WAIT_S), [i])
    assert render.prompts_per_call() == [["a0"], ["a1"], ["a2"]]


@asyncio_test
async def test_the_next_batch_waits_for_the_clients_the_last_call_answered(
    render: FakeRender, make_batcher: MakeBatcher, registry: CollectorRegistry
) -> None:
    # The gate's 3 images and a, queued behind them with the same params,
    # make a demand of 4: a waits for 3 more, and goes once they are queued.
    batcher = make_batcher(render, batch_wait_ms=HOUR_MS)
    release, gate = await hold_worker(render, batcher, n=3, size=8)
    a = asyncio.create_task(batcher.submit(make_job("a", seed=1)))
    await queued(registry, 1)
    release.set()
    await gate
    b = asyncio.create_task(batcher.submit(make_job("b", seed=2)))
    await queued(registry, 2)
    assert len(render.calls) == 1  # still waiting for company
    c = asyncio.create_task(batcher.submit(make_job("c", 2, seed=3)))
    assert_ok(await a, [1])
    assert_ok(await b, [2])
    assert_ok(await c, [3, 4])
    assert render.prompts_per_call()[1:] == [["a", "b", "c"]]


@asyncio_test
async def test_the_wait_for_company_ends_after_batch_wait_ms(
    render: FakeRender, make_batcher: MakeBatcher, registry: CollectorRegistry
) -> None:
    batcher = make_batcher(render, batch_wait_ms=50)
    release, gate = await hold_worker(render, batcher, n=3, size=8)
    a = asyncio.create_task(batcher.submit(make_job("a", seed=1)))
    await queued(registry, 1)
    release.set()
    assert_ok(await a, [1])  # alone, once the wait is over
    await gate
    assert render.prompts_per_call()[1:] == [["a"]]


@asyncio_test
async def test_demand_of_other_params_does_not_hold_an_image_back(
    render: FakeRender, make_batcher: MakeBatcher, registry: CollectorRegistry
) -> None:
    # The gate (16x16) leaves a demand of 3 for its own params, none for a's.
    batcher = make_batcher(render, batch_wait_ms=HOUR_MS)
    release, gate = await hold_worker(render, batcher, n=3)
    a = asyncio.create_task(batcher.submit(make_job("a", seed=1)))
    await queued(registry, 1)
    release.set()
    assert_ok(await a, [1])
    await gate
    assert render.prompts_per_call()[1:] == [["a"]]


@asyncio_test
async def test_other_params_work_ends_the_wait_for_company(
    render: FakeRender, make_batcher: MakeBatcher, registry: CollectorRegistry
) -> None:
    batcher = make_batcher(render, batch_wait_ms=HOUR_MS)
    release, gate = await hold_worker(render, batcher, n=3, size=8)
    a = asyncio.create_task(batcher.submit(make_job("a", seed=1)))
    await queued(registry, 1)
    release.set()
    await gate
    b = asyncio.create_task(batcher.submit(make_job("b", seed=2, width=16)))
    assert_ok(await a, [1])
    assert_ok(await b, [2], size=16)
    assert render.prompts_per_call()[1:] == [["a"], ["b"]]


@asyncio_test
async def test_an_outcome_says_its_render_time_and_its_time_waiting(
    render: FakeRender, make_batcher: MakeBatcher, registry: CollectorRegistry
) -> None:
    batcher = make_batcher(render)
    release, gate = await hold_worker(render, batcher)
    a = asyncio.create_task(batcher.submit(make_job("a", 2, seed=10)))
    b = asyncio.create_task(batcher.submit(make_job("b", 1, seed=20)))
    await queued(registry, 3)
    queued_at = time.monotonic()  # both were submitted before this
    release.set()
    released_at = time.monotonic()
    first, second = await a, await b
    assert_ok(first, [10, 11])
    await gate
    # One pipeline call made both: the same render time, inside what elapsed.
    assert first.render_s == second.render_s
    assert first.render_s is not None and 0 < first.render_s < time.monotonic() - released_at
    for outcome in (first, second):
        assert outcome.waited_s is not None and outcome.waited_s >= released_at - queued_at


@asyncio_test
async def test_max_batch_images_splits_a_large_job_and_reassembles_seed_order(
    render: FakeRender, make_batcher: MakeBatcher, registry: CollectorRegistry
) -> None:
    batcher = make_batcher(render, max_batch_images=3)
    release, gate = await hold_worker(render, batcher)
    a = asyncio.create_task(batcher.submit(make_job("a", 2, seed=100)))
    b = asyncio.create_task(batcher.submit(make_job("b", 7, seed=200)))
    await queued(registry, 9)
    release.set()
    assert_ok(await a, [100, 101])
    assert_ok(await b, list(range(200, 207)))
    await gate
    sizes = [len(call) for call in render.calls[1:]]
    assert sizes == [3, 3, 3]
    assert render.calls[1] == [("a", 100), ("a", 101), ("b", 200)]


@asyncio_test
async def test_the_oldest_queued_image_decides_the_next_batch(
    render: FakeRender, make_batcher: MakeBatcher, registry: CollectorRegistry
) -> None:
    batcher = make_batcher(render)
    release, gate = await hold_worker(render, batcher)
    hold_a = render.gate("a")
    a = asyncio.create_task(batcher.submit(make_job("a", seed=1, width=8)))
    b = asyncio.create_task(batcher.submit(make_job("b", seed=2, width=16)))
    c = asyncio.create_task(batcher.submit(make_job("c", seed=3, width=8)))
    await queued(registry, 3)
    release.set()
    await wait_event(render.started["a"])
    # Arrives while a+c render; b is older, so b goes first even though
    # d could have joined a batch of its own params.
    d = asyncio.create_task(batcher.submit(make_job("d", seed=4, width=8)))
    await queued(registry, 2)
    hold_a.set()
    for task, seed, size in ((a, 1, 8), (b, 2, 16), (c, 3, 8), (d, 4, 8)):
        assert_ok(await task, [seed], size=size)
    await gate
    assert render.prompts_per_call()[1:] == [["a", "c"], ["b"], ["d"]]


# --- cancellation -------------------------------------------------------------


@asyncio_test
async def test_cancel_of_a_queued_job_drops_its_images(
    render: FakeRender, make_batcher: MakeBatcher, registry: CollectorRegistry
) -> None:
    batcher = make_batcher(render)
    release, gate = await hold_worker(render, batcher)
    a = asyncio.create_task(batcher.submit(make_job("a", 3, seed=10)))
    b = asyncio.create_task(batcher.submit(make_job("b", 1, seed=20)))
    await queued(registry, 4)

    assert batcher.cancel("a") is True
    assert gauge(registry, "sdxl_queue_images") == 1
    assert (await a).status is OutcomeStatus.CANCELLED
    assert batcher.cancel("a") is False
    release.set()
    assert_ok(await b, [20])
    await gate
    assert render.seeds_seen("a") == []


@asyncio_test
async def test_cancel_of_the_only_job_stops_the_running_batch_and_next_job_runs(
    render: FakeRender, make_batcher: MakeBatcher, registry: CollectorRegistry
) -> None:
    batcher = make_batcher(render)
    render.gate("long")  # never released: only should_stop ends it
    long = asyncio.create_task(batcher.submit(make_job("long", 2, width=16)))
    await wait_event(render.started["long"])
    nxt = asyncio.create_task(batcher.submit(make_job("next", seed=5)))
    await queued(registry, 1)

    assert batcher.cancel("long") is True

    assert (await long).status is OutcomeStatus.CANCELLED
    assert_ok(await nxt, [5])
    assert render.stopped_by_callback == ["long"]
    assert render.batches[0].should_stop() is True


@asyncio_test
async def test_cancel_of_one_job_keeps_a_batch_running_for_the_other(
    render: FakeRender, make_batcher: MakeBatcher, registry: CollectorRegistry
) -> None:
    batcher = make_batcher(render)
    release, gate = await hold_worker(render, batcher)
    hold = render.gate("a")
    a = asyncio.create_task(batcher.submit(make_job("a", seed=1)))
    b = asyncio.create_task(batcher.submit(make_job("b", seed=2)))
    await queued(registry, 2)
    release.set()
    await wait_event(render.started["a"])
    batch = render.batches[1]
    assert [t.prompt for t in batch.tasks] == ["a", "b"]

    assert batcher.cancel("a") is True
    assert (await a).status is OutcomeStatus.CANCELLED
    assert batch.should_stop() is False
    hold.set()

    assert_ok(await b, [2])
    assert render.stopped_by_callback == []
    await gate


@asyncio_test
async def test_cancelling_the_submit_task_cancels_the_job(
    render: FakeRender, make_batcher: MakeBatcher, registry: CollectorRegistry
) -> None:
    batcher = make_batcher(render)
    render.gate("long")
    task = asyncio.create_task(batcher.submit(make_job("long", width=16)))
    await wait_event(render.started["long"])

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert_ok(await batcher.submit(make_job("next", seed=9)), [9])
    assert render.stopped_by_callback == ["long"]
    assert gauge(registry, "sdxl_queue_images") == 0
    assert gauge(registry, "sdxl_requests_in_flight") == 0


# --- deadlines (the Batcher is the one component that acts on them) ----------


@asyncio_test
async def test_deadline_passing_while_rendering_times_out_and_stops_the_batch(
    render: FakeRender, make_batcher: MakeBatcher
) -> None:
    clock = FakeClock()
    batcher = make_batcher(render, clock=clock)
    render.gate("slow")  # never released
    slow = asyncio.create_task(batcher.submit(make_job("slow", width=16, deadline=clock.now + 100)))
    await wait_event(render.started["slow"])

    clock.now += 101

    assert (await slow).status is OutcomeStatus.TIMEOUT
    assert_ok(await batcher.submit(make_job("next", seed=3)), [3])
    assert render.stopped_by_callback == ["slow"]


@asyncio_test
async def test_the_caller_gets_timeout_at_the_deadline_even_while_a_render_step_runs(
    make_batcher: MakeBatcher,
) -> None:
    # A step that cannot poll should_stop (a long VAE decode, say) must not
    # hold the answer back: the caller's wait ends at the deadline itself.
    step_started, step_may_end = threading.Event(), threading.Event()

    def one_long_step(batch: RenderBatch) -> list[Image.Image]:
        step_started.set()
        step_may_end.wait(WAIT_S)
        return [seed_image(t.seed, batch.params.width) for t in batch.tasks]

    batcher = make_batcher(one_long_step)
    outcome = await batcher.submit(make_job("slow", deadline=time.time() + 0.2))
    assert step_started.is_set()
    step_may_end.set()

    assert outcome.status is OutcomeStatus.TIMEOUT
    assert_ok(await batcher.submit(make_job("next", seed=3)), [3])


@asyncio_test
async def test_deadline_passing_while_queued_times_out_without_rendering(
    render: FakeRender, make_batcher: MakeBatcher, registry: CollectorRegistry
) -> None:
    batcher = make_batcher(render)
    release, gate = await hold_worker(render, batcher)
    outcome = await batcher.submit(make_job("late", seed=4, deadline=time.time() + 0.1))
    assert outcome.status is OutcomeStatus.TIMEOUT
    assert gauge(registry, "sdxl_queue_images") == 0
    expired = await batcher.submit(make_job("expired", seed=5, deadline=time.time() - 1))
    assert expired.status is OutcomeStatus.TIMEOUT
    release.set()
    await gate
    assert render.seeds_seen("late") == render.seeds_seen("expired") == []


@asyncio_test
async def test_queued_images_past_the_deadline_are_dropped_before_the_next_batch(
    render: FakeRender, make_batcher: MakeBatcher, registry: CollectorRegistry
) -> None:
    clock = FakeClock()
    batcher = make_batcher(render, clock=clock)
    release, gate = await hold_worker(render, batcher)
    late = asyncio.create_task(batcher.submit(make_job("late", deadline=clock.now + 100)))
    on_time = asyncio.create_task(batcher.submit(make_job("on_time", seed=7)))
    await queued(registry, 2)

    clock.now += 101
    release.set()

    assert (await late).status is OutcomeStatus.TIMEOUT
    assert_ok(await on_time, [7])
    await gate
    assert render.seeds_seen("late") == []
    reason = {"reason": "timeout"}
    assert gauge(registry, "sdxl_rejected_total", reason) == 1


# --- faults -------------------------------------------------------------------


@asyncio_test
async def test_out_of_memory_splits_the_batch_and_every_job_succeeds(
    make_batcher: MakeBatcher, registry: CollectorRegistry
) -> None:
    def oom_above_two(batch: RenderBatch) -> Exception | None:
        return OutOfMemory() if len(batch.tasks) > 2 and batch.tasks[0].prompt != "gate" else None

    render = FakeRender(fail=oom_above_two)
    batcher = make_batcher(render)
    release, gate = await hold_worker(render, batcher)
    a = asyncio.create_task(batcher.submit(make_job("a", 3, seed=10)))
    b = asyncio.create_task(batcher.submit(make_job("b", 2, seed=20)))
    await queued(registry, 5)
    release.set()
    assert_ok(await a, [10, 11, 12])
    assert_ok(await b, [20, 21])
    await gate
    assert [len(call) for call in render.calls[1:]] == [5, 2, 3, 1, 2]


@asyncio_test
async def test_out_of_memory_on_one_image_fails_its_job_and_service_stays_up(
    make_batcher: MakeBatcher, registry: CollectorRegistry
) -> None:
    def oom_when_large(batch: RenderBatch) -> Exception | None:
        return OutOfMemory() if batch.params.width >= 64 else None

    render = FakeRender(fail=oom_when_large)
    batcher = make_batcher(render)
    outcome = await batcher.submit(make_job("huge", 2, width=64))
    assert outcome.status is OutcomeStatus.OUT_OF_MEMORY
    assert "smaller size or n" in outcome.message
    assert_ok(await batcher.submit(make_job("small", seed=1)), [1])
    # 2 images -> 1 + 1; the job failed on the first, the second is skipped.
    assert [len(call) for call in render.calls] == [2, 1, 1]
    reason = {"reason": "out_of_memory"}
    assert gauge(registry, "sdxl_rejected_total", reason) == 1


@asyncio_test
async def test_unexpected_exception_is_an_error_and_the_batcher_keeps_serving(
    make_batcher: MakeBatcher, caplog: pytest.LogCaptureFixture
) -> None:
    def explode(batch: RenderBatch) -> Exception | None:
        return ValueError("boom") if batch.tasks[0].prompt == "bad" else None

    batcher = make_batcher(FakeRender(fail=explode))
    with caplog.at_level(logging.ERROR, logger="sdxl_service.render.batcher"):
        outcome = await batcher.submit(make_job("bad"))
    assert outcome.status is OutcomeStatus.ERROR
    assert "boom" in outcome.message
    assert "Traceback" not in outcome.message
    assert any(r.exc_info and "boom" in str(r.exc_info[1]) for r in caplog.records)
    assert_ok(await batcher.submit(make_job("good", seed=3)), [3])


@asyncio_test
async def test_stop_answers_pending_jobs_and_does_not_hang(
    render: FakeRender, make_batcher: MakeBatcher, registry: CollectorRegistry
) -> None:
    batcher = make_batcher(render)
    render.gate("long")  # never released
    long = asyncio.create_task(batcher.submit(make_job("long", width=16)))
    await wait_event(render.started["long"])
    waiting = asyncio.create_task(batcher.submit(make_job("queued")))
    await queued(registry, 1)

    await batcher.stop()

    assert (await long).status is OutcomeStatus.ERROR
    assert (await waiting).status is OutcomeStatus.ERROR
    after = await batcher.submit(make_job("after"))
    assert after.status is OutcomeStatus.ERROR
    assert "shutting down" in after.message


# --- metrics ------------------------------------------------------------------


@asyncio_test
async def test_metrics_record_batches_images_and_queue_wait(
    render: FakeRender, make_batcher: MakeBatcher, registry: CollectorRegistry
) -> None:
    batcher = make_batcher(render)
    release, gate = await hold_worker(render, batcher)
    a = asyncio.create_task(batcher.submit(make_job("a", 3)))
    await queued(registry, 3)
    assert gauge(registry, "sdxl_requests_in_flight") == 2
    release.set()
    await a
    await gate
    await batcher.stop()

    value = functools.partial(gauge, registry)
    assert value("sdxl_images_generated_total") == 4
    assert value("sdxl_batch_images_count") == 2
    assert value("sdxl_batch_images_sum") == 4
    assert value("sdxl_stage_seconds_count", {"stage": "queue_wait"}) == 4
    assert value("sdxl_queue_images") == 0
    assert value("sdxl_requests_in_flight") == 0


# --- live previews ----------------------------------------------------------------


def preview_image(seed: int, preview: int, size: int) -> Image.Image:
    # RGBA, as a decoder might give: the Batcher hands previews on as RGB.
    return Image.new("RGBA", (size, size), (seed % 256, preview, 9, 255))


class PreviewRender(FakeRender):
    """Sends every task's previews, preview by preview across the batch as the
    engine does, then renders; `between()` runs after the first round."""

    def __init__(self, between: Callable[[], object] | None = None) -> None:
        super().__init__()
        self.between = between

    def __call__(self, batch: RenderBatch) -> list[Image.Image]:
        counts = batch.preview_counts
        if batch.on_preview is not None:
            for preview in range(max(counts)):
                for task, n in enumerate(counts):
                    if preview < n:
                        seed = batch.tasks[task].seed
                        image = preview_image(seed, preview, batch.params.width)
                        batch.on_preview(task, preview, image)
                if preview == 0 and self.between is not None:
                    self.between()
        return super().__call__(batch)


Seen = list[tuple[int, int, RenderedImage]]


def recorder(seen: Seen) -> Callable[[int, int, RenderedImage], None]:
    return lambda index, preview, image: seen.append((index, preview, image))


@asyncio_test
async def test_previews_reach_the_job_that_asked_for_them_and_no_other(
    make_batcher: MakeBatcher, registry: CollectorRegistry
) -> None:
    render = PreviewRender()
    batcher = make_batcher(render)
    release, gate = await hold_worker(render, batcher)
    seen: Seen = []
    job_a = make_job("a", 2, seed=10, partial_images=2)
    a = asyncio.create_task(batcher.submit(job_a, on_preview=recorder(seen)))
    # Previews asked for, but nobody to hand them to: none are made.
    b = asyncio.create_task(batcher.submit(make_job("b", 1, seed=20, partial_images=3)))
    await queued(registry, 3)
    release.set()
    assert_ok(await a, [10, 11])
    assert_ok(await b, [20])
    await gate
    assert render.calls[1] == [("a", 10), ("a", 11), ("b", 20)]
    assert render.batches[1].preview_counts == (2, 2, 0)
    assert sorted((i, preview) for i, preview, _ in seen) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for index, preview, image in seen:
        assert (image.seed, image.width, image.height) == (10 + index, 8, 8)
        assert image.rgb == preview_image(10 + index, preview, 8).convert("RGB").tobytes()


@asyncio_test
async def test_a_batch_without_previews_asks_the_engine_for_none(
    render: FakeRender, make_batcher: MakeBatcher
) -> None:
    batcher = make_batcher(render)
    assert_ok(await batcher.submit(make_job("a", 2, seed=1)), [1, 2])
    # A callback, but no previews asked for.
    job = make_job("b", seed=5)
    assert_ok(await batcher.submit(job, on_preview=lambda *_: None), [5])
    assert [batch.preview_counts for batch in render.batches] == [(0, 0), (0,)]
    assert [batch.on_preview for batch in render.batches] == [None, None]


@asyncio_test
async def test_a_failing_preview_callback_does_not_fail_the_batch(
    make_batcher: MakeBatcher, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(index: int, preview: int, image: RenderedImage) -> None:
        raise RuntimeError("stream closed")

    batcher = make_batcher(PreviewRender())
    with caplog.at_level(logging.ERROR, logger="sdxl_service"):
        outcome = await batcher.submit(make_job("a", 2, partial_images=2), on_preview=broken)
    assert_ok(outcome, [0, 1])
    failures = [r for r in caplog.records if "preview callback of request a" in r.getMessage()]
    assert len(failures) == 4 and all(r.exc_info for r in failures)


@asyncio_test
async def test_a_finished_job_gets_no_more_previews(
    make_batcher: MakeBatcher, registry: CollectorRegistry
) -> None:
    # a is cancelled after the first round of previews; b keeps the batch going.
    render = PreviewRender(between=lambda: batcher.cancel("a"))
    batcher = make_batcher(render)
    release, gate = await hold_worker(render, batcher)
    seen_a: Seen = []
    seen_b: Seen = []
    job_a, job_b = make_job("a", seed=1, partial_images=3), make_job("b", seed=2, partial_images=2)
    a = asyncio.create_task(batcher.submit(job_a, on_preview=recorder(seen_a)))
    b = asyncio.create_task(batcher.submit(job_b, on_preview=recorder(seen_b)))
    await queued(registry, 2)
    release.set()
    assert (await a).status is OutcomeStatus.CANCELLED
    assert_ok(await b, [2])
    await gate
    assert [preview for _, preview, _ in seen_a] == [0]
    assert [preview for _, preview, _ in seen_b] == [0, 1]


@asyncio_test
async def test_previews_from_the_real_tiny_engine(
    make_batcher: MakeBatcher, tiny_engine: Engine
) -> None:
    batcher = make_batcher(tiny_engine.render)
    seen: Seen = []
    job = make_job("a", 2, seed=3, width=64, steps=4, partial_images=2)
    outcome = await batcher.submit(job, on_preview=recorder(seen))
    assert outcome.status is OutcomeStatus.OK
    assert [(im.seed, im.width, im.height) for im in outcome.images] == [(3, 64, 64), (4, 64, 64)]
    assert sorted((i, preview) for i, preview, _ in seen) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for index, _, image in seen:
        assert (image.seed, image.width, image.height) == (3 + index, 64, 64)
        assert len(image.rgb) == 64 * 64 * 3


# --- a real render function -----------------------------------------------------


def noise_render(batch: RenderBatch) -> list[Image.Image]:
    """A small real pipeline: per-image seeded latents, then batched float math.

    Like diffusers, one generator per image; the convolution runs over the
    whole batch at once, so batched and alone results are compared for real.
    """
    side = batch.params.width
    latents = torch.stack(
        [
            torch.randn(4, side, side, generator=torch.Generator().manual_seed(t.seed))
            for t in batch.tasks
        ]
    )
    conv = torch.nn.Conv2d(4, 3, 3, padding=1)
    with torch.no_grad():
        torch.manual_seed(0)  # same weights in every call
        conv.reset_parameters()
        for _ in range(batch.params.num_inference_steps):
            latents[:, :3] = torch.tanh(conv(latents)) + latents[:, :3] * 0.5
        rgb = ((latents[:, :3].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(x.permute(1, 2, 0).numpy(), "RGB") for x in rgb]


@asyncio_test
async def test_seed_reproduces_image_in_batch_with_a_real_render(
    make_batcher: MakeBatcher, registry: CollectorRegistry
) -> None:
    solo = make_batcher(noise_render, batch_wait_ms=0)
    alone = await solo.submit(make_job("alone", 2, seed=42, width=32, steps=3))
    # 1 + 2 + 3 images fill the batch of 6; they meet in the queue while the
    # worker is held in a render of other params.
    sizes: list[int] = []
    release, started = threading.Event(), threading.Event()

    def recorded(batch: RenderBatch) -> list[Image.Image]:
        if batch.tasks[0].prompt == "gate":
            started.set()
            assert release.wait(WAIT_S)
        else:
            sizes.append(len(batch.tasks))
        return noise_render(batch)

    batcher = make_batcher(recorded, max_batch_images=6)
    gate = asyncio.create_task(batcher.submit(make_job("gate", 1, width=16, steps=3)))
    await wait_event(started)
    together = asyncio.gather(
        batcher.submit(make_job("x", 1, seed=7, width=32, steps=3)),
        batcher.submit(make_job("y", 2, seed=42, width=32, steps=3)),
        batcher.submit(make_job("z", 3, seed=1000, width=32, steps=3)),
    )
    await queued(registry, 6)
    release.set()
    await gate
    outcomes = await together

    assert sizes == [6]
    assert all(o.status is OutcomeStatus.OK for o in [alone, *outcomes])
    batched = outcomes[1]
    assert [im.seed for im in batched.images] == [42, 43]
    for one, other in zip(alone.images, batched.images, strict=True):
        a = np.frombuffer(one.rgb, np.uint8).astype(int)
        b = np.frombuffer(other.rgb, np.uint8).astype(int)
        # Float math may round a pixel differently in a batch on CPU.
        assert np.abs(a - b).max() <= 1
    assert alone.images[0].rgb != alone.images[1].rgb


@asyncio_test
async def test_a_lora_the_engine_refuses_answers_its_batch_invalid_lora(
    make_batcher: Callable[..., Batcher],
) -> None:
    def refuse(batch: RenderBatch) -> list[Image.Image]:
        raise InvalidLora("LoRA 'sd15' is not an SDXL LoRA")

    batcher = make_batcher(refuse)
    outcome = await batcher.submit(make_job("a", n=2))
    assert outcome.status is OutcomeStatus.INVALID_LORA
    assert outcome.message == "LoRA 'sd15' is not an SDXL LoRA"


def controlled(job: Any, scale: float, shade: int) -> Any:
    """`job` with one ControlNet unit at `scale` and a flat control image of `shade`."""
    unit = ControlNetParams(name="edges", scale=scale)
    params = job.params.model_copy(update={"controlnets": (unit,)})
    size = 3 * params.width * params.height
    return job.model_copy(update={"params": params, "control_images": (bytes([shade]) * size,)})


@asyncio_test
async def test_jobs_naming_the_same_controlnets_batch_each_with_its_own_control_image(
    render: FakeRender, make_batcher: MakeBatcher, registry: CollectorRegistry
) -> None:
    batcher = make_batcher(render)
    release, gate = await hold_worker(render, batcher)
    a = asyncio.create_task(batcher.submit(controlled(make_job("a", seed=1), 1.0, 10)))
    b = asyncio.create_task(batcher.submit(controlled(make_job("b", seed=2), 1.0, 20)))
    c = asyncio.create_task(batcher.submit(controlled(make_job("c", seed=3), 0.5, 30)))
    await queued(registry, 3)
    release.set()
    for task, seed in ((a, 1), (b, 2), (c, 3)):
        assert_ok(await task, [seed])
    await gate
    assert render.prompts_per_call()[1:] == [["a", "b"], ["c"]]
    together = render.batches[1]
    assert [task.control_images[0][0] for task in together.tasks] == [10, 20]
    assert together.params.controlnets == (ControlNetParams(name="edges", scale=1.0),)


@asyncio_test
async def test_a_controlnet_the_engine_refuses_answers_its_batch_invalid_controlnet(
    make_batcher: Callable[..., Batcher],
) -> None:
    def refuse(batch: RenderBatch) -> list[Image.Image]:
        raise InvalidControlNet("ControlNet 'broken' cannot be used: its weights do not fit")

    outcome = await make_batcher(refuse).submit(controlled(make_job("a", n=2), 1.0, 0))
    assert outcome.status is OutcomeStatus.INVALID_CONTROLNET
    assert "broken" in outcome.message


def _with_ip_adapter(job: RenderRequest, scale: float, colour: int) -> RenderRequest:
    adapters = (IpAdapterWeight(name="style", scale=scale),)
    picture = RgbPicture(width=2, height=1, rgb=bytes([colour]) * 6)
    return job.model_copy(
        update={
            "params": job.params.model_copy(update={"ip_adapters": adapters}),
            "ip_adapter_images": ((picture,),),
        }
    )


@asyncio_test
async def test_jobs_with_the_same_ip_adapters_batch_each_with_its_own_pictures(
    render: FakeRender, make_batcher: MakeBatcher, registry: CollectorRegistry
) -> None:
    batcher = make_batcher(render)
    release, gate = await hold_worker(render, batcher)
    jobs = [
        _with_ip_adapter(make_job("a", 2, seed=10), 0.6, 1),
        _with_ip_adapter(make_job("b", 1, seed=20), 0.6, 2),
        _with_ip_adapter(make_job("c", 1, seed=30), 0.9, 3),
        make_job("d", 1, seed=40),
    ]
    answers = [asyncio.create_task(batcher.submit(job)) for job in jobs]
    await queued(registry, 5)
    release.set()
    for answer, seeds in zip(answers, ([10, 11], [20], [30], [40]), strict=True):
        assert_ok(await answer, seeds)
    await gate
    assert render.prompts_per_call()[1:] == [["a", "b"], ["c"], ["d"]]
    shared = render.batches[1]
    colours = [task.ip_adapter_images[0][0].rgb[0] for task in shared.tasks]
    assert colours == [1, 1, 2]
    # The images of one job share its pictures: the engine encodes them once.
    assert shared.tasks[0].ip_adapter_images is shared.tasks[1].ip_adapter_images


@asyncio_test
async def test_an_ip_adapter_the_engine_cannot_load_answers_its_batch_invalid_ip_adapter(
    make_batcher: Callable[..., Batcher],
) -> None:
    def refuse(batch: RenderBatch) -> list[Image.Image]:
        raise InvalidIpAdapter("IP-Adapter 'style' cannot be used: its weights do not fit")

    batcher = make_batcher(refuse)
    outcome = await batcher.submit(_with_ip_adapter(make_job("a", n=2), 0.6, 1))
    assert outcome.status is OutcomeStatus.INVALID_IP_ADAPTER
    assert outcome.message == "IP-Adapter 'style' cannot be used: its weights do not fit"


@asyncio_test
async def test_an_embedding_the_engine_refuses_answers_its_batch_invalid_embedding(
    make_batcher: Callable[..., Batcher],
) -> None:
    """A file changed between the HTTP process's check and the render."""
    message = "The embedding 'neg' named in negative_prompt cannot be used: the file changed."

    def refuse(batch: RenderBatch) -> list[Image.Image]:
        raise InvalidEmbedding(message)

    batcher = make_batcher(refuse)
    outcome = await batcher.submit(make_job("a", n=2))
    assert (outcome.status, outcome.message) == (OutcomeStatus.INVALID_EMBEDDING, message)


@pytest.mark.parametrize("refusal", list(REFUSALS))
@asyncio_test
async def test_after_each_refusal_the_worker_renders_the_next_batch(
    make_batcher: Callable[..., Batcher], refusal: type[Exception]
) -> None:
    """Each refusal answers its batch and ends that batch's turn: the next job renders."""
    calls = 0

    def refuse_once(batch: RenderBatch) -> list[Image.Image]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise refusal("cannot be used")
        return [Image.new("RGB", (batch.params.width, batch.params.height))] * len(batch.tasks)

    batcher = make_batcher(refuse_once)
    refused = await batcher.submit(make_job("a"))
    assert refused.status is REFUSALS[refusal]
    rendered = await batcher.submit(make_job("b", seed=9))
    assert rendered.status is OutcomeStatus.OK, rendered.message
    assert [image.seed for image in rendered.images] == [9]
