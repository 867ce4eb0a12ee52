"""The HTTP app and ImagesServing in-process, with a pipeline that paints seeds."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from sdxl_service.files import LocalFileStore
from sdxl_service.http_app import create_app
from sdxl_service.jobs import GenerationJob, GenerationOutcome, OutcomeStatus, RenderedImage
from sdxl_service.serving import QUALITY_STEPS, ImagesServing
from sdxl_service.settings import Settings


class SeedPainter:
    """Stands in for the pipeline process: one flat colour per seed."""

    def __init__(self, native: int = 128) -> None:
        self.native = native
        self.jobs: list[GenerationJob] = []
        self.outcome: GenerationOutcome | None = None
        self.loaded = True
        self.cancelled: list[str] = []

    async def generate(self, job: GenerationJob) -> GenerationOutcome:
        self.jobs.append(job)
        if self.outcome is not None:
            return self.outcome
        images = [
            RenderedImage(
                seed=seed,
                width=job.width,
                height=job.height,
                rgb=bytes([seed % 256, 0, 0]) * (job.width * job.height),
            )
            for seed in job.seeds
        ]
        return GenerationOutcome(status=OutcomeStatus.OK, images=images)

    async def cancel(self, request_id: str) -> bool:
        self.cancelled.append(request_id)
        return True

    async def describe(self) -> dict[str, Any]:
        if not self.loaded:
            return {"loaded": False}
        return {"loaded": True, "preset": "tiny", "native_resolution": self.native}


@pytest.fixture
def painter() -> SeedPainter:
    return SeedPainter()


@pytest.fixture
def client(painter: SeedPainter, tmp_path) -> TestClient:
    settings = Settings(files_dir=tmp_path, max_body_bytes=10_000)
    serving = ImagesServing(settings, painter, LocalFileStore(tmp_path, 60))
    return TestClient(create_app(lambda: serving, settings.max_body_bytes))


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_small_request_renders_native_and_answers_requested_size(client, painter) -> None:
    response = client.post("/images/generations", json={"prompt": "x", "size": "128x64", "seed": 9})
    assert response.status_code == 200
    job = painter.jobs[-1]
    assert job.width * job.height >= 128 * 128 * 0.95
    image = decode(response.json()["data"][0]["b64_json"])
    assert image.size == (128, 64)
    assert np.asarray(image)[0, 0, 0] == 9


def test_seeds_are_consecutive_and_returned(client, painter) -> None:
    data = client.post(
        "/images/generations", json={"prompt": "x", "n": 3, "seed": 0, "size": "64x64"}
    ).json()
    assert [d["seed"] for d in data["data"]] == [0, 1, 2]
    assert painter.jobs[-1].seeds == [0, 1, 2]


def test_random_seed_when_none_given(client, painter) -> None:
    client.post("/images/generations", json={"prompt": "x", "size": "64x64"})
    client.post("/images/generations", json={"prompt": "x", "size": "64x64"})
    assert painter.jobs[0].seeds != painter.jobs[1].seeds


def test_quality_maps_to_steps_and_steps_override(client, painter) -> None:
    client.post("/images/generations", json={"prompt": "x", "quality": "hd", "size": "64x64"})
    assert painter.jobs[-1].steps == QUALITY_STEPS["hd"]
    client.post(
        "/images/generations",
        json={"prompt": "x", "quality": "hd", "size": "64x64", "num_inference_steps": 7},
    )
    assert painter.jobs[-1].steps == 7


def test_auto_size_is_1024(client, painter) -> None:
    data = client.post("/images/generations", json={"prompt": "x", "size": "auto"}).json()
    assert data["size"] == "1024x1024"


def test_url_response_is_stored_and_served(client) -> None:
    data = client.post(
        "/images/generations",
        json={"prompt": "x", "size": "64x64", "response_format": "url", "output_format": "webp"},
    ).json()
    url = data["data"][0]["url"]
    assert url.startswith("http://testserver/images/files/")
    served = client.get(url.removeprefix("http://testserver"))
    assert served.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(served.content)).format == "WEBP"


@pytest.mark.parametrize(
    ("status", "http_status", "code", "should_retry"),
    [
        (OutcomeStatus.QUEUE_FULL, 429, "queue_full", "true"),
        (OutcomeStatus.LOADING, 503, "loading", "true"),
        (OutcomeStatus.TIMEOUT, 504, "timeout", "false"),
        (OutcomeStatus.OUT_OF_MEMORY, 503, "out_of_memory", "false"),
        (OutcomeStatus.ERROR, 500, "generation_failed", "false"),
    ],
)
def test_outcomes_become_openai_errors(
    client, painter, status, http_status, code, should_retry
) -> None:
    painter.outcome = GenerationOutcome(status=status, message="explained", retry_after=7)
    response = client.post("/images/generations", json={"prompt": "x", "size": "64x64"})
    assert response.status_code == http_status
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["message"] == "explained"
    assert response.headers["x-should-retry"] == should_retry
    if should_retry == "true":
        assert response.headers["retry-after"] == "7"


def test_loading_pipeline_is_503_with_retry_after(client, painter) -> None:
    painter.loaded = False
    response = client.post("/images/generations", json={"prompt": "x"})
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) >= 1
    assert response.json()["error"]["code"] == "loading"


def test_model_names(client) -> None:
    for model in ("stable-diffusion-xl-with-refiner", "dall-e-3", "gpt-image-1", None):
        body = {"prompt": "x", "size": "64x64", "model": model}
        assert client.post("/images/generations", json=body).status_code == 200
    response = client.post("/images/generations", json={"prompt": "x", "model": "sd-1.5"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


def test_validation_never_leaks_fastapi_shape(client) -> None:
    response = client.post("/images/generations", json={"prompt": "x", "n": "many"})
    assert response.status_code == 400
    assert "detail" not in response.json()
    assert response.json()["error"]["param"] == "n"


def test_body_limit_without_content_length(client) -> None:
    def chunks():
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"x" * 1000
        yield b'"}'

    response = client.post(
        "/images/generations", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_large"


def test_models_list_warns_for_tiny(client) -> None:
    card = client.get("/models").json()["data"][0]
    assert card["id"] == "stable-diffusion-xl-with-refiner"
    assert card["preset"] == "tiny" and "noise" in card["warning"]


def test_unknown_paths_and_methods_are_openai_errors(client) -> None:
    response = client.get("/no/such/path")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    response = client.delete("/images/generations")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_expired_url_files_are_purged_when_new_ones_are_stored(painter, tmp_path) -> None:
    store = LocalFileStore(tmp_path, ttl_seconds=0)
    serving = ImagesServing(Settings(files_dir=tmp_path), painter, store)
    client = TestClient(create_app(lambda: serving, 10_000))
    body = {"prompt": "x", "size": "64x64", "response_format": "url"}
    client.post("/images/generations", json=body)
    serving._last_purge = 0.0  # the first sweep ran before the file existed
    client.post("/images/generations", json=body)
    assert list(tmp_path.glob("*.json")) == []


def test_stream_sends_one_completed_event_per_image(client) -> None:
    body = {"prompt": "x", "size": "64x64", "n": 2, "seed": 4, "stream": True}
    response = client.post("/images/generations", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [block for block in response.text.split("\n\n") if block]
    assert len(events) == 2
    for event, seed in zip(events, (4, 5), strict=True):
        name, data = event.split("\n")
        assert name == "event: image_generation.completed"
        payload = json.loads(data.removeprefix("data: "))
        assert payload["type"] == "image_generation.completed"
        assert payload["seed"] == seed
        assert decode(payload["b64_json"]).size == (64, 64)
