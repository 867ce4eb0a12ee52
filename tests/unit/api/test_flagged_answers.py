"""Answers with images the safety checker withheld (SDXL_SAFETY_CHECKER): a flagged item in
its seed's place (no b64_json or url, a content_policy_violation error), a 400 when every
image was flagged, the stream's error event after the images sent, and an image job's
result or failure, on the HTTP app with a stand-in render service."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from openai.types import Image as OpenAIImage

from sdxl_service.api.app import create_app
from sdxl_service.api.errors import APIError
from sdxl_service.api.files import LocalFileStore
from sdxl_service.api.jobs.retry import RetryPolicy, Verdict
from sdxl_service.api.request_kinds import GENERATION
from sdxl_service.api.schemas import ImageGenerationRequest
from sdxl_service.api.serving import ImagesServing
from sdxl_service.contract.render_request import (
    CONTENT_POLICY_MESSAGE,
    GenerationOutcome,
    OutcomeStatus,
    RenderedImage,
)
from sdxl_service.settings import Settings
from tests.decoded import decode
from tests.unit.api.test_serving import SeedPainter, sse_events

CONTENT_POLICY_ERROR = {
    "message": CONTENT_POLICY_MESSAGE,
    "type": "invalid_request_error",
    "param": None,
    "code": "content_policy_violation",
}
# In an answer's items nulls are left out, as everywhere in the answer (param among them).
ITEM_ERROR = {key: value for key, value in CONTENT_POLICY_ERROR.items() if value is not None}


def red(seed: int, side: int = 64) -> RenderedImage:
    return RenderedImage(seed=seed, width=side, height=side, rgb=bytes([seed, 0, 0]) * side * side)


def withheld(*flagged: int, kept: tuple[int, ...] = ()) -> GenerationOutcome:
    if not kept:
        return GenerationOutcome(
            status=OutcomeStatus.CONTENT_POLICY_VIOLATION, message=CONTENT_POLICY_MESSAGE
        )
    return GenerationOutcome(
        status=OutcomeStatus.OK, images=[red(seed) for seed in kept], flagged_seeds=list(flagged)
    )


@pytest.fixture
def painter() -> SeedPainter:
    return SeedPainter()


@pytest.fixture
def serving(painter: SeedPainter, tmp_path: Path) -> ImagesServing:
    return ImagesServing(Settings(files_dir=tmp_path), painter, LocalFileStore(tmp_path, 60))


@pytest.fixture
def client(serving: ImagesServing) -> TestClient:
    return TestClient(create_app(lambda: serving, serving.settings.max_body_bytes))


BODY = {"prompt": "x", "size": "64x64", "n": 3, "seed": 10}


@pytest.mark.parametrize("response_format", ["b64_json", "url"])
def test_a_flagged_image_keeps_its_place_without_pixels(
    client: TestClient, painter: SeedPainter, response_format: str
) -> None:
    painter.outcome = withheld(11, kept=(10, 12))
    response = client.post("/images/generations", json={**BODY, "response_format": response_format})
    assert response.status_code == 200
    data = response.json()["data"]
    assert [item["seed"] for item in data] == [10, 11, 12]
    assert data[1] == {"seed": 11, "error": ITEM_ERROR}
    for item in (data[0], data[2]):
        assert set(item) == {"seed", response_format}
    if response_format == "b64_json":
        assert decode(data[2]["b64_json"]).getpixel((0, 0)) == (12, 0, 0)
    # openai 3.x reads the answer: the flagged item is an Image with no b64_json and no url,
    # and the error as an extra field.
    parsed = OpenAIImage.model_validate(data[1])
    assert (parsed.b64_json, parsed.url) == (None, None)
    assert parsed.model_extra == {"seed": 11, "error": ITEM_ERROR}


def test_every_image_flagged_is_a_400_content_policy_violation(
    client: TestClient, painter: SeedPainter
) -> None:
    painter.outcome = withheld(10)
    response = client.post("/images/generations", json={**BODY, "n": 1})
    assert response.status_code == 400
    assert response.json() == {"error": CONTENT_POLICY_ERROR}


def test_a_stream_sends_the_images_then_an_error_event_per_flagged_one(
    client: TestClient, painter: SeedPainter
) -> None:
    painter.outcome = withheld(10, kept=(11, 12))
    response = client.post("/images/generations", json={**BODY, "stream": True})
    events = sse_events(response.text)
    assert [(name, data.get("seed")) for name, data in events] == [
        ("image_generation.completed", 11),
        ("image_generation.completed", 12),
        ("error", 10),
    ]
    assert events[2][1] == {"type": "error", "error": CONTENT_POLICY_ERROR, "seed": 10}


def test_a_stream_whose_every_image_is_flagged_is_the_400(
    client: TestClient, painter: SeedPainter
) -> None:
    painter.outcome = withheld(10)
    response = client.post("/images/generations", json={**BODY, "n": 1, "stream": True})
    assert response.status_code == 400
    assert response.json() == {"error": CONTENT_POLICY_ERROR}


def test_an_image_job_keeps_the_flagged_item_or_fails_for_good(
    serving: ImagesServing, painter: SeedPainter
) -> None:
    request = ImageGenerationRequest.model_validate(BODY)

    async def job_answer() -> object:
        resolved = await serving.resolve(GENERATION, request)
        return await serving.render(resolved, "http://testserver/v1")

    painter.outcome = withheld(12, kept=(10, 11))
    response = asyncio.run(job_answer())
    result = response.model_dump(mode="json", exclude_none=True)  # as the job stores it
    assert result["data"][2] == {"seed": 12, "error": ITEM_ERROR}

    painter.outcome = withheld(10, 11, 12)
    with pytest.raises(APIError) as failed:
        asyncio.run(job_answer())
    assert failed.value.status == 400 and failed.value.body() == {"error": CONTENT_POLICY_ERROR}
    # Not run again: the same seeds would be flagged again.
    decision = RetryPolicy(max_attempts=3).after_outcome(failed.value.outcome, attempts=1)
    assert decision.verdict is Verdict.FAIL
