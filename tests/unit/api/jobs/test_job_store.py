"""JobStore on a real SQLite file and a real PostgreSQL server (Debian's, started here)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdxl_service.api.jobs import (
    Database,
    JobRecord,
    JobStatus,
    JobStore,
    WebhookState,
    new_job_id,
)
from sdxl_service.api.jobs.store import INTERRUPTED_CODE
from tests.postgres_server import PostgresServer

NOW = 1_800_000_000.0
TTL = 3600.0


@pytest.fixture
def store(database_url: str) -> Iterator[JobStore]:
    database = Database(database_url)
    yield JobStore(database)
    database.close()


def new_job(
    owner: str = "", images: int = 1, created_at: float = NOW, **extra: object
) -> JobRecord:
    values: dict[str, object] = {
        "id": new_job_id(),
        "owner": owner,
        "kind": "generation",
        "status": JobStatus.QUEUED,
        "created_at": created_at,
        "images": images,
        "steps": 6,
        "request": {"prompt": "a fox", "seed": 7, "n": images},
        "base_url": "http://127.0.0.1:9225/v1",
    }
    values.update(extra)
    return JobRecord(**values)  # type: ignore[arg-type]


def test_a_job_reads_back_as_written_with_its_uploads(store: JobStore) -> None:
    job = new_job(
        kind="edit",
        image=b"\x89PNG picture",
        mask=b"\x00\xff" * 10,
        metadata={"user": "42"},
        webhook_url="https://example.com/hook",
        webhook_state=WebhookState.PENDING,
    )
    store.insert(job)
    read = store.get(job.id, now=NOW)
    assert read is not None
    assert (read.kind, read.status, read.image, read.mask) == (
        "edit",
        JobStatus.QUEUED,
        b"\x89PNG picture",
        b"\x00\xff" * 10,
    )
    assert read.request == {"prompt": "a fox", "seed": 7, "n": 1}
    assert read.metadata == {"user": "42"}
    assert (read.webhook_url, read.webhook_state) == ("https://example.com/hook", "pending")
    assert read.public(queue_position=0)["queue_position"] == 0


def test_another_owner_sees_no_job(store: JobStore) -> None:
    job = new_job(owner="alice")
    store.insert(job)
    assert store.get(job.id, "alice", now=NOW) is not None
    assert store.get(job.id, "bob", now=NOW) is None
    assert store.get("imgjob_unknown", now=NOW) is None


def test_pages_are_newest_first_with_a_cursor(store: JobStore) -> None:
    jobs = [new_job(owner="alice", created_at=NOW + i) for i in range(5)]
    for job in jobs:
        store.insert(job)
    store.insert(new_job(owner="bob"))
    first = store.page("alice", after=None, limit=2, now=NOW)
    assert first is not None
    page, more = first
    assert [j.id for j in page] == [jobs[4].id, jobs[3].id] and more
    second = store.page("alice", after=page[-1].id, limit=2, now=NOW)
    assert second is not None
    assert [j.id for j in second[0]] == [jobs[2].id, jobs[1].id] and second[1]
    last = store.page("alice", after=jobs[1].id, limit=2, now=NOW)
    assert last is not None
    assert [j.id for j in last[0]] == [jobs[0].id] and not last[1]
    # A cursor of someone else's job is no cursor.
    assert store.page("bob", after=jobs[0].id, limit=2, now=NOW) is None


def test_queue_positions_and_images_count_queued_jobs_only(store: JobStore) -> None:
    jobs = [new_job(images=i + 1) for i in range(3)]
    for job in jobs:
        store.insert(job)
    assert [store.queue_position(j.id) for j in jobs] == [0, 1, 2]
    assert store.queued_images() == 6
    claimed = store.claim_next(now=NOW, lease_s=30, max_images=8)
    assert claimed is not None and claimed.id == jobs[0].id
    assert (claimed.status, claimed.attempts) == (JobStatus.RUNNING, 1)
    assert [store.queue_position(j.id) for j in jobs[1:]] == [0, 1]
    assert store.queued_images() == 5


def test_a_claim_takes_only_a_job_that_fits(store: JobStore) -> None:
    store.insert(new_job(images=4))
    assert store.claim_next(now=NOW, lease_s=30, max_images=3) is None
    assert store.claim_next(now=NOW, lease_s=30, max_images=4) is not None
    assert store.claim_next(now=NOW, lease_s=30, max_images=4) is None


def test_two_runners_never_take_the_same_job(database_url: str) -> None:
    jobs_count = 20
    writer = JobStore(Database(database_url))
    for _ in range(jobs_count):
        writer.insert(new_job())
    taken: list[list[str]] = [[], []]

    def run(index: int) -> None:
        # Each runner its own connection, as two replicas have.
        store = JobStore(Database(database_url))
        while (job := store.claim_next(now=NOW, lease_s=30, max_images=8)) is not None:
            taken[index].append(job.id)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(taken[0]) + len(taken[1]) == jobs_count
    assert not set(taken[0]) & set(taken[1])


def test_a_finished_run_keeps_its_result_until_the_ttl(store: JobStore) -> None:
    store.insert(new_job(images=2))
    job = store.claim_next(now=NOW, lease_s=30, max_images=8)
    assert job is not None and job.runner_token is not None
    result = {"created": 1, "data": [{"b64_json": "x", "seed": 7}, {"b64_json": "y", "seed": 8}]}
    done = store.finish(
        job.id,
        job.runner_token,
        JobStatus.SUCCEEDED,
        now=NOW + 5,
        ttl=TTL,
        result=result,
        images_done=2,
    )
    assert done
    read = store.get(job.id, now=NOW + 10)
    assert read is not None
    assert (read.status, read.result, read.step, read.images_done) == (
        JobStatus.SUCCEEDED,
        result,
        read.steps,
        2,
    )
    assert read.expires_at == NOW + 5 + TTL
    assert store.get(job.id, now=NOW + 5 + TTL) is None
    assert [j.id for j in store.expired(now=NOW + 5 + TTL)] == [job.id]
    assert store.purge([job.id]) == 1


def test_a_cancelled_run_cannot_write_its_end(store: JobStore) -> None:
    store.insert(new_job())
    job = store.claim_next(now=NOW, lease_s=30, max_images=8)
    assert job is not None and job.runner_token is not None
    assert store.cancel(job.id, now=NOW + 1, ttl=TTL)
    assert not store.renew(job.id, job.runner_token, lease_until=NOW + 60)
    assert not store.finish(job.id, job.runner_token, JobStatus.SUCCEEDED, now=NOW + 2, ttl=TTL)
    read = store.get(job.id, now=NOW + 3)
    assert read is not None and read.status is JobStatus.CANCELLED
    assert read.error is not None and read.error["code"] == "cancelled"
    # Ended: not cancelled twice, and now it may be deleted.
    assert not store.cancel(job.id, now=NOW + 4, ttl=TTL)
    assert store.delete(job.id)
    assert store.get(job.id, now=NOW + 5) is None


def test_an_unfinished_job_is_not_deleted(store: JobStore) -> None:
    job = new_job()
    store.insert(job)
    assert not store.delete(job.id)
    assert store.get(job.id, now=NOW) is not None


def test_recovery_requeues_interrupted_runs_then_gives_up(store: JobStore) -> None:
    job = new_job()
    store.insert(job)
    for attempt in range(1, 3):
        claimed = store.claim_next(now=NOW, lease_s=30, max_images=8)
        assert claimed is not None and claimed.attempts == attempt
        # The service died: at its next start the run is interrupted.
        assert store.recover(now=NOW, max_attempts=3, ttl=TTL, everything=True) == []
        read = store.get(job.id, now=NOW)
        assert read is not None and read.status is JobStatus.QUEUED
    assert store.claim_next(now=NOW, lease_s=30, max_images=8) is not None
    assert store.recover(now=NOW, max_attempts=3, ttl=TTL, everything=True) == [job.id]
    read = store.get(job.id, now=NOW)
    assert read is not None and read.status is JobStatus.FAILED and read.attempts == 3
    assert read.error is not None and read.error["code"] == INTERRUPTED_CODE


def test_a_shared_database_recovers_only_runs_whose_lease_ran_out(store: JobStore) -> None:
    store.insert(new_job())
    store.insert(new_job())
    held = store.claim_next(now=NOW, lease_s=100, max_images=8)
    dead = store.claim_next(now=NOW, lease_s=10, max_images=8)
    assert held is not None and dead is not None
    store.recover(now=NOW + 50, max_attempts=3, ttl=TTL, everything=False)
    statuses = {j: store.get(j, now=NOW + 50).status for j in (held.id, dead.id)}  # type: ignore[union-attr]
    assert statuses == {held.id: JobStatus.RUNNING, dead.id: JobStatus.QUEUED}


def test_a_release_for_a_busy_render_service_does_not_count_an_attempt(store: JobStore) -> None:
    store.insert(new_job())
    job = store.claim_next(now=NOW, lease_s=30, max_images=8)
    assert job is not None and job.runner_token is not None
    assert store.release(job.id, job.runner_token, count_attempt=False)
    read = store.get(job.id, now=NOW)
    assert read is not None and (read.status, read.attempts) == (JobStatus.QUEUED, 0)


def test_webhook_attempts_are_recorded_and_pending_ones_found(store: JobStore) -> None:
    store.insert(new_job(webhook_url="https://example.com/h", webhook_state=WebhookState.PENDING))
    job = store.claim_next(now=NOW, lease_s=30, max_images=8)
    assert job is not None and job.runner_token is not None
    assert store.pending_webhooks() == []  # not ended yet
    store.finish(job.id, job.runner_token, JobStatus.FAILED, now=NOW, ttl=TTL, error={"x": 1})
    assert [j.id for j in store.pending_webhooks()] == [job.id]
    attempts = [{"at": NOW, "status_code": 500, "error": None}]
    store.record_webhook(job.id, attempts, WebhookState.DELIVERED)
    read = store.get(job.id, now=NOW)
    assert read is not None
    assert (read.webhook_state, read.webhook_attempts) == (WebhookState.DELIVERED, attempts)
    assert store.pending_webhooks() == []


def test_one_service_holds_an_embedded_database_a_second_gets_no_jobs(tmp_path: Path) -> None:
    from sdxl_service.api.files import LocalFileStore
    from sdxl_service.api.jobs import open_jobs
    from sdxl_service.api.render_client import BentoRenderClient
    from sdxl_service.api.serving import ImagesServing
    from sdxl_service.settings import Settings

    settings = Settings(
        jobs_database_url=f"sqlite:///{tmp_path / 'jobs.sqlite3'}", files_dir=tmp_path / "f"
    )
    renderer = BentoRenderClient(handle=None)
    images = ImagesServing(settings, renderer, LocalFileStore(tmp_path / "f", 60))
    first = open_jobs(settings, images, renderer)
    assert first is not None
    # A second service on the same file (a replica on a shared volume): jobs disabled.
    assert open_jobs(settings, images, renderer) is None
    first[0].store.db.close()
    # Once the first is gone (its process ended), the file is free again.
    again = open_jobs(settings, images, renderer)
    assert again is not None
    again[0].store.db.close()


def test_a_job_waits_for_its_not_before_across_a_restart(database_url: str) -> None:
    store = JobStore(Database(database_url))
    waiting, behind = new_job(), new_job()
    store.insert(waiting)
    store.insert(behind)
    job = store.claim_next(now=NOW, lease_s=30, max_images=8)
    assert job is not None and job.id == waiting.id and job.runner_token is not None
    # The render worker died under it: back to the queue for 30 s.
    assert store.release(job.id, job.runner_token, count_attempt=True, not_before=NOW + 30)
    read = store.get(job.id, now=NOW)
    assert read is not None and (read.status, read.not_before) == (JobStatus.QUEUED, NOW + 30)
    store.db.close()
    # The service restarts: the wait is kept, and the job behind it does not wait with it.
    store = JobStore(Database(database_url))
    assert store.recover(now=NOW + 1, max_attempts=3, ttl=TTL, everything=True) == []
    taken = store.claim_next(now=NOW + 1, lease_s=30, max_images=8)
    assert taken is not None and taken.id == behind.id
    assert store.claim_next(now=NOW + 29, lease_s=30, max_images=8) is None
    again = store.claim_next(now=NOW + 30, lease_s=30, max_images=8)
    assert again is not None and (again.id, again.attempts) == (waiting.id, 2)
    store.db.close()


def test_postgresql_replicas_claim_concurrently_each_job_once(postgres: PostgresServer) -> None:
    url = postgres.new_database()
    writer = JobStore(Database(url))
    ids = set()
    for _ in range(120):
        job = new_job()
        writer.insert(job)
        ids.add(job.id)
    replicas = 4
    barrier = threading.Barrier(replicas)
    taken: list[list[str]] = [[] for _ in range(replicas)]

    def run(index: int) -> None:
        store = JobStore(Database(url))
        barrier.wait()
        while (job := store.claim_next(now=NOW, lease_s=30, max_images=8)) is not None:
            assert job.status is JobStatus.RUNNING and job.attempts == 1
            taken[index].append(job.id)
        store.db.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(replicas)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    claimed = [job_id for ids_of_one in taken for job_id in ids_of_one]
    assert sorted(claimed) == sorted(ids)  # each job once, none left
    writer.db.close()


def test_a_postgresql_claim_skips_the_job_another_replica_is_claiming(
    postgres: PostgresServer,
) -> None:
    import psycopg

    url = postgres.new_database()
    store = JobStore(Database(url))
    first, second = new_job(), new_job()
    store.insert(first)
    store.insert(second)
    # Another replica's claim in flight: the oldest row locked by its transaction.
    with psycopg.connect(url) as other, other.transaction():
        other.execute("SELECT id FROM image_jobs WHERE id = %s FOR UPDATE", (first.id,))
        started = time.monotonic()
        job = store.claim_next(now=NOW, lease_s=30, max_images=8)
        assert job is not None and job.id == second.id
        assert time.monotonic() - started < 2  # not waiting on the other's lock
    job = store.claim_next(now=NOW, lease_s=30, max_images=8)
    assert job is not None and job.id == first.id
    store.db.close()
