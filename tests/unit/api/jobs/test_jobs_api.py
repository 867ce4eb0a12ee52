"""The /v1/images/jobs endpoints in-process: a real SQLite store, the real runner and serving path,
a pipeline that paints seeds (and can be held at work, to see jobs queued and running)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from sdxl_service.api.app import create_app
from sdxl_service.api.control_maps import fit_crop_and_resize
from sdxl_service.api.files import LocalFileStore
from sdxl_service.api.jobs import (
    Database,
    JobRecord,
    JobRunner,
    JobsServing,
    JobStore,
    webhook_delivery,
)
from sdxl_service.api.jobs.answers import ImageJob, ImageJobDeleted, ImageJobList
from sdxl_service.api.jobs.retry import RetryPolicy
from sdxl_service.api.jobs.runner import PROGRESS_S
from sdxl_service.api.serving import ImagesServing
from sdxl_service.contract.render_request import (
    GenerationOutcome,
    OutcomeStatus,
    RenderEvent,
    RenderEventType,
    RenderRequest,
)
from sdxl_service.settings import Settings
from tests.decoded import decode
from tests.polling import wait_until
from tests.unit.api.test_controlnets_api import write_folder
from tests.unit.api.test_serving import SeedPainter, noise, part
from tests.webhook_receiver import running_receiver

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


class HeldPainter(SeedPainter):
    """Paints seeds, but only while `open` is set: jobs can be seen queued and running."""

    def __init__(self) -> None:
        super().__init__()
        self.open = threading.Event()
        self.open.set()
        self.working = 0
        self.cancelled = 0

    async def generate(self, job: RenderRequest, on_partial: Any = None) -> GenerationOutcome:
        self.working += 1
        if job.report_progress and on_partial is not None:
            # Three steps made, then held: a running job shows how far it got.
            for step in (1, 2, 3):
                await on_partial(RenderEvent(type=RenderEventType.PROGRESS, step=step))
        try:
            while not self.open.is_set():
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.working -= 1
        return await super().generate(job, on_partial)


class Service:
    def __init__(self, tmp_path: Path, **overrides: Any) -> None:
        self.painter = HeldPainter()
        values: dict[str, Any] = {
            "files_dir": tmp_path / "files",
            "max_body_bytes": 1_000_000,
            "max_batch_images": 1,
            **overrides,
        }
        self.settings = Settings(**values)
        self.files = LocalFileStore(self.settings.files_dir, 60)
        self.images = ImagesServing(self.settings, self.painter, self.files)
        self.store = JobStore(Database.sqlite_file(tmp_path / "jobs.sqlite3"))
        self.runner = JobRunner(
            self.store, self.images, self.files, self.settings, webhook_delivery(self.settings)
        )
        self.refuse: GenerationOutcome | None = None
        self.jobs = JobsServing(
            self.settings, self.store, self.images, self.runner, admission=self._admission
        )
        app = create_app(lambda: self.images, 1_000_000, get_jobs=lambda: self.jobs)

        @contextlib.asynccontextmanager
        async def lifespan(_: Any) -> AsyncIterator[None]:
            self.runner.start()
            yield
            await self.runner.stop()

        app.router.lifespan_context = lifespan
        self.client = TestClient(app)

    def _admission(self, n: int, waiting: int) -> GenerationOutcome | None:
        return self.refuse

    def job(self, job_id: str, **headers: str) -> dict[str, Any]:
        response = self.client.get(f"/images/jobs/{job_id}", headers=headers)
        assert response.status_code == 200, response.text
        ImageJob.model_validate(response.json())  # every answer read, as documented
        return response.json()  # type: ignore[no-any-return]

    def ended(self, job_id: str, **headers: str) -> dict[str, Any]:
        def finished() -> dict[str, Any] | None:
            job = self.job(job_id, **headers)
            return job if job["status"] in ("succeeded", "failed", "cancelled") else None

        return wait_until(finished, timeout=30, message=f"job {job_id} to end")

    def status(self, job_id: str) -> str:
        return str(self.job(job_id)["status"])


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    running = Service(tmp_path)
    with running.client:
        yield running


def assert_error(response: Any, status: int, param: str | None, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code


def test_a_job_answers_202_at_once_and_ends_with_the_synchronous_answer(service: Service) -> None:
    body = {"prompt": "a fox", "size": "64x64", "n": 2, "seed": 40}
    response = service.client.post("/images/jobs", json={**body, "metadata": {"user": "7"}})
    assert response.status_code == 202
    job = response.json()
    assert job["id"].startswith("imgjob_") and len(job["id"]) > 40
    assert response.headers["location"] == f"http://testserver/images/jobs/{job['id']}"
    assert job["object"] == "image.job" and job["status"] in ("queued", "running")
    assert job["metadata"] == {"user": "7"}
    assert job["progress"] == {"step": 0, "steps": 30, "images_done": 0, "images": 2}
    ended = service.ended(job["id"])
    assert ended["status"] == "succeeded" and ended["error"] is None
    assert ended["progress"] == {"step": 30, "steps": 30, "images_done": 2, "images": 2}
    sync = service.client.post("/images/generations", json=body).json()
    result = ended["result"]
    assert {k: v for k, v in result.items() if k != "created"} == {
        k: v for k, v in sync.items() if k != "created"
    }
    assert [item["seed"] for item in result["data"]] == [40, 41]
    assert np.asarray(decode(result["data"][1]["b64_json"]))[0, 0, 0] == 41


def test_a_job_without_a_seed_gets_one_fixed_at_submission(service: Service) -> None:
    job = service.client.post("/images/jobs", json={"prompt": "x", "size": "64x64"}).json()
    stored = service.store.get(job["id"], now=0)
    assert stored is not None
    seed = stored.request["seed"]
    ended = service.ended(job["id"])
    assert ended["result"]["data"][0]["seed"] == seed
    assert service.painter.jobs[-1].seeds == [seed]


def test_jobs_wait_in_the_queue_with_their_position(service: Service) -> None:
    service.painter.open.clear()
    ids = [
        service.client.post("/images/jobs", json={"prompt": f"p{i}", "size": "64x64"}).json()["id"]
        for i in range(3)
    ]
    wait_until(lambda: service.status(ids[0]) == "running", message="the first job to run")
    positions = [service.job(i)["queue_position"] for i in ids]
    assert positions == [None, 0, 1]
    wait_until(
        lambda: service.job(ids[0])["progress"]["step"] == 3, message="the running job's progress"
    )
    assert service.job(ids[0])["progress"] == {
        "step": 3,
        "steps": 30,
        "images_done": 0,
        "images": 1,
    }
    service.painter.open.set()
    assert [service.ended(i)["status"] for i in ids] == ["succeeded"] * 3


def test_a_full_queue_is_429_and_stores_nothing(service: Service) -> None:
    service.refuse = GenerationOutcome(
        status=OutcomeStatus.QUEUE_FULL, message="server busy", retry_after=3
    )
    response = service.client.post("/images/jobs", json={"prompt": "x"})
    assert_error(response, 429, None, "queue_full")
    assert response.headers["retry-after"] == "3"
    assert service.client.get("/images/jobs").json()["data"] == []


def test_the_list_is_newest_first_in_pages(service: Service) -> None:
    ids = [
        service.client.post("/images/jobs", json={"prompt": f"p{i}", "size": "64x64"}).json()["id"]
        for i in range(5)
    ]
    first = service.client.get("/images/jobs", params={"limit": 2}).json()
    assert first["object"] == "list"
    assert [j["id"] for j in first["data"]] == [ids[4], ids[3]] and first["has_more"]
    assert (first["first_id"], first["last_id"]) == (ids[4], ids[3])
    rest = service.client.get("/images/jobs", params={"limit": 10, "after": ids[3]}).json()
    assert [j["id"] for j in rest["data"]] == [ids[2], ids[1], ids[0]] and not rest["has_more"]
    assert_error(service.client.get("/images/jobs", params={"limit": 0}), 400, "limit")
    assert_error(service.client.get("/images/jobs", params={"after": "imgjob_x"}), 400, "after")


def test_cancel_stops_a_running_job_and_a_queued_one(service: Service) -> None:
    service.painter.open.clear()
    running = service.client.post("/images/jobs", json={"prompt": "a", "size": "64x64"}).json()
    queued = service.client.post("/images/jobs", json={"prompt": "b", "size": "64x64"}).json()
    wait_until(lambda: service.painter.working == 1, message="the first job at work")
    for job in (queued, running):
        response = service.client.post(f"/images/jobs/{job['id']}/cancel")
        assert response.status_code == 200
        assert response.json()["status"] == "cancelled"
        assert response.json()["error"]["code"] == "cancelled"
    # The render itself was stopped, as a client's disconnect stops it.
    assert service.painter.cancelled == 1
    service.painter.open.set()
    assert service.status(queued["id"]) == "cancelled"
    assert len(service.painter.jobs) == 0
    again = service.client.post(f"/images/jobs/{running['id']}/cancel")
    assert_error(again, 409, "job_id", "job_finished")


def test_delete_removes_a_finished_job_and_its_files(service: Service) -> None:
    body = {"prompt": "x", "size": "64x64", "response_format": "url", "seed": 3}
    job = service.client.post("/images/jobs", json=body).json()
    ended = service.ended(job["id"])
    url = ended["result"]["data"][0]["url"]
    file_path = "/" + url.split("/v1/", 1)[-1] if "/v1/" in url else url.split("testserver", 1)[1]
    assert service.client.get(file_path).status_code == 200
    deleted = service.client.delete(f"/images/jobs/{job['id']}")
    assert deleted.json() == {"id": job["id"], "object": "image.job.deleted", "deleted": True}
    assert_error(service.client.get(f"/images/jobs/{job['id']}"), 404, "job_id", "job_not_found")
    assert_error(service.client.get(file_path), 404, "file_id")


def test_an_unfinished_job_is_not_deleted(service: Service) -> None:
    service.painter.open.clear()
    job = service.client.post("/images/jobs", json={"prompt": "x", "size": "64x64"}).json()
    assert_error(service.client.delete(f"/images/jobs/{job['id']}"), 409, "job_id")
    service.painter.open.set()


def test_an_edit_job_is_multipart_with_a_kind(service: Service) -> None:
    fields = {
        "kind": "edit",
        "prompt": "red",
        "size": "64x64",
        "seed": "5",
        "metadata": '{"a": "b"}',
    }
    response = service.client.post(
        "/images/jobs", data=fields, files={"image": part(noise(64, 64))}
    )
    assert response.status_code == 202, response.text
    assert response.json()["kind"] == "edit" and response.json()["metadata"] == {"a": "b"}
    ended = service.ended(response.json()["id"])
    assert ended["status"] == "succeeded"
    assert ended["result"]["data"][0]["seed"] == 5
    assert service.painter.jobs[-1].init_image is not None


def test_an_outpainting_edit_job_answers_the_canvas(service: Service) -> None:
    fields = {"kind": "edit", "prompt": "wider", "seed": "5", "outpaint": '{"left": 16}'}
    response = service.client.post(
        "/images/jobs", data=fields, files={"image": part(noise(64, 64))}
    )
    assert response.status_code == 202, response.text
    ended = service.ended(response.json()["id"])
    assert ended["status"] == "succeeded", ended
    assert decode(ended["result"]["data"][0]["b64_json"]).size == (80, 64)
    assert service.painter.jobs[-1].mask is not None
    refused = service.client.post(
        "/images/jobs",
        data={**fields, "outpaint": '{"left": -1}'},
        files={"image": part(noise(64, 64))},
    )
    assert_error(refused, 400, "outpaint.left")


def test_an_only_masked_edit_job_pastes_its_region_back(service: Service) -> None:
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (40, 40, 56, 56))
    fields = {"kind": "edit", "prompt": "x", "seed": "5", "mask_blur": "2"}
    response = service.client.post(
        "/images/jobs",
        data={**fields, "inpaint_area": "only_masked", "inpaint_padding": "4"},
        files={"image": part(noise(64, 64)), "mask": part(mask)},
    )
    assert response.status_code == 202, response.text
    ended = service.ended(response.json()["id"])
    assert ended["status"] == "succeeded", ended
    answer = np.asarray(decode(ended["result"]["data"][0]["b64_json"]))
    assert answer.shape == (64, 64, 3)
    assert (answer[46:50, 46:50] == (5, 0, 0)).all()
    assert np.array_equal(answer[:16, :16], np.asarray(noise(64, 64))[:16, :16])
    refused = service.client.post(
        "/images/jobs",
        data={**fields, "inpaint_padding": "4"},
        files={"image": part(noise(64, 64)), "mask": part(mask)},
    )
    assert_error(refused, 400, "inpaint_padding")


def test_an_upscale_is_a_job_kind_too(service: Service) -> None:
    fields = {"kind": "upscale", "scale": "2", "seed": "3", "num_inference_steps": "4"}
    response = service.client.post(
        "/images/jobs", data=fields, files={"image": part(noise(40, 32))}
    )
    assert response.status_code == 202, response.text
    assert response.json()["kind"] == "upscale"
    ended = service.ended(response.json()["id"])
    assert ended["status"] == "succeeded", ended
    image = decode(ended["result"]["data"][0]["b64_json"])
    assert image.size == (80, 64)
    rendered = service.painter.jobs[-1]
    assert rendered.init_image is not None and rendered.params.num_inference_steps == 4
    # As its synchronous endpoint: no mask, no size.
    refused = service.client.post(
        "/images/jobs", data={**fields, "size": "64x64"}, files={"image": part(noise(40, 32))}
    )
    assert_error(refused, 400, "size")


def test_an_upscale_job_takes_a_unit_without_an_image_as_its_picture(tmp_path: Path) -> None:
    folder = tmp_path / "controlnets"
    folder.mkdir()
    write_folder(folder, "tile-sdxl")
    service = Service(tmp_path, controlnet_dir=folder)
    with service.client:
        units = json.dumps([{"name": "tile-sdxl"}])
        fields = {"kind": "upscale", "scale": "2", "seed": "3", "controlnets": units}
        response = service.client.post(
            "/images/jobs", data=fields, files={"image": part(noise(40, 32))}
        )
        assert response.status_code == 202, response.text
        ended = service.ended(response.json()["id"])
        assert ended["status"] == "succeeded", ended
        rendered = service.painter.jobs[-1]
        assert [unit.name for unit in rendered.params.controlnets] == ["tile-sdxl"]
        size = (rendered.params.width, rendered.params.height)
        expected = fit_crop_and_resize(noise(40, 32), *size).tobytes()
        assert rendered.control_images == (expected,)


def test_the_submission_is_documented_per_kind(service: Service) -> None:
    schema = service.client.get("/openapi.json").json()
    body = schema["paths"]["/images/jobs"]["post"]["requestBody"]["content"]
    components = schema["components"]["schemas"]

    def model(ref: dict[str, str]) -> dict:
        return components[ref["$ref"].rpartition("/")[2]]

    generation = model(body["application/json"]["schema"])
    assert {"prompt", "num_inference_steps", "hires", "kind", "webhook_url", "metadata"} <= set(
        generation["properties"]
    )
    forms = {
        model(ref)["title"]: model(ref) for ref in body["multipart/form-data"]["schema"]["oneOf"]
    }
    assert set(forms) == {"EditJobSubmission", "VariationJobSubmission", "UpscaleJobSubmission"}
    for form in forms.values():
        assert {"kind", "image", "metadata"} <= set(form["required"]) | set(form["properties"])
        assert form["properties"]["image"]["format"] == "binary"
    assert "scale" in forms["UpscaleJobSubmission"]["properties"]
    # Every reference in the document resolves.
    for ref in re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(schema)):
        assert ref in components, ref


def test_bad_submissions_are_openai_errors_naming_the_parameter(service: Service) -> None:
    post = service.client.post
    assert_error(post("/images/jobs", json={"prompt": "x", "kind": "edit"}), 400, "kind")
    assert_error(
        post(
            "/images/jobs",
            data={"kind": "painting", "prompt": "x"},
            files={"image": part(noise(8, 8))},
        ),
        400,
        "kind",
    )
    assert_error(post("/images/jobs", json={"size": "64x64"}), 400, "prompt")
    assert_error(post("/images/jobs", json={"prompt": "x", "n": 0}), 400, "n")
    assert_error(post("/images/jobs", json={"prompt": "x", "stream": True}), 400, "stream")
    assert_error(post("/images/jobs", json={"prompt": "x", "metadata": [1]}), 400, "metadata")
    assert_error(
        post("/images/jobs", json={"prompt": "x", "metadata": {"k": "v" * 600}}), 400, "metadata"
    )
    # No SDXL_WEBHOOK_SECRET here: no webhook can be signed.
    no_secret = post("/images/jobs", json={"prompt": "x", "webhook_url": "https://example.com/h"})
    assert_error(no_secret, 400, "webhook_url", "webhooks_disabled")
    assert_error(
        post("/images/jobs", content=b"{", headers={"content-type": "application/json"}),
        400,
        None,
        "invalid_json",
    )
    assert_error(service.client.get("/images/jobs/imgjob_nope"), 404, "job_id", "job_not_found")
    assert_error(service.client.post("/images/jobs/imgjob_nope/cancel"), 404, "job_id")
    assert_error(service.client.delete("/images/jobs/imgjob_nope"), 404, "job_id")
    assert service.client.get("/images/jobs").json()["data"] == []


def test_a_bad_webhook_url_is_refused_before_anything_is_stored(tmp_path: Path) -> None:
    service = Service(tmp_path, webhook_secret=SECRET)
    with service.client:
        for url in (
            "ftp://example.com/x",
            "http://10.1.2.3/hook",
            "http://192.168.0.10/h",
            "http://[::1]:80/",
            "not a url",
        ):
            response = service.client.post("/images/jobs", json={"prompt": "x", "webhook_url": url})
            assert_error(response, 400, "webhook_url")
        assert service.client.get("/images/jobs").json()["data"] == []


def test_with_api_keys_a_key_sees_only_its_own_jobs(tmp_path: Path) -> None:
    service = Service(tmp_path, api_keys="key-a,key-b")
    alice, bob = {"authorization": "Bearer key-a"}, {"authorization": "Bearer key-b"}
    with service.client:
        job = service.client.post(
            "/images/jobs", json={"prompt": "x", "size": "64x64"}, headers=alice
        ).json()
        assert service.ended(job["id"], **alice)["status"] == "succeeded"
        for method, path in (
            ("GET", f"/images/jobs/{job['id']}"),
            ("POST", f"/images/jobs/{job['id']}/cancel"),
            ("DELETE", f"/images/jobs/{job['id']}"),
        ):
            assert_error(
                service.client.request(method, path, headers=bob), 404, "job_id", "job_not_found"
            )
        assert service.client.get("/images/jobs", headers=bob).json()["data"] == []
        assert [
            j["id"] for j in service.client.get("/images/jobs", headers=alice).json()["data"]
        ] == [job["id"]]


def test_a_job_with_a_webhook_is_posted_signed_when_it_ends_retries_recorded(
    tmp_path: Path,
) -> None:
    service = Service(
        tmp_path, webhook_secret=SECRET, webhook_hosts="127.0.0.1", webhook_retry_seconds=0.01
    )
    with service.client, running_receiver(SECRET, answers=[500, 502]) as receiver:
        body = {"prompt": "x", "size": "64x64", "seed": 9, "webhook_url": receiver.url}
        job = service.client.post("/images/jobs", json=body).json()
        assert job["webhook"] == {"url": receiver.url, "state": "pending", "attempts": []}

        def delivered() -> dict[str, Any] | None:
            read = service.job(job["id"])
            return read if read["webhook"]["state"] == "delivered" else None

        read = wait_until(delivered, timeout=30, message="the webhook delivered")
    assert [a["status_code"] for a in read["webhook"]["attempts"]] == [500, 502, 204]
    assert [d.verified for d in receiver.deliveries] == [True] * 3
    event = json.loads(receiver.deliveries[-1].body)
    assert event["type"] == "image.job.succeeded"
    assert event["data"]["id"] == job["id"] and event["data"]["status"] == "succeeded"
    assert event["data"]["result"]["data"][0]["seed"] == 9


def test_a_cancelled_job_sends_its_webhook_too(tmp_path: Path) -> None:
    service = Service(tmp_path, webhook_secret=SECRET, webhook_hosts="127.0.0.1")
    service.painter.open.clear()
    with service.client, running_receiver(SECRET) as receiver:
        body = {"prompt": "x", "size": "64x64", "webhook_url": receiver.url}
        job = service.client.post("/images/jobs", json=body).json()
        service.client.post(f"/images/jobs/{job['id']}/cancel")
        wait_until(lambda: receiver.deliveries, timeout=30, message="the webhook")
        service.painter.open.set()
    assert json.loads(receiver.deliveries[0].body)["type"] == "image.job.cancelled"


class LosingPainter(HeldPainter):
    """Its render worker dies under the first `losses` calls."""

    def __init__(self, losses: int) -> None:
        super().__init__()
        self.losses = losses

    async def generate(self, job: RenderRequest, on_partial: Any = None) -> GenerationOutcome:
        if self.losses > 0:
            self.losses -= 1
            self.jobs.append(job)
            return GenerationOutcome(
                status=OutcomeStatus.WORKER_RESTARTED, message="worker died", retry_after=1
            )
        return await super().generate(job, on_partial)


@pytest.mark.parametrize(("losses", "status", "attempts"), [(2, "succeeded", 3), (3, "failed", 3)])
def test_a_job_whose_render_worker_dies_runs_again_up_to_the_attempts(
    tmp_path: Path, losses: int, status: str, attempts: int
) -> None:
    service = Service(tmp_path, job_attempts=3)
    service.painter = LosingPainter(losses)
    service.images.renderer = service.painter
    with service.client:
        job = service.client.post("/images/jobs", json={"prompt": "x", "size": "64x64", "seed": 4})
        ended = service.ended(job.json()["id"])
    assert (ended["status"], ended["attempts"]) == (status, attempts)
    # Every run rendered the same seed.
    assert {tuple(j.seeds) for j in service.painter.jobs} == {(4,)}
    if status == "failed":
        assert ended["error"]["code"] == "worker_restarted"
    else:
        assert ended["result"]["data"][0]["seed"] == 4


def test_a_finished_job_and_its_files_go_after_the_job_ttl(tmp_path: Path) -> None:
    service = Service(tmp_path, job_ttl=1)
    with service.client:
        body = {"prompt": "x", "size": "64x64", "response_format": "url"}
        job = service.client.post("/images/jobs", json=body).json()
        ended = service.ended(job["id"])
        file_id = ended["result"]["data"][0]["url"].rsplit("/", 1)[-1]
        assert (service.settings.files_dir / file_id).is_file()
        assert ended["expires_at"] - ended["finished_at"] in (0, 1, 2)
        wait_until(
            lambda: service.client.get(f"/images/jobs/{job['id']}").status_code == 404,
            timeout=10,
            message="the job to expire",
        )
        assert service.runner.purge_expired() == 1
    assert not (service.settings.files_dir / file_id).exists()
    assert service.store.expired(now=2**40) == []


def test_a_job_whose_render_worker_died_waits_its_backoff_in_the_store(tmp_path: Path) -> None:
    service = Service(tmp_path, job_attempts=3)
    service.runner.retry = RetryPolicy(max_attempts=3, backoff_s=0.5)
    service.painter = LosingPainter(1)
    service.images.renderer = service.painter
    with service.client:
        submitted = time.time()
        job = service.client.post("/images/jobs", json={"prompt": "x", "size": "64x64", "seed": 4})
        job_id = job.json()["id"]

        def queued_with_its_backoff() -> JobRecord | None:
            read = service.store.get(job_id, now=time.time())
            return read if read is not None and read.not_before > 0 else None

        waiting = wait_until(queued_with_its_backoff, timeout=10, message="the backoff stored")
        # Half a second after the render worker was lost (which was after the submission).
        assert waiting.not_before >= submitted + 0.5
        ended = service.ended(job_id)
    assert (ended["status"], ended["attempts"]) == ("succeeded", 2)
    second_run = service.store.get(job_id, now=0)
    assert second_run is not None and second_run.started_at is not None
    assert second_run.started_at >= waiting.not_before


def test_every_answer_is_the_documented_job(tmp_path: Path) -> None:
    service = Service(tmp_path, webhook_secret=SECRET, webhook_hosts="127.0.0.1")
    with service.client, running_receiver(SECRET) as receiver:
        service.painter.open.clear()
        body = {"prompt": "x", "size": "64x64", "seed": 2, "webhook_url": receiver.url}
        running = service.client.post("/images/jobs", json={**body, "metadata": {"a": "b"}})
        queued = service.client.post("/images/jobs", json={**body, "response_format": "url"})
        for submitted in (running, queued):
            assert submitted.status_code == 202
            ImageJob.model_validate(submitted.json())
        wait_until(lambda: service.painter.working == 1, message="the first job at work")
        listed = service.client.get("/images/jobs").json()
        assert [j.status for j in ImageJobList.model_validate(listed).data] == [
            "queued",
            "running",
        ]
        cancelled = service.client.post(f"/images/jobs/{running.json()['id']}/cancel").json()
        assert ImageJob.model_validate(cancelled).error is not None
        service.painter.open.set()
        ended = ImageJob.model_validate(service.ended(queued.json()["id"]))
        assert ended.result is not None and ended.result.data[0].url is not None
        wait_until(lambda: len(receiver.deliveries) == 2, timeout=30, message="the webhooks")
        for delivery in receiver.deliveries:
            ImageJob.model_validate(json.loads(delivery.body)["data"])
        delivered = ImageJob.model_validate(service.job(queued.json()["id"]))
        assert delivered.webhook is not None and delivered.webhook.attempts
        deleted = service.client.delete(f"/images/jobs/{queued.json()['id']}").json()
        ImageJobDeleted.model_validate(deleted)
    # The OpenAPI document has the job with its fields, as each route's answer.
    schema = service.client.get("/openapi.json").json()
    job_schema = schema["components"]["schemas"]["ImageJob"]
    assert set(job_schema["properties"]) == set(ImageJob.model_fields)
    assert {"progress", "result", "webhook"} <= set(job_schema["required"])
    paths = schema["paths"]
    answers = {
        ("/images/jobs", "post", "202"): "ImageJob",
        ("/images/jobs", "get", "200"): "ImageJobList",
        ("/images/jobs/{job_id}", "get", "200"): "ImageJob",
        ("/images/jobs/{job_id}/cancel", "post", "200"): "ImageJob",
        ("/images/jobs/{job_id}", "delete", "200"): "ImageJobDeleted",
    }
    for (path, method, status), model in answers.items():
        content = paths[path][method]["responses"][status]["content"]["application/json"]
        assert content["schema"]["$ref"] == f"#/components/schemas/{model}"


class BackwardsPainter(HeldPainter):
    """Reports a step, then an earlier one (a late event), then holds."""

    async def generate(self, job: RenderRequest, on_partial: Any = None) -> GenerationOutcome:
        if job.report_progress and on_partial is not None:
            for step in (12, 7):
                await on_partial(RenderEvent(type=RenderEventType.PROGRESS, step=step))
        return await super().generate(job, on_partial)


def test_a_hires_jobs_progress_counts_both_passes_and_never_goes_back(tmp_path: Path) -> None:
    service = Service(tmp_path)
    service.painter = BackwardsPainter()
    service.images.renderer = service.painter
    service.painter.open.clear()
    with service.client:
        body = {
            "prompt": "x",
            "size": "128x128",
            "hires": {"scale": 2, "steps": 10, "denoising_strength": 0.5},
        }
        job = service.client.post("/images/jobs", json=body).json()
        # 30 steps of the first pass, int(10 * 0.5) of the second.
        assert job["progress"]["steps"] == 30 + 5
        wait_until(
            lambda: service.job(job["id"])["progress"]["step"] == 12, message="the job's steps"
        )
        time.sleep(3 * PROGRESS_S)  # 7, then 1..3, came after 12: not written
        assert service.job(job["id"])["progress"]["step"] == 12
        service.painter.open.set()
        ended = service.ended(job["id"])
    assert ended["progress"] == {"step": 35, "steps": 35, "images_done": 1, "images": 1}
