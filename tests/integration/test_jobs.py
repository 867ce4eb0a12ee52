"""Image jobs against the real service (`bentoml serve`, tiny preset): a job's result is the
synchronous answer, and jobs survive the whole service being killed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from sdxl_service.api.jobs import Database, JobStore
from sdxl_service.api.jobs.answers import ImageJob, ImageJobList
from sdxl_service.api.jobs.migrations import HISTORY_TABLE, SCHEMA_VERSION
from tests.decoded import pixels
from tests.polling import metric, wait_until
from tests.postgres_server import postgres_bin, running_postgres
from tests.service_process import (
    RunningService,
    kill_service,
    running_service,
    start_service,
    stop_service,
)
from tests.webhook_receiver import running_receiver

pytestmark = pytest.mark.integration

FINISHED = ("succeeded", "failed", "cancelled")


def job_of(http: httpx.Client, job_id: str) -> dict[str, Any]:
    response = http.get(f"/images/jobs/{job_id}")
    assert response.status_code == 200, response.text
    ImageJob.model_validate(response.json())  # every answer read, as documented
    return response.json()  # type: ignore[no-any-return]


def wait_for_end(http: httpx.Client, job_id: str, timeout: float = 240) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        job = job_of(http, job_id)
        return job if job["status"] in FINISHED else None

    return wait_until(ended, timeout=timeout, interval=0.2, message=f"job {job_id} to end")


def same_pixels(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert [d["seed"] for d in a["data"]] == [d["seed"] for d in b["data"]]
    for x, y in zip(a["data"], b["data"], strict=True):
        assert np.array_equal(pixels(x["b64_json"]), pixels(y["b64_json"]))


def test_a_job_ends_with_the_synchronous_answer(http: httpx.Client) -> None:
    body = {"prompt": "a lighthouse", "size": "64x64", "n": 2, "seed": 1234}
    submitted = http.post("/images/jobs", json=body)
    assert submitted.status_code == 202, submitted.text
    ImageJob.model_validate(submitted.json())
    location = submitted.headers["location"]
    assert location == f"{str(http.base_url).rstrip('/')}/images/jobs/{submitted.json()['id']}"
    assert httpx.get(location, timeout=30).json()["id"] == submitted.json()["id"]
    job = wait_for_end(http, submitted.json()["id"])
    assert job["status"] == "succeeded", job
    assert job["progress"]["images_done"] == 2
    sync = http.post("/images/generations", json=body)
    assert sync.status_code == 200
    same_pixels(job["result"], sync.json())
    assert job["result"]["size"] == sync.json()["size"] == "64x64"
    assert http.get("/images/jobs/imgjob_unknown").json()["error"]["param"] == "job_id"


def test_a_running_job_shows_its_steps_and_cancel_stops_its_render(
    http: httpx.Client, service: RunningService
) -> None:
    body = {"prompt": "a long render", "size": "256x256", "num_inference_steps": 150}
    job_id = http.post("/images/jobs", json=body).json()["id"]
    stepping = wait_until(
        lambda: (job := job_of(http, job_id))["progress"]["step"] >= 2 and job,
        timeout=120,
        interval=0.1,
        message="the job's progress",
    )
    assert stepping["status"] == "running" and stepping["progress"]["steps"] == 150
    cancelled_before = metric(service.root, "sdxl_rejected_total", reason="cancelled")
    cancelled = http.post(f"/images/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    # The render worker itself gave the images up (at its next step), as for a disconnect.
    wait_until(
        lambda: (
            metric(service.root, "sdxl_rejected_total", reason="cancelled") >= cancelled_before + 1
        ),
        timeout=60,
        message="the render worker to stop the job",
    )
    job = job_of(http, job_id)
    assert job["status"] == "cancelled" and job["progress"]["step"] < 150
    assert job["result"] is None and job["error"]["code"] == "cancelled"
    assert http.delete(f"/images/jobs/{job_id}").json()["deleted"] is True


def test_jobs_queued_and_running_when_the_service_is_killed_end_succeeded_after_it_restarts(
    tmp_path: Path,
) -> None:
    shared = {
        "SDXL_JOBS_DATABASE_URL": f"sqlite:///{tmp_path / 'jobs.sqlite3'}",
        "SDXL_FILES_DIR": str(tmp_path / "files"),
        # One job at a time: the others wait in the store while it renders.
        "SDXL_MAX_BATCH_IMAGES": "1",
    }
    bodies = [
        {"prompt": f"job {i}", "size": "256x256", "seed": 500 + 10 * i, "num_inference_steps": 40}
        for i in range(4)
    ]
    first = start_service(tmp_path / "first", shared)
    try:
        with httpx.Client(base_url=first.api, timeout=60) as http:
            ids = []
            for body in bodies:
                response = http.post("/images/jobs", json=body)
                assert response.status_code == 202, response.text
                ids.append(response.json()["id"])

            def one_running_others_queued() -> bool:
                statuses = [job_of(http, i)["status"] for i in ids]
                return statuses.count("running") == 1 and statuses.count("queued") >= 2

            wait_until(one_running_others_queued, timeout=120, message="one job running")
            before = {i: job_of(http, i)["status"] for i in ids}
    finally:
        kill_service(first)
    assert "running" in before.values() and list(before.values()).count("queued") >= 2

    with (
        running_service(tmp_path / "second", shared) as second,
        httpx.Client(base_url=second.api, timeout=120) as http,
    ):
        jobs = [wait_for_end(http, i) for i in ids]
        assert [j["status"] for j in jobs] == ["succeeded"] * 4, jobs
        for job, body in zip(jobs, bodies, strict=True):
            assert [d["seed"] for d in job["result"]["data"]] == [body["seed"]]
            sync = http.post("/images/generations", json=body)
            assert sync.status_code == 200
            same_pixels(job["result"], sync.json())
        # The job that was running when the service died ran a second time.
        running_before = next(i for i, s in before.items() if s == "running")
        attempts = {job["id"]: job["attempts"] for job in jobs}
        assert attempts[running_before] == 2


SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def test_jobs_on_postgresql_with_api_keys_and_a_signed_webhook(tmp_path: Path) -> None:
    """The service on Debian's PostgreSQL, with keys, posting a webhook to a real receiver
    that fails twice then accepts, and refusing a private address."""
    if postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed (make postgres)")
    with (
        running_postgres() as postgres,
        running_receiver(SECRET, answers=[500, 500]) as receiver,
    ):
        env = {
            "SDXL_JOBS_DATABASE_URL": postgres.new_database(),
            "SDXL_API_KEYS": "key-alice,key-bob",
            "SDXL_WEBHOOK_SECRET": SECRET,
            "SDXL_WEBHOOK_HOSTS": "127.0.0.1",
            "SDXL_WEBHOOK_RETRY_SECONDS": "0.2",
        }
        with (
            running_service(tmp_path / "svc", env) as service,
            httpx.Client(
                base_url=service.api, timeout=60, headers={"authorization": "Bearer key-alice"}
            ) as alice,
            httpx.Client(
                base_url=service.api, timeout=60, headers={"authorization": "Bearer key-bob"}
            ) as bob,
        ):
            body = {"prompt": "a kite", "size": "64x64", "seed": 77}
            refused = alice.post("/images/jobs", json={**body, "webhook_url": "http://10.9.8.7/h"})
            assert refused.status_code == 400
            assert refused.json()["error"]["param"] == "webhook_url"
            submitted = alice.post("/images/jobs", json={**body, "webhook_url": receiver.url})
            assert submitted.status_code == 202, submitted.text
            job_id = submitted.json()["id"]
            missing = bob.get(f"/images/jobs/{job_id}")
            assert missing.status_code == 404 and missing.json()["error"]["param"] == "job_id"
            assert bob.get("/images/jobs").json()["data"] == []

            def delivered() -> dict[str, Any] | None:
                job = job_of(alice, job_id)
                return job if job["webhook"]["state"] in ("delivered", "failed") else None

            job = wait_until(delivered, timeout=240, interval=0.2, message="the webhook")
            assert job["status"] == "succeeded"
            assert job["webhook"]["state"] == "delivered"
            assert [a["status_code"] for a in job["webhook"]["attempts"]] == [500, 500, 204]
            assert [d.verified for d in receiver.deliveries] == [True, True, True]
            event = json.loads(receiver.deliveries[-1].body)
            assert event["type"] == "image.job.succeeded" and event["data"]["id"] == job_id
            same_pixels(job["result"], alice.post("/images/generations", json=body).json())
            assert [j["id"] for j in alice.get("/images/jobs").json()["data"]] == [job_id]
            assert ImageJobList.model_validate(alice.get("/images/jobs").json()).data[0].webhook


def test_a_job_database_newer_than_the_release_stops_the_service_at_start(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    database = Database(url)
    JobStore(database)
    database.execute(
        f"INSERT INTO {HISTORY_TABLE} (version, name, applied_at) VALUES (?, 'future', 0)",
        (SCHEMA_VERSION + 1,),
    )
    database.close()
    service = start_service(tmp_path / "svc", {"SDXL_JOBS_DATABASE_URL": url}, wait_ready=False)
    try:
        wait_until(lambda: service.process.poll() is not None, timeout=60, message="an exit")
    finally:
        stop_service(service)
    assert service.process.returncode != 0
    assert f"schema version {SCHEMA_VERSION + 1}, newer than this release's" in service.log_tail()
