"""BentoRenderClient: how the HTTP service reaches the render service."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest

from sdxl_service.choices import RefinerMode, SchedulerName
from sdxl_service.jobs import GenerationJob, GenerationOutcome, OutcomeStatus, RenderParams
from sdxl_service.render_client import CONNECT_ATTEMPTS, BentoRenderClient

JOB = GenerationJob(
    request_id="r",
    params=RenderParams(
        width=64,
        height=64,
        steps=2,
        guidance_scale=5.0,
        high_noise_frac=0.8,
        refiner=RefinerMode.ENSEMBLE,
        scheduler=SchedulerName.EULER,
    ),
    prompt="x",
    seeds=[1],
)


class FlakyHandle:
    """Stands in for BentoML's remote proxy: fails `failures` times, then answers."""

    def __init__(self, failures: int, error: Exception) -> None:
        self.calls = 0
        self.failures = failures
        self.error = error
        self.to_async = SimpleNamespace(generate=self.generate)

    async def generate(self, job: GenerationJob) -> dict[str, Any]:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return {"status": "ok", "images": []}


def generate(handle: FlakyHandle) -> GenerationOutcome:
    return asyncio.run(BentoRenderClient(handle).generate(JOB))


def test_dropped_keep_alive_connection_is_retried() -> None:
    handle = FlakyHandle(1, aiohttp.ServerDisconnectedError())
    assert generate(handle).status is OutcomeStatus.OK
    assert handle.calls == 2


def test_an_unreachable_render_service_is_loading_not_an_error() -> None:
    handle = FlakyHandle(99, aiohttp.ClientConnectionError("refused"))
    outcome = generate(handle)
    assert outcome.status is OutcomeStatus.LOADING
    assert outcome.retry_after and outcome.retry_after > 0
    assert handle.calls == CONNECT_ATTEMPTS


def test_other_errors_are_not_retried() -> None:
    handle = FlakyHandle(1, ValueError("bug"))
    with pytest.raises(ValueError):
        generate(handle)
    assert handle.calls == 1


class DroppingThenRefusing(FlakyHandle):
    """The render worker dies while it holds the call, then its successor is not up yet."""

    async def generate(self, job: GenerationJob) -> dict[str, Any]:
        self.calls += 1
        if self.calls == 1:
            raise aiohttp.ServerDisconnectedError()
        raise aiohttp.ClientConnectionError("refused")


def test_a_worker_that_dies_with_the_call_is_reported_at_once_and_counted() -> None:
    from prometheus_client import CollectorRegistry

    from sdxl_service.metrics import ServiceMetrics

    registry = CollectorRegistry()
    handle = DroppingThenRefusing(0, ValueError())
    outcome = asyncio.run(BentoRenderClient(handle, ServiceMetrics(registry)).generate(JOB))
    assert outcome.status is OutcomeStatus.WORKER_RESTARTED
    assert outcome.retry_after and outcome.retry_after > 0
    assert handle.calls == 2  # no waiting out the other attempts
    assert registry.get_sample_value("sdxl_render_calls_lost_total") == 1


class DroppingThenLoading(FlakyHandle):
    """The worker dies holding the call; its successor, on the same socket, is loading."""

    async def generate(self, job: GenerationJob) -> dict[str, Any]:
        self.calls += 1
        if self.calls == 1:
            raise aiohttp.ServerDisconnectedError()
        return {"status": "loading", "message": "loading", "retry_after": 10}


def test_a_worker_replaced_on_the_same_socket_is_reported_as_restarted() -> None:
    outcome = generate(DroppingThenLoading(0, ValueError()))
    assert outcome.status is OutcomeStatus.WORKER_RESTARTED
