"""BentoRenderClient against a real HTTP server on a unix socket.

Each test runs uvicorn in its own event loop, serving a small Starlette app
whose `/render` answers with contract.wire frames scripted per call (a stand-in for the
render workers behind BentoML's shared socket). The client is built as the
service builds it (`http_client_for` on a `file://` URL). Tests wait for states
(what the server recorded, what the client holds), never for time to pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import uvicorn
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from sdxl_service.api.render_client import (
    CONNECT_ATTEMPTS,
    CONNECTION_FAILED,
    IDLE_TRIES_PER_WORKER,
    BentoRenderClient,
    http_client_for,
)
from sdxl_service.contract.render_call import RENDER_ROUTE, RenderCall
from sdxl_service.contract.render_request import (
    GenerationOutcome,
    OutcomeStatus,
    RenderedImage,
    RenderEvent,
    RenderEventType,
)
from sdxl_service.contract.wire import event_frame
from sdxl_service.contract.worker_registry import WorkerRegistry, WorkerState, WorkerStatus
from sdxl_service.metrics import ServiceMetrics
from tests import jobs, polling

GUARD_S = 60.0
WAIT_S = 15.0

pytestmark = pytest.mark.timeout(120)


asyncio_test = polling.asyncio_test(GUARD_S)
until = functools.partial(polling.until, timeout=WAIT_S)


make_job = functools.partial(jobs.make_job, seed=7, prompt="a lighthouse", partial_images=2)


def image(seed: int, shade: int = 0) -> RenderedImage:
    return RenderedImage(seed=seed, width=2, height=1, rgb=bytes([shade] * 6))


def ok(*seeds: int) -> GenerationOutcome:
    return GenerationOutcome(status=OutcomeStatus.OK, images=[image(s, 200) for s in seeds])


def accepted(worker: int) -> RenderEvent:
    return RenderEvent(type=RenderEventType.ACCEPTED, worker=worker)


def outcome(result: GenerationOutcome) -> RenderEvent:
    return RenderEvent(type=RenderEventType.OUTCOME, outcome=result)


def partial(index: int, partial_index: int) -> RenderEvent:
    return RenderEvent(
        type=RenderEventType.PARTIAL,
        index=index,
        partial_index=partial_index,
        image=image(7 + index, 10 * index + partial_index),
    )


BUSY = RenderEvent(type=RenderEventType.BUSY, worker=1)


Script = Callable[["FakeWorkers", RenderCall], AsyncIterator[RenderEvent]]
# A script that answers the call with an HTTP error instead of a stream.
FAIL_500 = object()


# --- scripts: what /render streams for one call ---------------------------


def answer(worker: int = 1, result: GenerationOutcome | None = None) -> Script:
    async def script(workers: FakeWorkers, call: RenderCall) -> AsyncIterator[RenderEvent]:
        yield accepted(worker)
        yield outcome(result or ok(*call.job.seeds))

    return script


async def previews_then_answer(
    workers: FakeWorkers, call: RenderCall
) -> AsyncIterator[RenderEvent]:
    yield accepted(1)
    for index, partial_index in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        yield partial(index, partial_index)
    yield outcome(ok(*call.job.seeds))


async def busy(workers: FakeWorkers, call: RenderCall) -> AsyncIterator[RenderEvent]:
    yield BUSY


async def busy_when_asked_for_idle(
    workers: FakeWorkers, call: RenderCall
) -> AsyncIterator[RenderEvent]:
    if call.only_if_idle:
        yield BUSY
        return
    yield accepted(1)
    yield outcome(ok(*call.job.seeds))


def hold(worker: int) -> Script:
    """ACCEPTED, then the outcome only once the test sets `workers.release`."""

    async def script(workers: FakeWorkers, call: RenderCall) -> AsyncIterator[RenderEvent]:
        yield accepted(worker)
        await workers.release.wait()
        yield outcome(ok(*call.job.seeds))

    return script


async def killed_after_accepted(
    workers: FakeWorkers, call: RenderCall
) -> AsyncIterator[RenderEvent]:
    yield accepted(2)
    yield partial(0, 0)
    # The server cuts the connection mid-stream, as when the worker dies.
    raise RuntimeError("render worker killed")


async def ends_after_accepted(workers: FakeWorkers, call: RenderCall) -> AsyncIterator[RenderEvent]:
    yield accepted(1)


class FakeWorkers:
    """The /render side: streams the scripted events and records every call and how it ended."""

    def __init__(self, *scripts: Script | object) -> None:
        self.scripts = scripts
        self.calls: list[RenderCall] = []
        self.ends: list[str] = []
        self.release = asyncio.Event()
        self.server: uvicorn.Server | None = None
        # Per call: the connections open on the server when it arrived. The
        # objects themselves, held: an id() is reused once its object is freed.
        self.connections: list[frozenset[object]] = []

    def app(self) -> Starlette:
        return Starlette(routes=[Route(RENDER_ROUTE, self.render, methods=["POST"])])

    def open_connections(self) -> frozenset[object]:
        assert self.server is not None
        return frozenset(self.server.server_state.connections)

    async def render(self, request: Request) -> Response:
        payload = await request.json()
        assert set(payload) == {"job", "only_if_idle"}
        call = RenderCall.model_validate(payload)
        self.calls.append(call)
        self.connections.append(self.open_connections())
        script = self.scripts[min(len(self.calls), len(self.scripts)) - 1]
        if script is FAIL_500:
            return PlainTextResponse("worker exploded", status_code=500)
        assert callable(script)
        return StreamingResponse(self._frames(script, call), media_type="application/octet-stream")

    async def _frames(self, script: Script, call: RenderCall) -> AsyncIterator[bytes]:
        end = "error"
        try:
            async for event in script(self, call):
                yield event_frame(event)
            end = "done"
        except asyncio.CancelledError:
            end = "cancelled"
            raise
        except GeneratorExit:
            end = "closed"
            raise
        finally:
            self.ends.append(end)


@contextlib.asynccontextmanager
async def serving(workers: FakeWorkers) -> AsyncIterator[str]:
    """uvicorn on a fresh unix socket; yields the socket's path."""
    # A short path: unix socket paths are limited to about 100 bytes.
    directory = tempfile.mkdtemp(prefix="rc-", dir="/tmp")
    path = os.path.join(directory, "render.sock")
    config = uvicorn.Config(
        workers.app(),
        uds=path,
        lifespan="off",
        log_level="critical",
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    workers.server = server
    task = asyncio.create_task(server.serve())
    try:
        await until(lambda: server.started or task.done(), "the server to start")
        assert server.started, "uvicorn did not start"
        yield path
    finally:
        workers.release.set()
        server.should_exit = True
        await task
        shutil.rmtree(directory, ignore_errors=True)


@dataclass
class Setup:
    client: BentoRenderClient
    metrics: CollectorRegistry


@contextlib.asynccontextmanager
async def render_client(
    path: str,
    *,
    workers: int = 1,
    registry: WorkerRegistry | None = None,
    max_queue_images: int | None = None,
) -> AsyncIterator[Setup]:
    prometheus = CollectorRegistry()
    http = http_client_for("file://" + path, timeout=30)
    client = BentoRenderClient(
        SimpleNamespace(to_async=SimpleNamespace(url="file://" + path)),
        ServiceMetrics(prometheus),
        workers=workers,
        registry=registry,
        http=http,
        max_queue_images=max_queue_images,
    )
    try:
        yield Setup(client, prometheus)
    finally:
        await client.close()


def ready_registry(
    directory: Path, ready: list[int], loading: tuple[int, ...] = ()
) -> WorkerRegistry:
    registry = WorkerRegistry(directory)
    for worker in ready:
        registry.publish(WorkerStatus(worker, os.getpid(), WorkerState.READY))
    for worker in loading:
        registry.publish(WorkerStatus(worker, os.getpid(), WorkerState.LOADING))
    return registry


def lost(prometheus: CollectorRegistry) -> float:
    return prometheus.get_sample_value("sdxl_render_calls_lost_total") or 0.0


# --- the tests -------------------------------------------------------------


@asyncio_test
async def test_the_outcome_comes_back() -> None:
    workers = FakeWorkers(answer(worker=1))
    async with serving(workers) as path, render_client(path) as setup:
        job = make_job("req-ok", n=2)
        result = await setup.client.generate(job)
    assert result == ok(7, 8)
    assert [(c.job, c.only_if_idle) for c in workers.calls] == [(job, False)]
    assert workers.ends == ["done"]
    assert setup.client.held_by_worker() == {}


@asyncio_test
async def test_previews_reach_on_partial_in_order() -> None:
    workers = FakeWorkers(previews_then_answer)
    seen: list[RenderEvent] = []

    async def on_partial(event: RenderEvent) -> None:
        seen.append(event)

    async with serving(workers) as path, render_client(path) as setup:
        result = await setup.client.generate(make_job(n=2), on_partial)
    assert result == ok(7, 8)
    assert [(e.type, e.index, e.partial_index) for e in seen] == [
        (RenderEventType.PARTIAL, 0, 0),
        (RenderEventType.PARTIAL, 0, 1),
        (RenderEventType.PARTIAL, 1, 0),
        (RenderEventType.PARTIAL, 1, 1),
    ]
    assert seen[2].image == image(8, 10)


@asyncio_test
async def test_previews_without_a_sink_are_dropped() -> None:
    workers = FakeWorkers(previews_then_answer)
    async with serving(workers) as path, render_client(path) as setup:
        assert await setup.client.generate(make_job()) == ok(7)


@asyncio_test
async def test_a_busy_worker_sends_the_call_elsewhere(tmp_path: Path) -> None:
    workers = FakeWorkers(busy, answer(worker=2))
    registry = ready_registry(tmp_path, [1, 2])
    async with serving(workers) as path, render_client(path, workers=2, registry=registry) as setup:
        result = await setup.client.generate(make_job())
    assert result == ok(7)
    # Both ask for an idle worker: the client holds nothing on either.
    assert [c.only_if_idle for c in workers.calls] == [True, True]
    assert workers.ends == ["done", "done"]


@asyncio_test
async def test_the_search_for_an_idle_worker_is_bounded(tmp_path: Path) -> None:
    workers = FakeWorkers(busy_when_asked_for_idle)
    registry = ready_registry(tmp_path, [1, 2])
    async with serving(workers) as path, render_client(path, workers=2, registry=registry) as setup:
        result = await setup.client.generate(make_job())
    assert result == ok(7)
    tries = IDLE_TRIES_PER_WORKER * 2
    assert [c.only_if_idle for c in workers.calls] == [True] * tries + [False]


@asyncio_test
async def test_no_idle_worker_asked_for_once_every_ready_one_holds_a_call(tmp_path: Path) -> None:
    # Worker 2 still loads: worker 1 is the only ready one.
    registry = ready_registry(tmp_path, [1], loading=(2,))
    workers = FakeWorkers(hold(worker=1), answer(worker=1))
    async with serving(workers) as path, render_client(path, workers=2, registry=registry) as setup:
        first = asyncio.create_task(setup.client.generate(make_job("first")))
        await until(lambda: setup.client.held_by_worker() == {1: 1}, "worker 1 to hold the call")
        second = await setup.client.generate(make_job("second"))
        assert setup.client.held_by_worker() == {1: 1}
        workers.release.set()
        assert await first == ok(7)
    assert second == ok(7)
    assert [(c.job.request_id, c.only_if_idle) for c in workers.calls] == [
        ("first", True),
        ("second", False),
    ]
    assert setup.client.held_by_worker() == {}


@asyncio_test
async def test_held_by_worker_counts_calls_while_held(tmp_path: Path) -> None:
    workers = FakeWorkers(hold(worker=2), hold(worker=1), hold(worker=2))
    registry = ready_registry(tmp_path, [1, 2])
    async with serving(workers) as path, render_client(path, workers=2, registry=registry) as setup:
        client = setup.client
        assert client.held_by_worker() == {}
        calls = []
        for n, held in enumerate([{2: 1}, {1: 1, 2: 1}, {1: 1, 2: 2}]):
            calls.append(asyncio.create_task(client.generate(make_job(f"r{n}"))))
            await until(lambda held=held: client.held_by_worker() == held, f"held {held}")
        workers.release.set()
        assert await asyncio.gather(*calls) == [ok(7)] * 3
        assert client.held_by_worker() == {}
    # The third found no idle worker: each ready one held a call.
    assert [c.only_if_idle for c in workers.calls] == [True, True, False]


@asyncio_test
async def test_one_worker_never_asks_for_an_idle_one(tmp_path: Path) -> None:
    workers = FakeWorkers(answer(worker=1))
    registry = ready_registry(tmp_path, [1])
    async with serving(workers) as path, render_client(path, workers=1, registry=registry) as setup:
        for n in range(3):
            assert await setup.client.generate(make_job(f"r{n}")) == ok(7)
    assert [c.only_if_idle for c in workers.calls] == [False] * 3


@pytest.mark.parametrize("workers", [1, 2])
@asyncio_test
async def test_every_call_gets_a_new_connection_closed_at_its_outcome(
    tmp_path: Path, workers: int
) -> None:
    fake = FakeWorkers(answer(worker=1))
    registry = ready_registry(tmp_path, list(range(1, workers + 1)))
    async with (
        serving(fake) as path,
        render_client(path, workers=workers, registry=registry) as setup,
    ):
        for n in range(3):
            assert await setup.client.generate(make_job(f"r{n}")) == ok(7)
            # Closed by the client once the outcome is read; with several
            # workers the kernel may hand the next one to any of them.
            await until(lambda: not fake.open_connections(), "the connection to close")
    assert all(len(open_then) == 1 for open_then in fake.connections)
    assert len(set(fake.connections)) == 3


@pytest.mark.parametrize("script", [killed_after_accepted, ends_after_accepted])
@asyncio_test
async def test_a_worker_lost_after_accepting_is_worker_restarted(script: Script) -> None:
    workers = FakeWorkers(script, answer(worker=1))
    seen: list[RenderEvent] = []

    async def on_partial(event: RenderEvent) -> None:
        seen.append(event)

    async with serving(workers) as path, render_client(path, workers=1) as setup:
        assert lost(setup.metrics) == 0
        result = await setup.client.generate(make_job(), on_partial)
        assert result.status is OutcomeStatus.WORKER_RESTARTED
        assert result.retry_after is not None and result.retry_after > 0
        assert lost(setup.metrics) == 1
        assert setup.client.held_by_worker() == {}
        # Not sent again: the lost worker may have rendered part of it.
        assert len(workers.calls) == 1
        # The client recovers: the next call is served.
        assert await setup.client.generate(make_job("next")) == ok(7)
        assert lost(setup.metrics) == 1


@asyncio_test
async def test_a_socket_nobody_listens_on_is_loading() -> None:
    directory = tempfile.mkdtemp(prefix="rc-", dir="/tmp")
    try:
        path = os.path.join(directory, "render.sock")
        async with render_client(path, workers=2) as setup:
            result = await setup.client.generate(make_job())
        assert result.status is OutcomeStatus.LOADING
        assert result.retry_after is not None and result.retry_after > 0
        assert lost(setup.metrics) == 0
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@asyncio_test
async def test_connections_dropped_before_acceptance_are_tried_again_then_loading() -> None:
    directory = tempfile.mkdtemp(prefix="rc-", dir="/tmp")
    path = os.path.join(directory, "render.sock")
    attempts = 0

    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A render service that restarts: the connection goes, no answer.
        nonlocal attempts
        attempts += 1
        writer.close()

    server = await asyncio.start_unix_server(drop, path=path)
    logged: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("sdxl_service.api.render_client").addHandler(handler)
    try:
        async with render_client(path, workers=1) as setup:
            result = await setup.client.generate(make_job())
    finally:
        logging.getLogger("sdxl_service.api.render_client").removeHandler(handler)
        server.close()
        await server.wait_closed()
        shutil.rmtree(directory, ignore_errors=True)
    assert result.status is OutcomeStatus.LOADING
    assert attempts == CONNECT_ATTEMPTS
    # The line tests/integration/test_under_load.py makes sure a busy service never writes.
    assert sum(CONNECTION_FAILED in line for line in logged) == CONNECT_ATTEMPTS
    assert lost(setup.metrics) == 0


@asyncio_test
async def test_an_http_error_is_an_error_outcome() -> None:
    workers = FakeWorkers(FAIL_500)
    async with serving(workers) as path, render_client(path) as setup:
        result = await setup.client.generate(make_job())
    assert result.status is OutcomeStatus.ERROR
    assert "500" in result.message and "worker exploded" in result.message
    assert len(workers.calls) == 1


@asyncio_test
async def test_loading_from_a_restarting_worker_is_tried_on_a_ready_one(tmp_path: Path) -> None:
    registry = ready_registry(tmp_path, [2], loading=(1,))
    loading = GenerationOutcome(status=OutcomeStatus.LOADING, message="loading", retry_after=10)
    workers = FakeWorkers(answer(worker=1, result=loading), answer(worker=2))
    async with serving(workers) as path, render_client(path, workers=2, registry=registry) as setup:
        assert await setup.client.generate(make_job()) == ok(7)
    assert len(workers.calls) == 2


@asyncio_test
async def test_loading_with_no_worker_ready_is_returned(tmp_path: Path) -> None:
    registry = ready_registry(tmp_path, [], loading=(1, 2))
    loading = GenerationOutcome(status=OutcomeStatus.LOADING, message="loading", retry_after=10)
    workers = FakeWorkers(answer(worker=1, result=loading))
    async with serving(workers) as path, render_client(path, workers=2, registry=registry) as setup:
        assert await setup.client.generate(make_job()) == loading
    # Nobody ready, nobody idle: one call, not asking for an idle worker.
    assert [c.only_if_idle for c in workers.calls] == [False]


@pytest.mark.parametrize("n_workers", [1, 2])
@asyncio_test
async def test_cancelling_generate_closes_the_stream_on_the_worker(
    n_workers: int, tmp_path: Path
) -> None:
    workers = FakeWorkers(hold(worker=1), answer(worker=1))
    registry = ready_registry(tmp_path, list(range(1, n_workers + 1)))
    async with (
        serving(workers) as path,
        render_client(path, workers=n_workers, registry=registry) as setup,
    ):
        call = asyncio.create_task(setup.client.generate(make_job("leaves")))
        await until(lambda: setup.client.held_by_worker() == {1: 1}, "the call to be accepted")
        assert workers.ends == []
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert setup.client.held_by_worker() == {}
        # The worker's stream ends although it never sent its outcome.
        await until(lambda: workers.ends, "the server to see the client leave")
        assert workers.ends in (["cancelled"], ["closed"])
        assert not workers.release.is_set()
        # And the client still works.
        assert await setup.client.generate(make_job("next")) == ok(7)
    assert lost(setup.metrics) == 0


# --- admission: SDXL_MAX_QUEUE_IMAGES, kept here for every worker together -------


@asyncio_test
async def test_a_full_queue_is_refused_with_retry_after_and_nothing_sent() -> None:
    workers = FakeWorkers(hold(worker=1), answer(worker=1))
    async with serving(workers) as path, render_client(path, max_queue_images=4) as setup:
        held = asyncio.create_task(setup.client.generate(make_job("held", n=3)))
        await until(lambda: setup.client.held_by_worker() == {1: 1}, "the call to be held")

        refused = await setup.client.generate(make_job("late", n=2))
        too_many = await setup.client.generate(make_job("huge", n=5))

        assert refused.status is OutcomeStatus.QUEUE_FULL
        assert refused.retry_after is not None and refused.retry_after >= 1
        assert "busy" in refused.message
        assert too_many.status is OutcomeStatus.QUEUE_FULL
        assert "exceeds the queue capacity of 4" in too_many.message
        rejected = setup.metrics.get_sample_value("sdxl_rejected_total", {"reason": "queue_full"})
        assert rejected == 2
        # One image more still fits beside the three held.
        assert (await setup.client.generate(make_job("fits"))).status is OutcomeStatus.OK
        assert [c.job.request_id for c in workers.calls] == ["held", "fits"]
        workers.release.set()
        assert (await held).status is OutcomeStatus.OK


@asyncio_test
async def test_a_cancelled_call_gives_its_room_back() -> None:
    workers = FakeWorkers(hold(worker=1), answer(worker=1))
    async with serving(workers) as path, render_client(path, max_queue_images=2) as setup:
        long = asyncio.create_task(setup.client.generate(make_job("long", n=2)))
        await until(lambda: setup.client.held_by_worker() == {1: 1}, "the call to be held")
        assert (await setup.client.generate(make_job("refused"))).status is OutcomeStatus.QUEUE_FULL
        long.cancel()
        with pytest.raises(asyncio.CancelledError):
            await long

        outcome = await setup.client.generate(make_job("next", n=2))

        assert outcome.status is OutcomeStatus.OK and len(outcome.images) == 2
