"""The job database's migrations, on a real SQLite file and a real PostgreSQL server: a first
release's database upgraded with every job readable and runnable, replicas starting at once,
a failed migration undone, a database newer than the code refused."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest

from sdxl_service.api.jobs import (
    Database,
    JobStatus,
    JobStore,
    open_job_store,
    refuse_a_newer_job_database,
)
from sdxl_service.api.jobs.migrations import (
    HISTORY_TABLE,
    MIGRATIONS,
    SCHEMA_VERSION,
    Migration,
    SchemaTooNew,
    migrate,
)
from sdxl_service.settings import Settings, SettingsError
from tests.unit.api.jobs import first_release_database as first

NOW = 1_800_000_000.0


def history(url: str) -> list[int]:
    database = Database(url)
    try:
        rows = database.fetch_all(f"SELECT version FROM {HISTORY_TABLE} ORDER BY version")
        return [int(row["version"]) for row in rows]
    finally:
        database.close()


def test_migration_1_is_the_first_releases_schema_word_for_word() -> None:
    for dialect in ("sqlite", "postgresql"):
        assert MIGRATIONS[0].statements(dialect) == [first.SCHEMA[dialect], *first.INDEXES]
    assert [m.version for m in MIGRATIONS] == list(range(1, SCHEMA_VERSION + 1))


def test_a_new_database_gets_every_migration_once(database_url: str) -> None:
    database = Database(database_url)
    JobStore(database)
    assert migrate(database) == []  # a second start: nothing to do
    database.close()
    assert history(database_url) == list(range(1, SCHEMA_VERSION + 1))


def test_a_first_release_database_is_upgraded_with_every_job_readable_and_runnable(
    database_url: str,
) -> None:
    written = first.build(database_url)
    database = Database(database_url)
    store = JobStore(database)
    assert history(database_url) == list(range(1, SCHEMA_VERSION + 1))
    for job in written:
        read = store.get(job.id, now=NOW)
        assert read is not None, job.id
        as_read = {f.name: getattr(read, f.name) for f in dataclasses.fields(job)}
        assert as_read == dataclasses.asdict(job), job.id
        assert read.not_before == 0.0 and read.base_url == first.BASE_URL
    # The page and the queue see them as before, oldest first.
    page = store.page(None, after=None, limit=100, now=NOW)
    assert page is not None and [j.id for j in page[0]] == [j.id for j in reversed(written)]
    assert store.queued_images() == 2 + 1 + 1
    # The run its service left behind goes back to the queue, and every queued job runs.
    assert store.recover(now=NOW, max_attempts=3, ttl=60, everything=True) == []
    claimed = []
    while (job := store.claim_next(now=NOW, lease_s=30, max_images=8)) is not None:
        assert job.runner_token is not None
        assert store.finish(
            job.id, job.runner_token, JobStatus.SUCCEEDED, now=NOW, ttl=60, images_done=1
        )
        claimed.append((job.id, job.attempts))
    assert claimed == [
        ("imgjob_first_queued", 1),
        ("imgjob_first_running", 2),
        ("imgjob_first_edit", 1),
        ("imgjob_first_owned", 1),
    ]
    database.close()


def test_replicas_starting_at_once_migrate_once(database_url: str) -> None:
    first.build(database_url)
    starts = 4
    barrier = threading.Barrier(starts)
    errors: list[BaseException] = []
    databases: list[Database] = []

    def start() -> None:
        barrier.wait()
        try:
            database = Database(database_url)
            databases.append(database)
            JobStore(database)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=start) for _ in range(starts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for database in databases:
        database.close()
    assert errors == []
    # A migration run twice would have failed (its column added twice) or left two rows.
    assert history(database_url) == list(range(1, SCHEMA_VERSION + 1))


def test_a_failed_migration_changes_nothing(database_url: str) -> None:
    database = Database(database_url)
    JobStore(database)
    broken = Migration(
        SCHEMA_VERSION + 1,
        "half of it works",
        lambda _d: ["ALTER TABLE image_jobs ADD COLUMN extra INTEGER", "SELECT * FROM nowhere"],
    )
    with pytest.raises(Exception, match="nowhere"):
        migrate(database, (*MIGRATIONS, broken))
    assert history(database_url) == list(range(1, SCHEMA_VERSION + 1))
    # The column of its first statement went with it: the next release may add it.
    fixed = dataclasses.replace(broken, statements=lambda _d: [broken.statements(_d)[0]])
    assert migrate(database, (*MIGRATIONS, fixed)) == [SCHEMA_VERSION + 1]
    database.close()


def test_a_database_newer_than_the_code_is_refused(database_url: str, tmp_path: Path) -> None:
    database = Database(database_url)
    JobStore(database)
    database.execute(
        f"INSERT INTO {HISTORY_TABLE} (version, name, applied_at) VALUES (?, ?, ?)",
        (SCHEMA_VERSION + 1, "from the future", NOW),
    )
    with pytest.raises(SchemaTooNew, match=f"version {SCHEMA_VERSION + 1}, newer than"):
        JobStore(database)
    database.close()
    # The service stops at start, as for a bad setting, naming the database but not its URL.
    settings = Settings(jobs_database_url=database_url, files_dir=tmp_path / "f")
    with pytest.raises(SettingsError) as refused:
        open_job_store(settings)
    message = str(refused.value)
    assert "SDXL_JOBS_DATABASE_URL" in message and "newer release" in message
    assert database_url not in message
    # And before that, where the settings are read (service.py), reading only.
    with pytest.raises(SettingsError, match="newer than this release's"):
        refuse_a_newer_job_database(settings)


def test_the_check_at_start_passes_a_database_not_there_yet_or_not_newer(
    database_url: str, tmp_path: Path
) -> None:
    settings = Settings(jobs_database_url=database_url, files_dir=tmp_path / "f")
    refuse_a_newer_job_database(settings)  # empty: nothing to refuse, nothing created
    if database_url.startswith("sqlite"):
        assert not Path(database_url.removeprefix("sqlite:///")).exists()
    first.build(database_url)
    refuse_a_newer_job_database(settings)  # the first release's: upgraded, not refused
    JobStore(Database(database_url)).db.close()
    refuse_a_newer_job_database(settings)
    unreachable = Settings(jobs_database_url="postgresql://nobody@127.0.0.1:1/none")
    refuse_a_newer_job_database(unreachable)  # left to the store, which reports it
