"""The safety checker in the render worker (SDXL_SAFETY_CHECKER): a RenderHost on the tiny
engine with a tiny StableDiffusionSafetyChecker that flags the image of seed 100 and not that
of seed 101 (tests/safety_checkers.py), and one whose load fails.

A flagged image's pixels never leave the worker: the outcome withholds it (its seed in
`flagged_seeds`), a request whose every image is flagged gets CONTENT_POLICY_VIOLATION, and no
previews are made while a checker is on.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image
from prometheus_client import CollectorRegistry

from sdxl_service.contract.render_request import OutcomeStatus, RenderEvent, RenderEventType
from sdxl_service.engine.render_batch import RenderBatch, image_tasks
from sdxl_service.metrics import ServiceMetrics
from sdxl_service.render.host import RenderHost
from tests import jobs, polling, safety_checkers
from tests.polling import wait_until

pytestmark = pytest.mark.timeout(300)
asyncio_test = polling.asyncio_test(120.0)

make_job = functools.partial(jobs.make_job, seed=100, width=64, height=48, prompt="a red fox")


@pytest.fixture(scope="module")
def stock_images(tiny_engine) -> dict[int, Image.Image]:
    """The images of seeds 100 and 101 as the engine renders them without a checker."""
    job = make_job("stock", n=2)
    rendered = tiny_engine.render(RenderBatch(params=job.params, tasks=image_tasks(job)))
    return {100: rendered[0], 101: rendered[1]}


@pytest.fixture(scope="module")
def checker_dir(tmp_path_factory: pytest.TempPathFactory, stock_images) -> Path:
    folder = tmp_path_factory.mktemp("safety-checker")
    return safety_checkers.diffusers_checker(
        folder, stock_images[100], [stock_images[101]], pipeline_layout=False
    )


def started(settings) -> tuple[RenderHost, CollectorRegistry]:
    prometheus = CollectorRegistry()
    host = RenderHost(settings, ServiceMetrics(prometheus, worker=1))
    wait_until(
        lambda: host.is_ready() or host.load_error, timeout=120, message="the engine to load"
    )
    return host, prometheus


@pytest.fixture(scope="module")
def screening(tiny_settings_factory, checker_dir) -> Iterator[tuple[RenderHost, CollectorRegistry]]:
    settings = tiny_settings_factory(
        safety_checker=str(checker_dir), batch_wait_ms=0, max_batch_images=4
    )
    host, prometheus = started(settings)
    try:
        assert host.load_error is None, host.load_error
        yield host, prometheus
    finally:
        asyncio.run(host.stop())


async def events_of(host: RenderHost, job) -> list[RenderEvent]:
    return [event async for event in host.stream(job)]


def flagged_count(prometheus: CollectorRegistry) -> float:
    return prometheus.get_sample_value("sdxl_images_flagged_total", {"worker": "1"}) or 0.0


@asyncio_test
async def test_a_flagged_image_is_withheld_and_the_other_returned_unchanged(
    screening, stock_images
) -> None:
    host, prometheus = screening
    before = flagged_count(prometheus)
    events = await events_of(host, make_job("two", n=2))
    outcome = events[-1].outcome
    assert outcome is not None and outcome.status is OutcomeStatus.OK, outcome
    assert outcome.flagged_seeds == [100]
    assert [image.seed for image in outcome.images] == [101]
    assert outcome.images[0].rgb == stock_images[101].tobytes()
    assert flagged_count(prometheus) == before + 1
    assert host.describe()["safety_checker"] == {
        "source": host.settings.safety_checker,
        "kind": "StableDiffusionSafetyChecker",
    }


@asyncio_test
async def test_a_request_whose_every_image_is_flagged_is_a_content_policy_violation(
    screening,
) -> None:
    host, prometheus = screening
    events = await events_of(host, make_job("one"))
    outcome = events[-1].outcome
    assert outcome is not None
    assert outcome.status is OutcomeStatus.CONTENT_POLICY_VIOLATION
    assert outcome.images == [] and "safety" in outcome.message
    reason = {"reason": "content_policy_violation"}
    assert (prometheus.get_sample_value("sdxl_rejected_total", reason) or 0) >= 1


@asyncio_test
async def test_no_previews_are_made_while_a_checker_is_on(screening, stock_images) -> None:
    host, _ = screening
    events = await events_of(host, make_job("previews", seed=101, partial_images=2))
    assert [e.type for e in events] == [RenderEventType.ACCEPTED, RenderEventType.OUTCOME]
    outcome = events[-1].outcome
    assert outcome is not None and outcome.status is OutcomeStatus.OK
    assert outcome.images[0].rgb == stock_images[101].tobytes()


def test_a_checker_that_fails_to_load_fails_the_worker_naming_the_variable(
    tiny_settings_factory, tmp_path: Path
) -> None:
    folder = safety_checkers.vit_classifier(tmp_path / "vit", flags_everything=True)
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    host, _ = started(tiny_settings_factory(safety_checker=str(folder)))
    try:
        assert host.load_error is not None
        assert f"SDXL_SAFETY_CHECKER='{folder}'" in host.load_error
        assert not host.is_alive() and not host.is_ready()
    finally:
        asyncio.run(host.stop())


@pytest.mark.parametrize("flags_everything", [False, True])
@asyncio_test
async def test_an_image_classifier_checker_in_the_batcher(
    tiny_engine, stock_images, tmp_path_factory: pytest.TempPathFactory, flags_everything: bool
) -> None:
    """A transformers classifier (tiny ViT, its bias decides): flagging nothing changes
    nothing (the stock pixels), flagging everything withholds every image."""
    from sdxl_service.engine.safety import SafetyChecker
    from sdxl_service.render.batcher import Batcher

    folder = safety_checkers.vit_classifier(
        tmp_path_factory.mktemp("vit"), flags_everything=flags_everything
    )
    checker = SafetyChecker.load(str(folder), ["nsfw"], device="cpu", dtype=torch.float32)
    batcher = Batcher(tiny_engine.render, max_batch_images=4, batch_wait_ms=0, screen=checker.flags)
    try:
        outcome = await batcher.submit(make_job("vit", n=2))
    finally:
        await batcher.stop()
    if flags_everything:
        assert outcome.status is OutcomeStatus.CONTENT_POLICY_VIOLATION and outcome.images == []
    else:
        assert outcome.status is OutcomeStatus.OK and outcome.flagged_seeds == []
        assert [image.rgb for image in outcome.images] == [
            stock_images[100].tobytes(),
            stock_images[101].tobytes(),
        ]
