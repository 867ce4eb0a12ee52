"""What an image job is: its record in the store, its statuses, its id and its public form.

The record keeps everything needed to run the job again after a restart: the
request as validated (with its seed fixed at submission, so that a second run
makes the same images), an edit's uploads, and the public URL of /v1 at the
time (for `url` answers). The public form is what GET answers and webhooks send.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

JOB_ID_PREFIX = "imgjob_"
OBJECT = "image.job"


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in FINISHED


FINISHED = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class WebhookState(StrEnum):
    PENDING = "pending"  # the job has not ended, or its delivery is still being tried
    DELIVERED = "delivered"
    FAILED = "failed"  # every attempt failed


def new_job_id() -> str:
    # 32 random bytes (256 bits), as the url files' ids: unguessable.
    return JOB_ID_PREFIX + secrets.token_urlsafe(32)


def owner_of(api_key: str | None) -> str:
    """Whose jobs a key sees: a digest of the key (never the key itself); "" without keys."""
    if not api_key:
        return ""
    return hashlib.sha256(api_key.encode()).hexdigest()


@dataclass(kw_only=True)
class JobRecord:
    id: str
    owner: str
    kind: str  # a kind of request (api/request_kinds.py): generation, edit, ...
    status: JobStatus
    created_at: float
    images: int  # n: the images the job makes
    steps: int
    # The request's fields as its synchronous endpoint takes them (seed fixed).
    request: dict[str, Any]
    base_url: str
    image: bytes | None = field(default=None, repr=False)
    mask: bytes | None = field(default=None, repr=False)
    webhook_url: str | None = None
    metadata: dict[str, str] | None = None
    started_at: float | None = None
    finished_at: float | None = None
    expires_at: float | None = None
    attempts: int = 0
    step: int = 0
    images_done: int = 0
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    # The run that holds the job now (a random token per claim) and until when.
    runner_token: str | None = None
    lease_until: float | None = None
    # A queued job is not taken before this time (a retry's backoff); 0: at once.
    not_before: float = 0.0
    webhook_state: WebhookState | None = None
    webhook_attempts: list[dict[str, Any]] = field(default_factory=list)

    def public(self, queue_position: int | None = None) -> dict[str, Any]:
        """The job as GET answers it and webhooks send it."""
        webhook = None
        if self.webhook_url is not None:
            webhook = {
                "url": self.webhook_url,
                "state": self.webhook_state.value if self.webhook_state else None,
                "attempts": self.webhook_attempts,
            }
        return {
            "id": self.id,
            "object": OBJECT,
            "kind": self.kind,
            "status": self.status.value,
            "created_at": int(self.created_at),
            "started_at": _seconds(self.started_at),
            "finished_at": _seconds(self.finished_at),
            "expires_at": _seconds(self.expires_at),
            "queue_position": queue_position if self.status is JobStatus.QUEUED else None,
            "attempts": self.attempts,
            "progress": {
                "step": self.step,
                "steps": self.steps,
                "images_done": self.images_done,
                "images": self.images,
            },
            "result": self.result,
            "error": self.error,
            "metadata": self.metadata,
            "webhook": webhook,
        }


def _seconds(value: float | None) -> int | None:
    return None if value is None else int(value)


def dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


def loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)
