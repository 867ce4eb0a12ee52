"""Image job records in SQLite or PostgreSQL: one table, written before a 202 goes out.

Every change of state is one conditional UPDATE, so two replicas sharing a
PostgreSQL database never both take a job: a claim is `WHERE status =
'queued'`, and what a run writes afterwards names the token of its claim, so a
run whose lease ran out (its replica died, the job went back to the queue)
can no longer overwrite the run that took over. On PostgreSQL a claim is one
statement that skips the rows another replica is claiming (`FOR UPDATE SKIP
LOCKED`), so replicas do not wait on each other; SQLite has one writer and
keeps a read, then a conditional update. A queued job waits until its
`not_before` (a retry's backoff, kept across restarts). The table's schema is
migrations.py's, brought up to date when the store opens. Blocking: call from
threads.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from typing import Any

from .database import Database, Row
from .migrations import migrate
from .records import (
    FINISHED,
    JobRecord,
    JobStatus,
    WebhookState,
    dumps,
    loads,
)
from .retry import RetryPolicy

# A claim: running, one more attempt, the run's token and lease (three parameters).
_CLAIM_SET = (
    "status = 'running', attempts = attempts + 1, runner_token = ?, lease_until = ?, "
    "started_at = ?, step = 0, images_done = 0"
)
_FINISHED_SQL = "(" + ", ".join(f"'{s.value}'" for s in sorted(FINISHED)) + ")"
# What a job failed with when the service kept stopping under it.
INTERRUPTED_CODE = "job_interrupted"


class JobStore:
    def __init__(self, database: Database) -> None:
        self.db = database
        # SchemaTooNew when a newer release wrote the database.
        migrate(database)

    @property
    def embedded(self) -> bool:
        return self.db.embedded

    # ---- writes of the HTTP side ------------------------------------------------

    def insert(self, job: JobRecord) -> None:
        self.db.execute(
            "INSERT INTO image_jobs (id, owner, kind, status, created_at, images, steps, "
            "request, base_url, image, mask, webhook_url, metadata, webhook_state) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                job.id,
                job.owner,
                job.kind,
                job.status.value,
                job.created_at,
                job.images,
                job.steps,
                dumps(job.request),
                job.base_url,
                job.image,
                job.mask,
                job.webhook_url,
                dumps(job.metadata),
                job.webhook_state.value if job.webhook_state else None,
            ),
        )

    def get(self, job_id: str, owner: str | None = None, *, now: float) -> JobRecord | None:
        """The job; None when unknown, expired, or (with `owner`) someone else's."""
        row = self.db.fetch_one("SELECT * FROM image_jobs WHERE id = ?", (job_id,))
        if row is None or (owner is not None and row["owner"] != owner):
            return None
        job = _record(row)
        if job.expires_at is not None and job.expires_at <= now:
            return None
        return job

    def page(
        self, owner: str | None, *, after: str | None, limit: int, now: float
    ) -> tuple[list[JobRecord], bool] | None:
        """Up to `limit` jobs, newest first, older than `after`; and whether more follow.

        None when `after` names no job of this owner.
        """
        where = ["(expires_at IS NULL OR expires_at > ?)"]
        params: list[Any] = [now]
        if owner is not None:
            where.append("owner = ?")
            params.append(owner)
        if after is not None:
            anchor = self.get(after, owner, now=now)
            if anchor is None:
                return None
            where.append("seq < (SELECT seq FROM image_jobs WHERE id = ?)")
            params.append(after)
        rows = self.db.fetch_all(
            f"SELECT * FROM image_jobs WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ?",
            (*params, limit + 1),
        )
        return [_record(row) for row in rows[:limit]], len(rows) > limit

    def queue_position(self, job_id: str) -> int:
        """How many queued jobs (anyone's) run before this one: 0 = next."""
        row = self.db.fetch_one(
            "SELECT COUNT(*) AS ahead FROM image_jobs WHERE status = 'queued' "
            "AND seq < (SELECT seq FROM image_jobs WHERE id = ?)",
            (job_id,),
        )
        return int(row["ahead"]) if row else 0

    def queued_images(self) -> int:
        """Images of the jobs waiting for the runner: part of the queue a new request joins."""
        row = self.db.fetch_one(
            "SELECT COALESCE(SUM(images), 0) AS n FROM image_jobs WHERE status = 'queued'"
        )
        return int(row["n"]) if row else 0

    def cancel(self, job_id: str, *, now: float, ttl: float) -> bool:
        """Queued or running -> cancelled; False when it had already ended."""
        changed = self.db.execute(
            "UPDATE image_jobs SET status = 'cancelled', finished_at = ?, expires_at = ?, "
            "runner_token = NULL, error = ? WHERE id = ? AND status IN ('queued', 'running')",
            (now, now + ttl, dumps(_cancelled_error()), job_id),
        )
        return changed == 1

    def delete(self, job_id: str) -> bool:
        """Deletes a finished job's record; False when it has not ended."""
        return (
            self.db.execute(
                f"DELETE FROM image_jobs WHERE id = ? AND status IN {_FINISHED_SQL}", (job_id,)
            )
            == 1
        )

    # ---- the runner ----------------------------------------------------------------

    def claim_next(self, *, now: float, lease_s: float, max_images: int) -> JobRecord | None:
        """Takes the oldest queued job whose time has come (`not_before`), when it has at
        most `max_images` images, for one run: running, one more attempt, a fresh token
        and a lease; None when none is waiting or the oldest does not fit."""
        token = secrets.token_hex(16)
        if self.db.dialect == "postgresql":
            # One statement: the row is locked by the subquery, rows other replicas are
            # claiming are skipped, and the update returns the job. The oldest waiting
            # job that does not fit is locked, not taken: None, as on SQLite.
            row = self.db.fetch_one(
                f"UPDATE image_jobs SET {_CLAIM_SET} WHERE id = (SELECT id FROM image_jobs "
                "WHERE status = 'queued' AND not_before <= ? ORDER BY seq LIMIT 1 "
                "FOR UPDATE SKIP LOCKED) AND status = 'queued' AND images <= ? RETURNING *",
                (token, now + lease_s, now, now, max_images),
            )
            return None if row is None else _record(row)
        while True:
            row = self.db.fetch_one(
                "SELECT id, images FROM image_jobs WHERE status = 'queued' AND not_before <= ? "
                "ORDER BY seq LIMIT 1",
                (now,),
            )
            if row is None or int(row["images"]) > max_images:
                return None
            taken = self.db.execute(
                f"UPDATE image_jobs SET {_CLAIM_SET} WHERE id = ? AND status = 'queued'",
                (token, now + lease_s, now, row["id"]),
            )
            if taken:
                job = self.get(row["id"], now=now)
                if job is not None:
                    return job
            # Cancelled meanwhile: the next one.

    def renew(self, job_id: str, token: str, *, lease_until: float) -> bool:
        """Extends the run's lease; False when the run no longer holds the job (cancelled,
        or its lease ran out and another run took it)."""
        return (
            self.db.execute(
                "UPDATE image_jobs SET lease_until = ? WHERE id = ? AND runner_token = ? "
                "AND status = 'running'",
                (lease_until, job_id, token),
            )
            == 1
        )

    def progress(self, job_id: str, token: str, *, step: int, images_done: int) -> None:
        self.db.execute(
            "UPDATE image_jobs SET step = ?, images_done = ? WHERE id = ? AND runner_token = ?",
            (step, images_done, job_id, token),
        )

    def finish(
        self,
        job_id: str,
        token: str,
        status: JobStatus,
        *,
        now: float,
        ttl: float,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
        images_done: int = 0,
    ) -> bool:
        """The run's end (succeeded or failed); False when the run no longer held the job."""
        return (
            self.db.execute(
                "UPDATE image_jobs SET status = ?, finished_at = ?, expires_at = ?, result = ?, "
                "error = ?, runner_token = NULL, lease_until = NULL, "
                "step = CASE WHEN ? = 'succeeded' THEN steps ELSE step END, images_done = ? "
                "WHERE id = ? AND runner_token = ? AND status = 'running'",
                (
                    status.value,
                    now,
                    now + ttl,
                    dumps(result),
                    dumps(error),
                    status.value,
                    images_done,
                    job_id,
                    token,
                ),
            )
            == 1
        )

    def release(
        self, job_id: str, token: str, *, count_attempt: bool, not_before: float = 0.0
    ) -> bool:
        """Puts a run's job back in the queue (the render service was busy or restarting),
        to be taken again from `not_before` on."""
        undo = "" if count_attempt else ", attempts = attempts - 1"
        return (
            self.db.execute(
                f"UPDATE image_jobs SET status = 'queued', runner_token = NULL, "
                f"lease_until = NULL, step = 0, not_before = ?{undo} "
                "WHERE id = ? AND runner_token = ? AND status = 'running'",
                (not_before, job_id, token),
            )
            == 1
        )

    def recover(self, *, now: float, max_attempts: int, ttl: float, everything: bool) -> list[str]:
        """Jobs whose run died with its service: back to the queue, or failed after
        `max_attempts` runs. `everything`: every running job (at the start of the one
        service that owns an embedded database); else only those whose lease ran out.
        The ids of the jobs failed."""
        stale = "" if everything else " AND lease_until < ?"
        params: tuple[Any, ...] = () if everything else (now,)
        rows = self.db.fetch_all(
            f"SELECT id, attempts, runner_token FROM image_jobs WHERE status = 'running'{stale}",
            params,
        )
        policy = RetryPolicy(max_attempts)
        failed = []
        for row in rows:
            decision = policy.after_service_stopped(int(row["attempts"]))
            if not decision.requeue:
                error = {
                    "message": f"The service stopped while it ran this job, {row['attempts']} "
                    f"times (SDXL_JOB_ATTEMPTS={max_attempts}); the job was given up.",
                    "type": "server_error",
                    "param": None,
                    "code": INTERRUPTED_CODE,
                }
                if self.finish(
                    row["id"], row["runner_token"], JobStatus.FAILED, now=now, ttl=ttl, error=error
                ):
                    failed.append(row["id"])
            else:
                self.release(
                    row["id"],
                    row["runner_token"],
                    count_attempt=decision.count_attempt,
                    not_before=now + decision.delay_s,
                )
        return failed

    def expired(self, *, now: float, limit: int = 100) -> list[JobRecord]:
        rows = self.db.fetch_all(
            "SELECT * FROM image_jobs WHERE expires_at IS NOT NULL AND expires_at <= ? "
            "ORDER BY seq LIMIT ?",
            (now, limit),
        )
        return [_record(row) for row in rows]

    def purge(self, job_ids: Iterable[str]) -> int:
        return sum(self.db.execute("DELETE FROM image_jobs WHERE id = ?", (i,)) for i in job_ids)

    # ---- webhooks ----------------------------------------------------------------

    def record_webhook(
        self, job_id: str, attempts: list[dict[str, Any]], state: WebhookState
    ) -> None:
        self.db.execute(
            "UPDATE image_jobs SET webhook_attempts = ?, webhook_state = ? WHERE id = ?",
            (dumps(attempts), state.value, job_id),
        )

    def pending_webhooks(self) -> list[JobRecord]:
        """Finished jobs whose webhook is still to be delivered (the service stopped first)."""
        rows = self.db.fetch_all(
            f"SELECT * FROM image_jobs WHERE webhook_state = 'pending' AND status IN "
            f"{_FINISHED_SQL} ORDER BY seq"
        )
        return [_record(row) for row in rows]


