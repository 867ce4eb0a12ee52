"""How the HTTP service talks to the render workers.

`RenderClient` is what the HTTP layer needs; `BentoRenderClient` implements it
over the render service's socket. The render call is a stream of `RenderEvent`s
(render/host.py) in contract/wire.py's format, read with httpx rather than BentoML's
client because that one cuts streams into 8 KiB pieces with no framing and
leaves the connection open when the reader stops: here, leaving the `stream`
block closes the connection, and that is how a cancelled request stops its
images on whichever worker holds them. `describe` goes through the BentoML
handle.

Several workers share the socket and the kernel picks one per connection. So
that no worker idles while another has a queue, a call made while some worker
looks idle asks for an idle one (`only_if_idle`) on a fresh connection; a busy
worker says BUSY and the call is made again, at most a few times.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

import httpx

from ..contract.render_call import RENDER_ROUTE, RenderCall
from ..contract.render_request import (
    LOADING_RETRY_AFTER,
    GenerationOutcome,
    OutcomeStatus,
    RenderEvent,
    RenderEventType,
    RenderRequest,
    loading_outcome,
)
from ..contract.wire import read_events
from ..contract.worker_registry import WorkerRegistry
from ..metrics import ServiceMetrics
from .admission import QueueCapacity

logger = logging.getLogger(__name__)

CONNECT_ATTEMPTS = 3
# Tries at finding an idle (or a loaded) worker, per worker, before queueing
# anywhere: the kernel picks the worker of each connection, so a free worker is
# missed with probability (busy share) ** tries.
IDLE_TRIES_PER_WORKER = 8

# Logged at each failed connection; tests/integration/test_under_load.py looks for it.
CONNECTION_FAILED = "render service connection failed"

# Gets the stream's PARTIAL events (previews) and, for a job that asked, its PROGRESS ones.
PartialSink = Callable[[RenderEvent], Awaitable[None]]


class RenderClient(Protocol):
    async def generate(
        self, job: RenderRequest, on_partial: PartialSink | None = None
    ) -> GenerationOutcome: ...

    async def describe(self) -> dict[str, Any]: ...

    async def describe_upscalers(self) -> dict[str, Any] | None: ...


class _WorkerLost(Exception):
    """The stream broke after a worker had taken the job: the worker died."""


def http_client_for(url: str, *, timeout: float) -> httpx.AsyncClient:
    """An httpx client for a BentoML service URL (`file://` socket, `tcp://` or http)."""
    parsed = urlparse(url)
    # A new connection per call: the kernel hands each one to any worker, and
    # a call stops reading at its outcome, which leaves no connection to keep.
    # Connecting over the socket costs nothing measurable (make bench-overhead).
    limits = httpx.Limits(max_keepalive_connections=0)
    # No read timeout: the batcher owns the request deadline.
    timeouts = httpx.Timeout(timeout, connect=10.0, read=None)
    if parsed.scheme == "file":
        transport = httpx.AsyncHTTPTransport(uds=unquote(parsed.path), limits=limits)
        return httpx.AsyncClient(
            transport=transport, base_url="http://render.local", timeout=timeouts
        )
    base = f"http://{parsed.netloc}" if parsed.scheme == "tcp" else url
    return httpx.AsyncClient(base_url=base, limits=limits, timeout=timeouts)


class BentoRenderClient:
    def __init__(
        self,
        handle: Any,
        metrics: ServiceMetrics | None = None,
        *,
        workers: int = 1,
        registry: WorkerRegistry | None = None,
        http: httpx.AsyncClient | None = None,
        timeout: float = 900.0,
        max_queue_images: int | None = None,
    ) -> None:
        self._handle = handle
        self._metrics = metrics
        self._workers = workers
        self._registry = registry
        self._http = http
        self._timeout = timeout
        # Calls in flight by the worker that took them.
        self._held: collections.Counter[int] = collections.Counter()
        # SDXL_MAX_QUEUE_IMAGES for all workers together: each worker sees only
        # its own queue, so the limit is kept here, where every call passes.
        self._capacity = QueueCapacity(max_queue_images) if max_queue_images else None
        self._images_in_flight = 0
        self._last_done: float | None = None

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            # The handle knows the render service's address only once BentoML
            # has set the dependencies up, after this object is made.
            url = self._handle.to_async.url
            self._http = http_client_for(url, timeout=self._timeout)
        return self._http

    def held_by_worker(self) -> dict[int, int]:
        return {worker: n for worker, n in self._held.items() if n}

    def _ready_workers(self) -> set[int]:
        if self._registry is None:
            return set(range(1, self._workers + 1))
        return self._registry.ready_workers()

    def _some_worker_idle(self) -> bool:
        if self._workers == 1:
            return False
        return any(self._held[worker] == 0 for worker in self._ready_workers())

    def refusal(self, n: int, waiting: int = 0) -> GenerationOutcome | None:
        """QUEUE_FULL (counted) when `n` more images do not fit now, beside `waiting`
        ones not handed over yet (image jobs in their store); None when they do."""
        if self._capacity is None:
            return None
        refusal = self._capacity.refusal(self._images_in_flight + waiting, n)
        if refusal is not None and self._metrics is not None:
            self._metrics.reject(refusal.status.value)
        return refusal

    async def generate(
        self, job: RenderRequest, on_partial: PartialSink | None = None
    ) -> GenerationOutcome:
        n = len(job.seeds)
        refusal = self.refusal(n)
        if refusal is not None:
            return refusal
        self._images_in_flight += n
        started = time.monotonic()
        try:
            outcome = await self._dispatch(job, on_partial)
        finally:
            self._images_in_flight -= n
        if outcome.status is OutcomeStatus.OK and self._capacity is not None:
            # Seconds per image at the pace images leave the service: the gap
            # since the previous answer, or this call's own time when that is
            # shorter (an idle service).
            now = time.monotonic()
            gap = now - started if self._last_done is None else now - max(started, self._last_done)
            self._last_done = now
            self._capacity.record_call(max(gap, 1e-3), n)
        return outcome

    async def _dispatch(
        self, job: RenderRequest, on_partial: PartialSink | None
    ) -> GenerationOutcome:
        # A job can carry an edit's pictures: each body is encoded once, not once per try.
        bodies: dict[bool, str] = {}
        idle_tries = IDLE_TRIES_PER_WORKER * self._workers
        failures = 0
        while True:
            only_if_idle = idle_tries > 0 and self._some_worker_idle()
            idle_tries -= 1
            try:
                if only_if_idle not in bodies:
                    call = RenderCall(job=job, only_if_idle=only_if_idle)
                    bodies[only_if_idle] = call.model_dump_json()
                body = bodies[only_if_idle]
                outcome = await self._call(body, on_partial)
            except _WorkerLost:
                return self._worker_lost()
            except httpx.TransportError as exc:
                # Refused or reset before any worker took the job: the render
                # service is (re)starting.
                failures += 1
                logger.warning("%s (%s), attempt %d", CONNECTION_FAILED, exc, failures)
                if failures >= CONNECT_ATTEMPTS:
                    return loading_outcome(
                        "The render service is not reachable (starting?); try again shortly."
                    )
                continue
            if outcome is None:
                continue
            if (
                outcome.status is OutcomeStatus.LOADING
                and self._workers > 1
                and idle_tries > 0
                and self._ready_workers()
            ):
                # A worker that is (re)starting took it while others have loaded.
                continue
            return outcome

    async def _call(self, body: str, on_partial: PartialSink | None) -> GenerationOutcome | None:
        """The job's outcome; None when the worker reached was busy."""
        headers = {"content-type": "application/json"}
        worker: int | None = None
        outcome: GenerationOutcome | None = None
        try:
            async with self._client().stream(
                "POST", RENDER_ROUTE, content=body, headers=headers
            ) as response:
                if response.status_code != 200:
                    detail = (await response.aread()).decode(errors="replace")[:300]
                    return GenerationOutcome(
                        status=OutcomeStatus.ERROR,
                        message=f"render service answered {response.status_code}: {detail}",
                    )
                async with contextlib.aclosing(read_events(response.aiter_bytes())) as events:
                    async for event in events:
                        if event.type is RenderEventType.BUSY:
                            return None
                        if event.type is RenderEventType.ACCEPTED and event.worker is not None:
                            worker = event.worker
                            self._held[worker] += 1
                        elif (
                            event.type in (RenderEventType.PARTIAL, RenderEventType.PROGRESS)
                            and on_partial is not None
                        ):
                            await on_partial(event)
                        elif event.type is RenderEventType.OUTCOME and event.outcome is not None:
                            # Not waiting for the stream's end (one more wake-up
                            # of both processes, ~0.5 ms): leaving the block
                            # closes the connection, which nobody keeps anyway.
                            outcome = event.outcome
                            break
            if outcome is None:
                # The stream ended without an outcome: the worker went away.
                raise _WorkerLost
            return outcome
        except httpx.TransportError:
            if outcome is not None:
                return outcome  # the worker went away after answering
            if worker is not None:
                raise _WorkerLost from None
            raise
        finally:
            if worker is not None:
                self._held[worker] -= 1

    def _worker_lost(self) -> GenerationOutcome:
        if self._metrics is not None:
            self._metrics.count_render_call_lost()
        return GenerationOutcome(
            status=OutcomeStatus.WORKER_RESTARTED,
            message="The render worker stopped while it made these images and is restarting; "
            "retry shortly.",
            retry_after=LOADING_RETRY_AFTER,
        )

    async def describe(self) -> dict[str, Any]:
        try:
            return dict(await self._handle.to_async.describe())
        except Exception as exc:
            if _is_connection_error(exc):
                return {"loaded": False, "error": None}
            raise

    async def describe_upscalers(self) -> dict[str, Any] | None:
        """The render worker's description of each upscaler model (architecture and scale, or
        its problem); None while no worker has loaded."""
        try:
            answer = dict(await self._handle.to_async.describe_upscalers())
        except Exception as exc:
            if _is_connection_error(exc):
                return None
            raise
        upscalers = answer.get("upscalers")
        return None if upscalers is None else dict(upscalers)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()


def _is_connection_error(exc: Exception) -> bool:
    # BentoML's remote proxy talks aiohttp; a render process that is not
    # listening yet refuses the connection.
    import aiohttp
    from bentoml.exceptions import BentoMLException

    transport_errors = aiohttp.ClientConnectionError | httpx.TransportError | ConnectionError
    return isinstance(exc, transport_errors) or (
        isinstance(exc, BentoMLException) and getattr(exc, "error_code", 0) in (502, 503)
    )
