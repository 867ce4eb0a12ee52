"""Image jobs: POST /v1/images/jobs answers 202 at once, the images are made in the background.

records.py says what a job is, database.py and store.py keep the records
(SQLite by default, PostgreSQL for replicas), runner.py runs them through the
synchronous endpoints' own serving path, serving.py is the endpoints'
behaviour and routes.py their routes.
"""

from __future__ import annotations

import logging

from ...settings import Settings, SettingsError
from ..files import open_file_store
from ..render_client import BentoRenderClient
from ..serving import ImagesServing
from .database import SQLITE_PREFIX, Database
from .migrations import SCHEMA_VERSION, SchemaTooNew, stored_version
from .records import JobRecord, JobStatus, WebhookState, new_job_id, owner_of
from .runner import JobRunner
from .serving import JobsServing
from .store import JobStore
from .webhooks import WebhookDelivery, WebhookHosts, WebhookSigner

__all__ = [
    "Database",
    "JobRecord",
    "JobRunner",
    "JobStatus",
    "JobStore",
    "JobsServing",
    "WebhookState",
    "new_job_id",
    "open_job_store",
    "open_jobs",
    "owner_of",
    "refuse_a_newer_job_database",
]

SQLITE_FILE = "jobs.sqlite3"

logger = logging.getLogger(__name__)


def job_database_url(settings: Settings) -> str:
    url = settings.jobs_database_url
    if url is None:
        return SQLITE_PREFIX + str(settings.cache_dir / SQLITE_FILE)
    return url.get_secret_value()


def refuse_a_newer_job_database(settings: Settings) -> None:
    """A SettingsError when a newer release wrote the job database: called where the
    settings are read (service.py, in `bentoml serve` itself), so the service stops at
    start with the message, before any worker starts. Reads only; a database that is not
    there yet or cannot be reached now is left to the store (which creates or reports it),
    and the store refuses a newer database again when it opens."""
    version = stored_version(job_database_url(settings))
    if version is not None and version > SCHEMA_VERSION:
        raise SettingsError(
            f"image job database {_named(settings)}: "
            + SchemaTooNew.describe(version, SCHEMA_VERSION)
        )


def _named(settings: Settings) -> str:
    # A URL is not quoted: it may hold a password.
    if settings.jobs_database_url is not None:
        return "SDXL_JOBS_DATABASE_URL"
    return f"SDXL_CACHE_DIR/{SQLITE_FILE} ({settings.cache_dir / SQLITE_FILE})"


def open_job_store(settings: Settings) -> JobStore:
    """The store `SDXL_JOBS_DATABASE_URL` names; SQLite in SDXL_CACHE_DIR without one. Its
    schema brought up to date (migrations.py); a database that a newer release wrote is
    a SettingsError: the service stops at start, saying so, as for a bad setting."""
    database = Database(job_database_url(settings))
    try:
        return JobStore(database)
    except SchemaTooNew as error:
        database.close()
        raise SettingsError(f"image job database {_named(settings)}: {error}") from None


def webhook_delivery(settings: Settings) -> WebhookDelivery | None:
    """How webhooks are sent; None without SDXL_WEBHOOK_SECRET (no job may ask for one)."""
    if settings.webhook_secret is None:
        return None
    return WebhookDelivery(
        WebhookSigner(settings.webhook_secret.get_secret_value()),
        WebhookHosts(settings.webhook_hosts),
        attempts=settings.webhook_attempts,
        timeout_s=settings.webhook_timeout,
        retry_s=settings.webhook_retry_seconds,
    )


def open_jobs(
    settings: Settings, images: ImagesServing, renderer: BentoRenderClient
) -> tuple[JobRunner, JobsServing] | None:
    """The runner (start it on the event loop) and the endpoints' serving object; None
    (the job endpoints answer 404) when another service holds the SQLite file."""
    store = open_job_store(settings)
    if not store.db.claim_sqlite_file():
        logger.error(
            "IMAGE JOBS DISABLED: another service holds the job database %s. Replicas on a "
            "shared volume need a shared database: SDXL_JOBS_DATABASE_URL=postgresql://...",
            store.db.url,
        )
        store.db.close()
        return None
    # A job's url files live as long as the job, not SDXL_URL_TTL; the same
    # folder or bucket, so GET /v1/images/files serves them as any other.
    files = open_file_store(settings.model_copy(update={"url_ttl": settings.job_ttl}))
    runner = JobRunner(store, images, files, settings, webhook_delivery(settings))
    serving = JobsServing(settings, store, images, runner, admission=renderer.refusal)
    return runner, serving