def _cancelled_error() -> dict[str, Any]:
    return {
        "message": "The job was cancelled.",
        "type": "invalid_request_error",
        "param": None,
        "code": "cancelled",
    }


def _record(row: Row) -> JobRecord:
    return JobRecord(
        id=row["id"],
        owner=row["owner"],
        kind=str(row["kind"]),
        status=JobStatus(row["status"]),
        created_at=float(row["created_at"]),
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        expires_at=row["expires_at"],
        attempts=int(row["attempts"]),
        images=int(row["images"]),
        steps=int(row["steps"]),
        step=int(row["step"]),
        images_done=int(row["images_done"]),
        request=loads(row["request"]),
        base_url=row["base_url"],
        image=_bytes(row["image"]),
        mask=_bytes(row["mask"]),
        webhook_url=row["webhook_url"],
        metadata=loads(row["metadata"]),
        result=loads(row["result"]),
        error=loads(row["error"]),
        runner_token=row["runner_token"],
        lease_until=row["lease_until"],
        not_before=float(row["not_before"]),
        webhook_state=WebhookState(row["webhook_state"]) if row["webhook_state"] else None,
        webhook_attempts=loads(row["webhook_attempts"]) or [],
    )


def _bytes(value: Any) -> bytes | None:
    # psycopg may hand bytea back as a memoryview.
    return None if value is None else bytes(value)
