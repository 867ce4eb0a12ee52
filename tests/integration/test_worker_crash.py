"""A render worker that dies while it makes a request's images (real service).

The request gets 503 `worker_restarted` at once (not after the new worker has
loaded), the crash is counted on /metrics, and the service serves again.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from tests.polling import metric, wait_until
from tests.service_process import RunningService, running_service

pytestmark = pytest.mark.integration

# Long enough on any CPU that the kill lands while it renders.
LONG_JOB = {"prompt": "long", "size": "512x512", "n": 2, "num_inference_steps": 150}
SHORT_JOB = {"prompt": "short", "size": "64x64", "num_inference_steps": 2}
STATE_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    with running_service(tmp_path_factory.mktemp("worker-crash")) as running:
        yield running


def render_worker(service: RunningService) -> psutil.Process:
    for process in psutil.Process(service.process.pid).children(recursive=True):
        command = process.cmdline()
        if "--service-name" in command and "sdxl-renderer" in command:
            return process
    raise AssertionError("no render worker process")


def test_a_killed_render_worker_answers_its_request_at_once_and_comes_back(
    service: RunningService, tmp_path: Path
) -> None:
    starts = metric(service.root, "sdxl_render_worker_starts_total")
    worker = render_worker(service)
    with ThreadPoolExecutor(1) as pool, httpx.Client(base_url=service.api, timeout=300) as http:
        answer = pool.submit(http.post, "/images/generations", json=LONG_JOB)
        wait_until(
            lambda: metric(service.root, "sdxl_requests_in_flight") >= 1,
            timeout=STATE_TIMEOUT_S,
            message="the long request to reach the render worker",
        )
        worker.send_signal(signal.SIGKILL)
        response = answer.result(timeout=STATE_TIMEOUT_S)
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "worker_restarted"
    assert response.headers["x-should-retry"] == "true"
    assert int(response.headers["retry-after"]) >= 1
    assert metric(service.root, "sdxl_render_calls_lost_total") >= 1

    # BentoML starts a new worker; it loads and serves.
    wait_until(
        lambda: metric(service.root, "sdxl_render_worker_starts_total") >= starts + 1,
        timeout=STATE_TIMEOUT_S,
        message="a new render worker",
    )
    wait_until(
        lambda: httpx.get(f"{service.root}/readyz").status_code == 200,
        timeout=STATE_TIMEOUT_S,
        message="the new render worker to load",
    )
    again = httpx.post(f"{service.api}/images/generations", json=SHORT_JOB, timeout=120)
    assert again.status_code == 200, again.text
    assert render_worker(service).pid != worker.pid
