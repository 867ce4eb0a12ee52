"""RenderHost.stream on the tiny engine: the events a render worker sends, BUSY, and
closing the stream as the way a caller cancels.

One host for the module (loading takes seconds): each test leaves it holding
nothing, and reads its metrics as differences.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from sdxl_service.contract.render_request import (
    OutcomeStatus,
    RenderEvent,
    RenderEventType,
)
from sdxl_service.contract.worker_registry import WorkerRegistry, WorkerState, WorkerStatus
from sdxl_service.metrics import ServiceMetrics
from sdxl_service.render.host import RenderHost
from tests import jobs, polling
from tests.polling import wait_until

GUARD_S = 120.0
WAIT_S = 60.0

pytestmark = pytest.mark.timeout(300)


asyncio_test = polling.asyncio_test(GUARD_S)
until = functools.partial(polling.until, timeout=WAIT_S)


class RecordingRegistry(WorkerRegistry):
    """The real registry (files), also remembering every state published, in order."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.published: list[WorkerStatus] = []

    def publish(self, status: WorkerStatus) -> None:
        # Remembered once written: a state seen here is in the files too.
        super().publish(status)
        self.published.append(status)


class Host:
    def __init__(
        self, host: RenderHost, registry: RecordingRegistry, prometheus: CollectorRegistry
    ):
        self.host = host
        self.registry = registry
        self.prometheus = prometheus

    def metric(self, name: str, **labels: str) -> float:
        return self.prometheus.get_sample_value(name, labels) or 0.0

    def cancelled(self) -> float:
        return self.metric("sdxl_rejected_total", reason="cancelled")

    def images(self) -> float:
        return self.metric("sdxl_images_generated_total", worker="1")

    def in_flight(self) -> float:
        return self.metric("sdxl_requests_in_flight", worker="1")


