"""The safety checker through the real service: `bentoml serve` with SDXL_SAFETY_CHECKER set to
a tiny StableDiffusionSafetyChecker (tests/safety_checkers.py) that flags the image of seed 500
and not that of seed 501, both rendered first in this process by the same tiny engine and
request rules as the service's, then driven by the openai 3.x client and raw HTTP (image jobs).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch
from openai import OpenAI
from PIL import Image

from sdxl_service.api.request_kinds import GENERATION
from sdxl_service.api.schemas import ImageGenerationRequest
from sdxl_service.engine.config import EngineConfig
from sdxl_service.engine.render_batch import RenderBatch, image_tasks
from sdxl_service.settings import Preset, Settings
from tests import safety_checkers
from tests.decoded import pixels
from tests.polling import metric, wait_until
from tests.service_process import REPO, RunningService, running_service

pytestmark = pytest.mark.integration

FLAGGED_SEED, KEPT_SEED = 500, 501
CODE = "content_policy_violation"


@pytest.fixture(scope="module")
def stock() -> tuple[dict[str, Any], dict[int, Image.Image]]:
    """A request body at the tiny model's native size, and the images of seeds 500 and 501 as
    the service renders them without a checker (the same engine, settings and request rules)."""
    from sdxl_service.engine import Engine

    settings = Settings(preset=Preset.TINY, cache_dir=REPO / ".cache" / "sdxl-service", steps=6)
    engine = Engine.load(EngineConfig.of(settings))
    side = engine.native_resolution
    body = {"prompt": "a red fox in the snow", "size": f"{side}x{side}", "seed": FLAGGED_SEED}
    request = ImageGenerationRequest.model_validate({**body, "n": 2})
    job = GENERATION.resolve(request, None, settings, side).job
    # With the render worker's torch threads (a fresh process's): in a whole-suite run
    # tests/unit/conftest.py has pinned this process to one, and other thread counts sum
    # in another order (pixels 1 apart).
    pinned = torch.get_num_threads()
    torch.set_num_threads(fresh_process_threads())
    try:
        rendered = engine.render(RenderBatch(params=job.params, tasks=image_tasks(job)))
    finally:
        torch.set_num_threads(pinned)
    return body, dict(zip(job.seeds, rendered, strict=True))


def fresh_process_threads() -> int:
    probe = "import torch; print(torch.get_num_threads())"
    found = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    return int(found.stdout)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, stock) -> Iterator[RunningService]:
    _, images = stock
    checker = safety_checkers.diffusers_checker(
        tmp_path_factory.mktemp("checker"),
        images[FLAGGED_SEED],
        [images[KEPT_SEED]],
        pipeline_layout=False,
    )
    env = {"SDXL_SAFETY_CHECKER": str(checker)}
    with running_service(tmp_path_factory.mktemp("service"), env) as running:
        yield running


@pytest.fixture
def client(service: RunningService) -> OpenAI:
    return OpenAI(base_url=service.api, api_key="x", max_retries=0, timeout=120)


@pytest.fixture
def http(service: RunningService) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.api, timeout=120) as client:
        yield client


def generate(client: OpenAI, body: dict[str, Any], **extra: Any) -> Any:
    return client.images.generate(
        prompt=body["prompt"], size=body["size"], extra_body={"seed": body["seed"]}, **extra
    )


def test_a_flagged_single_image_is_a_400_content_policy_violation(client: OpenAI, stock) -> None:
    body, _ = stock
    with pytest.raises(openai.BadRequestError) as refused:
        generate(client, body, n=1)
    assert refused.value.status_code == 400
    assert refused.value.code == CODE
    assert refused.value.type == "invalid_request_error"
    assert refused.value.param is None
    assert "safety system" in refused.value.message


def test_a_batch_of_two_with_one_flagged_returns_the_other_and_a_flagged_item(
    client: OpenAI, stock, service: RunningService
) -> None:
    body, images = stock
    flagged_before = metric(service.root, "sdxl_images_flagged_total")
    answer = generate(client, body, n=2)
    assert answer.data is not None and len(answer.data) == 2
    flagged, kept = answer.data
    assert (flagged.b64_json, flagged.url) == (None, None)
    assert flagged.model_extra is not None
    assert flagged.model_extra["seed"] == FLAGGED_SEED
    assert flagged.model_extra["error"]["code"] == CODE
    assert kept.model_extra is not None and kept.model_extra["seed"] == KEPT_SEED
    assert kept.b64_json is not None
    assert np.array_equal(pixels(kept.b64_json), np.asarray(images[KEPT_SEED]))
    assert metric(service.root, "sdxl_images_flagged_total") == flagged_before + 1


def test_a_stream_sends_no_previews_and_the_flagged_image_as_an_error_event(
    client: OpenAI, stock
) -> None:
    body, images = stock
    stream = generate(client, body, n=2, stream=True, partial_images=2)
    received = []
    with pytest.raises(openai.APIError) as ended:
        for event in stream:
            received.append(event)
    assert [event.type for event in received] == ["image_generation.completed"]
    assert np.array_equal(pixels(received[0].b64_json), np.asarray(images[KEPT_SEED]))
    assert ended.value.body == {
        "message": ended.value.message,
        "type": "invalid_request_error",
        "param": None,
        "code": CODE,
    }


def wait_for_end(http: httpx.Client, job_id: str) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        job: dict[str, Any] = http.get(f"/images/jobs/{job_id}").json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    return wait_until(ended, timeout=240, interval=0.2, message=f"job {job_id} to end")


def test_image_jobs_keep_the_flagged_item_or_fail_with_content_policy_violation(
    http: httpx.Client, stock
) -> None:
    body, images = stock
    two = http.post("/images/jobs", json={**body, "n": 2})
    one = http.post("/images/jobs", json={**body, "n": 1})
    assert two.status_code == one.status_code == 202
    partly = wait_for_end(http, two.json()["id"])
    assert partly["status"] == "succeeded", partly
    flagged, kept = partly["result"]["data"]
    assert flagged == {"seed": FLAGGED_SEED, "error": flagged["error"]}
    assert flagged["error"]["code"] == CODE
    assert np.array_equal(pixels(kept["b64_json"]), np.asarray(images[KEPT_SEED]))
    failed = wait_for_end(http, one.json()["id"])
    assert failed["status"] == "failed", failed
    assert failed["error"]["code"] == CODE
    assert failed["attempts"] == 1


LEGACY = """
import json, sys
import openai
openai.api_base = sys.argv[1]
openai.api_key = "random-string"
seed = int(sys.argv[2])
out = {}
answer = openai.Image.create(prompt="a red fox in the snow", n=2, size=sys.argv[3], seed=seed)
out["items"] = [sorted(item.keys()) for item in answer["data"]]
out["flagged_code"] = answer["data"][0]["error"]["code"]
try:
    openai.Image.create(prompt="a red fox in the snow", n=1, size=sys.argv[3], seed=seed)
    out["single"] = "no error"
except openai.error.OpenAIError as exc:
    out["single"] = [type(exc).__name__, exc.http_status, exc.code]
print(json.dumps(out))
"""


def test_the_legacy_client_reads_both_answers(service: RunningService, stock) -> None:
    from tests.integration.test_legacy_client import run_legacy

    body, _ = stock
    out = run_legacy(LEGACY, service.api, str(FLAGGED_SEED), body["size"])
    assert out == {
        "items": [["error", "seed"], ["b64_json", "seed"]],
        "flagged_code": CODE,
        "single": ["InvalidRequestError", 400, CODE],
    }
