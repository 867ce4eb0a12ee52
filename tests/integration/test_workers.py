"""Two render workers behind one `bentoml serve` (SDXL_WORKERS=2, tiny preset, CPU).

Each worker renders and counts its own images; the queue limit counts both;
a client that leaves stops its work on the worker that holds it, not on the
other; a killed worker leaves the other serving, /readyz says not ready until
the new one has loaded, and the new one serves.
"""

from __future__ import annotations

import json
import signal
import socket
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil
import pytest

from tests.polling import metric, wait_until
from tests.service_process import RunningService, running_service

pytestmark = pytest.mark.integration

WORKERS = 2
QUEUE_LIMIT = 6
# About 6 s of rendering here (one core per worker): still running when we act.
LONG_JOB = {"prompt": "long", "size": "512x512", "num_inference_steps": 100}
KEPT_JOB = {**LONG_JOB, "num_inference_steps": 150}
SHORT_JOB = {"prompt": "short", "size": "64x64", "num_inference_steps": 2}
STATE_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    env = {"SDXL_WORKERS": str(WORKERS), "SDXL_MAX_QUEUE_IMAGES": str(QUEUE_LIMIT)}
    with running_service(tmp_path_factory.mktemp("workers"), env) as running:
        yield running


def render_workers(service: RunningService) -> dict[int, psutil.Process]:
    """The render worker processes by BentoML worker index (circus' --worker-id)."""
    found = {}
    for process in psutil.Process(service.process.pid).children(recursive=True):
        command = process.cmdline()
        if "--service-name" in command and "sdxl-renderer" in command:
            found[int(command[command.index("--worker-id") + 1])] = process
    return found


def raw_post(path: str, body: dict[str, object]) -> bytes:
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


def held(service: RunningService, worker: int) -> float:
    return metric(service.root, "sdxl_requests_in_flight", worker=str(worker))


def holding_worker(service: RunningService) -> int:
    """The one worker holding a request now."""
    holders = [w for w in range(1, WORKERS + 1) if held(service, w) >= 1]
    assert len(holders) == 1, holders
    return holders[0]


def test_readyz_waited_for_both_workers_and_both_render(service: RunningService) -> None:
    assert sorted(render_workers(service)) == [1, 2]
    # One long request holds a worker; a second one goes to the idle worker.
    with ThreadPoolExecutor(2) as pool, httpx.Client(base_url=service.api, timeout=300) as http:
        long_call = pool.submit(http.post, "/images/generations", json=LONG_JOB)
        wait_until(
            lambda: sum(held(service, w) for w in (1, 2)) >= 1,
            timeout=STATE_TIMEOUT_S,
            message="the long request to reach a worker",
        )
        busy = holding_worker(service)
        idle = 3 - busy
        before = metric(service.root, "sdxl_images_generated_total", worker=str(idle))
        short = http.post("/images/generations", json=SHORT_JOB)
        assert short.status_code == 200, short.text
        assert metric(service.root, "sdxl_images_generated_total", worker=str(idle)) == before + 1
        assert not long_call.done(), "the short request waited behind the long one"
        assert long_call.result(timeout=STATE_TIMEOUT_S).status_code == 200
    for worker in (1, 2):
        assert metric(service.root, "sdxl_images_generated_total", worker=str(worker)) >= 1
        assert metric(service.root, "sdxl_batch_images_count", worker=str(worker)) >= 1


def test_the_queue_limit_counts_the_images_of_both_workers(service: RunningService) -> None:
    with ThreadPoolExecutor(2) as pool, httpx.Client(base_url=service.api, timeout=300) as http:
        calls: list[Future[httpx.Response]] = []
        for _ in range(2):
            calls.append(pool.submit(http.post, "/images/generations", json={**LONG_JOB, "n": 3}))
        wait_until(
            lambda: held(service, 1) + held(service, 2) >= 2,
            timeout=STATE_TIMEOUT_S,
            message="both requests to reach the workers",
        )
        # 6 images held across the two workers: the limit, whatever each holds.
        refused = http.post("/images/generations", json=SHORT_JOB)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "queue_full"
        assert int(refused.headers["retry-after"]) >= 1
        for call in calls:
            assert call.result(timeout=STATE_TIMEOUT_S).status_code == 200


