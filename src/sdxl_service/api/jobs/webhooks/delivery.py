"""Sending one webhook: signed, to the checked address, retried with backoff; each attempt reported.

An attempt succeeds on any 2xx answer, as the specification says; anything
else, a timeout or a refused connection is retried after
SDXL_WEBHOOK_RETRY_SECONDS, doubled after each failure, up to
SDXL_WEBHOOK_ATTEMPTS attempts. Redirects are not followed (a redirect could
lead to an address the host policy refuses). The host is checked again before
every attempt: what a name resolves to may have changed since the job came.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx

from .hosts import WebhookHosts, WebhookRefused
from .signing import WebhookSigner

logger = logging.getLogger(__name__)

# Only so much of a receiver's answer is kept on the job.
ANSWER_EXCERPT_CHARS = 200

AttemptSink = Callable[[list[dict[str, Any]]], Awaitable[None]]


@dataclass(frozen=True)
class WebhookEvent:
    message_id: str  # the same for every attempt: the receiver's idempotency key
    event_type: str  # image.job.succeeded, image.job.failed, image.job.cancelled
    data: dict[str, Any]

    def body(self) -> bytes:
        # The specification's payload shape: type, timestamp, data.
        payload = {
            "type": self.event_type,
            "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "data": self.data,
        }
        return json.dumps(payload, separators=(",", ":")).encode()


class WebhookDelivery:
    def __init__(
        self,
        signer: WebhookSigner,
        hosts: WebhookHosts,
        *,
        attempts: int,
        timeout_s: float,
        retry_s: float,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.signer = signer
        self.hosts = hosts
        self.attempts = attempts
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self._transport = transport
        self._sleep = sleep

    async def deliver(
        self, url: str, event: WebhookEvent, record: AttemptSink, done: list[dict[str, Any]]
    ) -> bool:
        """Sends `event` to `url` until a receiver takes it; True when one did.

        `done`: the attempts made before (a delivery resumed after a restart);
        `record` gets the list after each attempt.
        """
        body = event.body()
        attempts = list(done)
        while len(attempts) < self.attempts:
            if attempts:
                await self._sleep(self.retry_s * 2 ** (len(attempts) - 1))
            attempt, delivered, final = await self._attempt(url, event.message_id, body)
            attempt["attempt"] = len(attempts) + 1
            attempts.append(attempt)
            await record(attempts)
            if delivered:
                return True
            if final:
                break
        logger.warning(
            "webhook %s to %s given up after %d attempts", event.message_id, url, len(attempts)
        )
        return False

    async def _attempt(
        self, url: str, message_id: str, body: bytes
    ) -> tuple[dict[str, Any], bool, bool]:
        """One attempt: what to record, whether it was delivered, whether retrying is pointless."""
        started = time.time()
        attempt: dict[str, Any] = {"at": int(started), "status_code": None, "error": None}
        try:
            target = await self.hosts.check(url)
        except WebhookRefused as exc:
            attempt["error"] = f"refused: {exc}"
            return attempt, False, True
        headers = self.signer.headers(message_id, int(time.time()), body)
        headers |= {"content-type": "application/json", "host": target.host_header}
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        try:
            async with httpx.AsyncClient(
                timeout=self.timeout_s,
                follow_redirects=False,
                # No HTTP(S)_PROXY from the environment: the connection goes to the checked address.
                trust_env=False,
                transport=self._transport,
            ) as client:
                response = await client.post(
                    target.connect_url, content=body, headers=headers, extensions=extensions
                )
            attempt["status_code"] = response.status_code
            if not response.is_success:
                attempt["error"] = response.text[:ANSWER_EXCERPT_CHARS] or response.reason_phrase
        except httpx.HTTPError as exc:
            attempt["error"] = f"{type(exc).__name__}: {exc}"[:ANSWER_EXCERPT_CHARS]
        attempt["duration_ms"] = round(1000 * (time.time() - started), 1)
        return attempt, attempt["error"] is None, False
