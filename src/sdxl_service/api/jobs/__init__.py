"""Image jobs: POST /v1/images/jobs answers 202 at once, the images are made in the background.

records.py says what a job is, database.py and store.py keep the records
(SQLite by default, PostgreSQL for replicas), runner.py runs them through the
synchronous endpoints' own serving path, serving.py is the endpoints'
behaviour and routes.py their routes.
"""

from __future__ import annotations

from ...settings import Settings
from .database import Database
from .records import JobKind, JobRecord, JobStatus, WebhookState, new_job_id, owner_of
from .store import JobStore

__all__ = [
    "Database",
    "JobKind",
    "JobRecord",
    "JobStatus",
    "JobStore",
    "WebhookState",
    "new_job_id",
    "open_job_store",
    "owner_of",
]

SQLITE_FILE = "jobs.sqlite3"


def open_job_store(settings: Settings) -> JobStore:
    """The store `SDXL_JOBS_DATABASE_URL` names; SQLite in SDXL_CACHE_DIR without one."""
    url = settings.jobs_database_url
    if url is None:
        return JobStore(Database.sqlite_file(settings.cache_dir / SQLITE_FILE))
    return JobStore(Database(url.get_secret_value()))