def test_a_client_that_leaves_stops_its_work_on_the_worker_that_holds_it(
    service: RunningService,
) -> None:
    cancelled = metric(service.root, "sdxl_rejected_total", reason="cancelled")
    with ThreadPoolExecutor(1) as pool, httpx.Client(base_url=service.api, timeout=300) as http:
        # Longer than LONG_JOB: it must outlast everything the test does beside it.
        stays = pool.submit(http.post, "/images/generations", json=KEPT_JOB)
        wait_until(
            lambda: held(service, 1) + held(service, 2) >= 1,
            timeout=STATE_TIMEOUT_S,
            message="the first request to reach a worker",
        )
        kept = holding_worker(service)
        other = 3 - kept
        # The second client goes away while its images render on the other worker.
        with socket.create_connection(("127.0.0.1", urlsplit(service.root).port)) as leaving:
            leaving.sendall(raw_post("/v1/images/generations", LONG_JOB))
            wait_until(
                lambda: held(service, other) >= 1,
                timeout=STATE_TIMEOUT_S,
                message="the second request to reach the other worker",
            )
        wait_until(
            lambda: held(service, other) == 0,
            timeout=STATE_TIMEOUT_S,
            message="the worker of the client that left to drop its request",
        )
        assert metric(service.root, "sdxl_rejected_total", reason="cancelled") >= cancelled + 1
        assert held(service, kept) == 1 and not stays.done()
        assert stays.result(timeout=STATE_TIMEOUT_S).status_code == 200


def test_a_killed_worker_leaves_the_other_serving_and_comes_back(
    service: RunningService, tmp_path: Path
) -> None:
    workers = render_workers(service)
    starts = metric(service.root, "sdxl_render_worker_starts_total", worker="1")
    workers[1].send_signal(signal.SIGKILL)
    wait_until(
        lambda: not workers[1].is_running() or workers[1].status() == psutil.STATUS_ZOMBIE,
        timeout=STATE_TIMEOUT_S,
        message="worker 1 to die",
    )
    # Not ready while a worker is down ...
    wait_until(
        lambda: httpx.get(f"{service.root}/readyz").status_code == 503,
        timeout=STATE_TIMEOUT_S,
        message="/readyz to say a worker is missing",
    )
    # ... and the other worker serves meanwhile.
    served = metric(service.root, "sdxl_images_generated_total", worker="2")
    response = httpx.post(f"{service.api}/images/generations", json=SHORT_JOB, timeout=120)
    assert response.status_code == 200, response.text
    assert metric(service.root, "sdxl_images_generated_total", worker="2") == served + 1

    wait_until(
        lambda: metric(service.root, "sdxl_render_worker_starts_total", worker="1") >= starts + 1,
        timeout=STATE_TIMEOUT_S,
        message="a new worker 1",
    )
    wait_until(
        lambda: httpx.get(f"{service.root}/readyz").status_code == 200,
        timeout=STATE_TIMEOUT_S,
        message="the new worker 1 to load",
    )
    assert render_workers(service)[1].pid != workers[1].pid
    assert render_workers(service)[2].pid == workers[2].pid


def test_a_stream_client_that_leaves_after_a_preview_stops_its_work(
    service: RunningService,
) -> None:
    cancelled = metric(service.root, "sdxl_rejected_total", reason="cancelled")
    body = {**LONG_JOB, "stream": True, "partial_images": 3}
    with (
        httpx.Client(base_url=service.api, timeout=300) as http,
        http.stream("POST", "/images/generations", json=body) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(lines) == "event: image_generation.partial_image"
        worker = holding_worker(service)
    # The connection is closed here, with two previews and the image to come.
    wait_until(
        lambda: held(service, worker) == 0,
        timeout=STATE_TIMEOUT_S,
        message="the worker to drop the request of the client that left",
    )
    assert metric(service.root, "sdxl_rejected_total", reason="cancelled") >= cancelled + 1
