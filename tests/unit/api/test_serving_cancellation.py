"""ImagesServing stops the work nobody waits for: a client that leaves (499), a deadline (504)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from sdxl_service.api.errors import APIError
from sdxl_service.api.files import LocalFileStore
from sdxl_service.api.request_kinds import GENERATION
from sdxl_service.api.schemas import ImageGenerationRequest
from sdxl_service.api.serving import ImagesServing
from sdxl_service.contract.render_request import GenerationOutcome, RenderRequest
from sdxl_service.engine.render_batch import RenderBatch, RenderCancelled
from sdxl_service.render.batcher import Batcher
from sdxl_service.settings import Settings
from tests.polling import asyncio_test

DESCRIPTION = {"loaded": True, "preset": "tiny", "native_resolution": 64}
REQUEST = ImageGenerationRequest(prompt="x", size="64x64")


class ClientRequest:
    """The parts of a Starlette request ImagesServing reads while it waits."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()

    async def is_disconnected(self) -> bool:
        return self.gone.is_set()


class HangingRenderer:
    """A render service that never finishes, and records what it was told."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.jobs: list[RenderRequest] = []
        self.generate_cancelled = False

    async def generate(self, job: RenderRequest, on_partial: Any = None) -> GenerationOutcome:
        self.jobs.append(job)
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.generate_cancelled = True
            raise
        raise AssertionError("unreachable")

    async def describe(self) -> dict[str, Any]:
        return DESCRIPTION


class BatcherRenderer:
    """The render service's own Batcher, in process, over a render that runs until stopped."""

    def __init__(self) -> None:
        self.render_started = threading.Event()
        self.render_stopped = threading.Event()
        self.batcher = Batcher(self._render, max_batch_images=4, batch_wait_ms=0)

    def _render(self, batch: RenderBatch) -> list[Image.Image]:
        self.render_started.set()
        # A denoising loop: checks should_stop at every step, as the engine does.
        while not batch.should_stop():
            threading.Event().wait(0.005)
        self.render_stopped.set()
        raise RenderCancelled("stopped")

    async def generate(self, job: RenderRequest, on_partial: Any = None) -> GenerationOutcome:
        # Cancelling this call is how the HTTP side cancels (it closes the
        # render stream); the Batcher drops the job's images then.
        return await self.batcher.submit(job)

    async def describe(self) -> dict[str, Any]:
        return DESCRIPTION


# A hung test fails instead of hanging the suite.
run = asyncio_test(60.0)


def serving(renderer: Any, tmp_path: Path, **settings: Any) -> ImagesServing:
    return ImagesServing(Settings(**settings), renderer, LocalFileStore(tmp_path, 60))


@run
async def test_a_client_that_leaves_gets_499_and_its_work_is_cancelled(tmp_path: Path) -> None:
    renderer = HangingRenderer()
    request = ClientRequest()
    call = asyncio.ensure_future(serving(renderer, tmp_path).serve(GENERATION, REQUEST, request))
    await renderer.started.wait()
    request.gone.set()
    with pytest.raises(APIError) as caught:
        await call
    assert (caught.value.status, caught.value.code) == (499, "cancelled")
    # Cancelling the render call is what closes the stream to the worker.
    assert renderer.generate_cancelled


@run
async def test_a_client_that_stays_is_never_cancelled_before_its_answer(tmp_path: Path) -> None:
    renderer = HangingRenderer()
    call = asyncio.ensure_future(
        serving(renderer, tmp_path).serve(GENERATION, REQUEST, ClientRequest())
    )
    await renderer.started.wait()
    # Several disconnect polls pass with the client still there.
    done, _ = await asyncio.wait({call}, timeout=0.8)
    assert not done and not renderer.generate_cancelled
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert renderer.generate_cancelled


@run
async def test_a_request_past_its_deadline_gets_504_and_its_render_stops(tmp_path: Path) -> None:
    renderer = BatcherRenderer()
    try:
        images = serving(renderer, tmp_path, request_timeout=0.5, traffic_timeout=10)
        with pytest.raises(APIError) as caught:
            await images.serve(GENERATION, REQUEST, ClientRequest())
        assert (caught.value.status, caught.value.code) == (504, "timeout")
        assert caught.value.headers["x-should-retry"] == "false"
        assert renderer.render_started.is_set()
        # The running render saw should_stop and ended: the GPU is free again.
        assert await asyncio.to_thread(renderer.render_stopped.wait, 30)
    finally:
        await renderer.batcher.stop()
