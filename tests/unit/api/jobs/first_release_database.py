"""A job database as the first release wrote it (schema version 0: no version kept), for the
tests of its upgrade: that release's DDL, word for word (copied from its store.py, not
imported, so that an edit of migration 1 shows), and jobs in each state written with its
own statements (its INSERT, then the UPDATEs its claim, finish and webhook wrote).

`build(url)` writes them into an empty SQLite or PostgreSQL database and returns them as
`FirstReleaseJob`s: what each job must read back as after the upgrade.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from sdxl_service.api.jobs import Database

# The first release's store.py, _COLUMNS, _SCHEMA and _INDEXES, verbatim.
_COLUMNS = """
    id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at {real} NOT NULL,
    started_at {real},
    finished_at {real},
    expires_at {real},
    attempts INTEGER NOT NULL DEFAULT 0,
    images INTEGER NOT NULL,
    steps INTEGER NOT NULL,
    step INTEGER NOT NULL DEFAULT 0,
    images_done INTEGER NOT NULL DEFAULT 0,
    request TEXT NOT NULL,
    base_url TEXT NOT NULL,
    image {blob},
    mask {blob},
    webhook_url TEXT,
    metadata TEXT,
    result TEXT,
    error TEXT,
    runner_token TEXT,
    lease_until {real},
    webhook_state TEXT,
    webhook_attempts TEXT NOT NULL DEFAULT '[]'
"""
SCHEMA = {
    "sqlite": "CREATE TABLE IF NOT EXISTS image_jobs ("
    "seq INTEGER PRIMARY KEY AUTOINCREMENT," + _COLUMNS.format(real="REAL", blob="BLOB") + ")",
    "postgresql": "CREATE TABLE IF NOT EXISTS image_jobs ("
    "seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
    + _COLUMNS.format(real="DOUBLE PRECISION", blob="BYTEA")
    + ")",
}
INDEXES = (
    "CREATE INDEX IF NOT EXISTS image_jobs_status ON image_jobs (status, seq)",
    "CREATE INDEX IF NOT EXISTS image_jobs_owner ON image_jobs (owner, seq)",
)
# The first release's JobStore.insert.
_INSERT = (
    "INSERT INTO image_jobs (id, owner, kind, status, created_at, images, steps, "
    "request, base_url, image, mask, webhook_url, metadata, webhook_state) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

CREATED = 1_700_000_000.0
# Results stay readable until long after any test's clock.
EXPIRES = 4_000_000_000.0
BASE_URL = "http://testserver"


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class FirstReleaseJob:
    """One job as written, and so as it must read back (the columns that were set)."""

    id: str
    kind: str
    status: str
    request: dict[str, Any]
    images: int
    owner: str = ""
    attempts: int = 0
    step: int = 0
    images_done: int = 0
    image: bytes | None = None
    mask: bytes | None = None
    webhook_url: str | None = None
    webhook_state: str | None = None
    metadata: dict[str, str] | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    runner_token: str | None = None
    lease_until: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    expires_at: float | None = None
    webhook_attempts: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 30


def jobs() -> list[FirstReleaseJob]:
    """Oldest first: queued, running (its service died), succeeded, queued edit, failed,
    cancelled, queued with a key's owner."""
    picture = _png(64, 64)
    return [
        FirstReleaseJob(
            id="imgjob_first_queued",
            kind="generation",
            status="queued",
            request={"prompt": "a fox", "size": "64x64", "n": 2, "seed": 11},
            images=2,
            metadata={"user": "7"},
        ),
        FirstReleaseJob(
            id="imgjob_first_running",
            kind="generation",
            status="running",
            request={"prompt": "a kite", "size": "64x64", "seed": 21},
            images=1,
            attempts=1,
            step=3,
            runner_token="0123456789abcdef0123456789abcdef",
            lease_until=CREATED + 40,
            started_at=CREATED + 10,
        ),
        FirstReleaseJob(
            id="imgjob_first_succeeded",
            kind="generation",
            status="succeeded",
            request={"prompt": "a barn", "size": "64x64", "seed": 31},
            images=1,
            attempts=1,
            step=30,
            images_done=1,
            result={"created": 1_700_000_020, "data": [{"b64_json": "AAAA", "seed": 31}]},
            started_at=CREATED + 10,
            finished_at=CREATED + 20,
            expires_at=EXPIRES,
            webhook_url="https://example.com/hook",
            webhook_state="delivered",
            webhook_attempts=[{"at": CREATED + 21, "status_code": 204, "error": None}],
        ),
        FirstReleaseJob(
            id="imgjob_first_edit",
            kind="edit",
            status="queued",
            request={"prompt": "red", "size": "64x64", "seed": 41},
            images=1,
            image=picture,
            mask=None,
        ),
        FirstReleaseJob(
            id="imgjob_first_failed",
            kind="generation",
            status="failed",
            request={"prompt": "a boat", "size": "64x64", "seed": 51},
            images=1,
            attempts=3,
            error={
                "message": "worker died",
                "type": "server_error",
                "param": None,
                "code": "worker_restarted",
            },
            started_at=CREATED + 10,
            finished_at=CREATED + 20,
            expires_at=EXPIRES,
        ),
        FirstReleaseJob(
            id="imgjob_first_cancelled",
            kind="variation",
            status="cancelled",
            request={"size": "64x64", "seed": 61},
            images=1,
            image=picture,
            error={
                "message": "The job was cancelled.",
                "type": "invalid_request_error",
                "param": None,
                "code": "cancelled",
            },
            finished_at=CREATED + 5,
            expires_at=EXPIRES,
        ),
        FirstReleaseJob(
            id="imgjob_first_owned",
            kind="generation",
            status="queued",
            request={"prompt": "a cat", "size": "64x64", "seed": 71},
            images=1,
            owner="ab" * 32,
        ),
    ]


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


def build(url: str) -> list[FirstReleaseJob]:
    """The first release's table, filled with `jobs()`, in the empty database at `url`."""
    written = jobs()
    database = Database(url)
    try:
        database.execute(SCHEMA[database.dialect])
        for statement in INDEXES:
            database.execute(statement)
        for i, job in enumerate(written):
            database.execute(
                _INSERT,
                (
                    job.id,
                    job.owner,
                    job.kind,
                    "queued",
                    CREATED + i,
                    job.images,
                    job.steps,
                    _dumps(job.request),
                    BASE_URL,
                    job.image,
                    job.mask,
                    job.webhook_url,
                    _dumps(job.metadata),
                    "pending" if job.webhook_url else None,
                ),
            )
            database.execute(
                "UPDATE image_jobs SET status = ?, started_at = ?, finished_at = ?, "
                "expires_at = ?, attempts = ?, step = ?, images_done = ?, result = ?, "
                "error = ?, runner_token = ?, lease_until = ?, webhook_state = ?, "
                "webhook_attempts = ? WHERE id = ?",
                (
                    job.status,
                    job.started_at,
                    job.finished_at,
                    job.expires_at,
                    job.attempts,
                    job.step,
                    job.images_done,
                    _dumps(job.result),
                    _dumps(job.error),
                    job.runner_token,
                    job.lease_until,
                    job.webhook_state,
                    _dumps(job.webhook_attempts),
                    job.id,
                ),
            )
    finally:
        database.close()
    return written