@pytest.fixture(scope="module")
def host(tiny_settings_factory, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    prometheus = CollectorRegistry()
    registry = RecordingRegistry(tmp_path_factory.mktemp("workers"))
    settings = tiny_settings_factory(steps=2, batch_wait_ms=0, max_batch_images=4)
    render_host = RenderHost(settings, ServiceMetrics(prometheus, worker=1), registry=registry)
    try:
        # Ready once the READY state is published too (the batcher is set just before).
        wait_until(
            lambda: (
                (render_host.is_ready() and len(registry.published) == 2) or render_host.load_error
            ),
            timeout=WAIT_S * 2,
            message="the tiny engine to load",
        )
        assert render_host.load_error is None, render_host.load_error
        yield Host(render_host, registry, prometheus)
    finally:
        asyncio.run(render_host.stop())


# A tiny engine render: 64x48, seeds from 100.
make_job = functools.partial(
    jobs.make_job, seed=100, width=64, height=48, prompt="a red fox in the snow"
)


async def events_of(stream: AsyncIterator[RenderEvent]) -> list[RenderEvent]:
    return [event async for event in stream]


def test_the_registry_shows_loading_then_ready_with_this_pid(host: Host) -> None:
    pid = os.getpid()
    assert [(s.worker, s.pid, s.state) for s in host.registry.published] == [
        (1, pid, WorkerState.LOADING),
        (1, pid, WorkerState.READY),
    ]
    # What another process reads from the files.
    assert WorkerRegistry(host.registry.directory).statuses() == {
        1: WorkerStatus(1, pid, WorkerState.READY, "cpu")
    }
    assert WorkerRegistry(host.registry.directory).all_ready(1)
    assert host.metric("sdxl_render_worker_starts_total", worker="1") == 1
    assert host.host.describe()["loaded"] is True


@asyncio_test
async def test_accepted_then_the_outcome_with_the_images(host: Host) -> None:
    before = host.images()
    events = await events_of(host.host.stream(make_job("two", n=2)))
    assert [e.type for e in events] == [RenderEventType.ACCEPTED, RenderEventType.OUTCOME]
    assert events[0].worker == 1
    outcome = events[1].outcome
    assert outcome is not None and outcome.status is OutcomeStatus.OK, outcome
    assert [(i.seed, i.width, i.height, len(i.rgb)) for i in outcome.images] == [
        (100, 64, 48, 64 * 48 * 3),
        (101, 64, 48, 64 * 48 * 3),
    ]
    assert host.images() == before + 2
    assert host.host._held == 0


@asyncio_test
async def test_previews_come_before_the_outcome(host: Host) -> None:
    job = make_job("previews", steps=4, partial_images=2)
    events = await events_of(host.host.stream(job))
    assert [e.type for e in events] == [
        RenderEventType.ACCEPTED,
        RenderEventType.PARTIAL,
        RenderEventType.PARTIAL,
        RenderEventType.OUTCOME,
    ]
    previews = events[1:3]
    assert [(e.index, e.partial_index) for e in previews] == [(0, 0), (0, 1)]
    for event in previews:
        assert event.image is not None
        assert (event.image.width, event.image.height) == (64, 48)
        assert len(event.image.rgb) == 64 * 48 * 3
    outcome = events[-1].outcome
    assert outcome is not None and outcome.status is OutcomeStatus.OK
    assert len(outcome.images) == 1
    # The final image is not the last preview.
    assert outcome.images[0].rgb != previews[-1].image.rgb  # type: ignore[union-attr]


@asyncio_test
async def test_a_job_that_asks_hears_of_every_denoising_step_of_base_and_refiner(
    host: Host,
) -> None:
    job = make_job("progress", steps=5).model_copy(update={"report_progress": True})
    events = await events_of(host.host.stream(job))
    types = [e.type for e in events]
    assert types[0] is RenderEventType.ACCEPTED and types[-1] is RenderEventType.OUTCOME
    # Ensemble at 0.8: 4 steps of the base, then 1 of the refiner, counted together.
    assert [e.step for e in events[1:-1]] == [1, 2, 3, 4, 5]
    assert set(types[1:-1]) == {RenderEventType.PROGRESS}
    plain = await events_of(host.host.stream(make_job("quiet", steps=5)))
    assert RenderEventType.PROGRESS not in [e.type for e in plain]


@asyncio_test
async def test_busy_only_for_a_caller_that_wants_an_idle_worker(host: Host) -> None:
    # Idle: an idle-only call is taken.
    idle = await events_of(host.host.stream(make_job("idle"), only_if_idle=True))
    assert [e.type for e in idle] == [RenderEventType.ACCEPTED, RenderEventType.OUTCOME]

    holder = host.host.stream(make_job("holder"))
    assert (await anext(holder)).type is RenderEventType.ACCEPTED
    # Until its stream is closed, the job is held (queued, rendering, or answered).
    rest = asyncio.ensure_future(anext(holder))
    await until(lambda: host.host._held == 1, "the holder's job to be held")

    busy = await events_of(host.host.stream(make_job("busy"), only_if_idle=True))
    assert [(e.type, e.worker) for e in busy] == [(RenderEventType.BUSY, 1)]
    # Without only_if_idle it is taken and queued behind.
    queued = await events_of(host.host.stream(make_job("queued")))
    assert [e.type for e in queued] == [RenderEventType.ACCEPTED, RenderEventType.OUTCOME]

    event = await rest
    assert event.type is RenderEventType.OUTCOME
    assert event.outcome is not None and event.outcome.status is OutcomeStatus.OK
    await holder.aclose()
    assert host.host._held == 0
    after = await events_of(host.host.stream(make_job("after"), only_if_idle=True))
    assert after[0].type is RenderEventType.ACCEPTED


@asyncio_test
async def test_closing_the_stream_cancels_the_job_queued_or_rendering(host: Host) -> None:
    images, cancelled = host.images(), host.cancelled()
    # Long enough that it cannot finish while the test works: 200 steps, about
    # 35 ms each; previews at steps 50, 100, 150.
    long = host.host.stream(make_job("long", steps=150, partial_images=3))
    assert (await anext(long)).type is RenderEventType.ACCEPTED
    first_preview = await anext(long)
    assert first_preview.type is RenderEventType.PARTIAL  # it renders

    # A job of another size waits in the queue behind it.
    queued = host.host.stream(make_job("queued", width=48, height=64))
    assert (await anext(queued)).type is RenderEventType.ACCEPTED
    waiting = asyncio.ensure_future(anext(queued))
    await until(lambda: host.in_flight() == 2, "the queued job to reach the batcher")
    assert host.host._held == 2
    # The caller leaves while the job is queued: its connection's task is cancelled.
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await queued.aclose()
    await until(lambda: host.cancelled() == cancelled + 1, "the batcher to cancel the queued job")
    assert host.host._held == 1
    assert host.in_flight() == 1

    # The caller of the rendering job leaves between two events.
    await long.aclose()
    assert host.host._held == 0
    await until(lambda: host.cancelled() == cancelled + 2, "the batcher to cancel the render")
    assert host.in_flight() == 0

    # The worker is free again, and the render stopped early: no image was made
    # for either job, only for the next one.
    events = await events_of(host.host.stream(make_job("next")))
    outcome = events[-1].outcome
    assert outcome is not None and outcome.status is OutcomeStatus.OK
    assert host.images() == images + 1
    assert host.host._held == 0


@asyncio_test
async def test_a_cancelled_stream_task_cancels_a_rendering_job(host: Host) -> None:
    cancelled = host.cancelled()
    stream = host.host.stream(make_job("cancel-rendering", steps=150, partial_images=3))
    assert (await anext(stream)).type is RenderEventType.ACCEPTED
    # As the server does: the task reading the stream is cancelled mid-wait.
    reading = asyncio.ensure_future(anext(stream))
    await until(lambda: host.in_flight() == 1, "the job to reach the batcher")
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    await stream.aclose()
    assert host.host._held == 0
    await until(lambda: host.cancelled() == cancelled + 1, "the batcher to cancel the job")
    events = await events_of(host.host.stream(make_job("after-cancel")))
    assert events[-1].outcome is not None and events[-1].outcome.status is OutcomeStatus.OK
