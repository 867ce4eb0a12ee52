"""How the HTTP service talks to the render service.

`RenderClient` is what the HTTP layer needs; `BentoRenderClient` adapts the
BentoML dependency handle to it (the remote proxy returns plain dicts, and a
render process that is still starting refuses connections).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from .jobs import (
    LOADING_RETRY_AFTER,
    GenerationJob,
    GenerationOutcome,
    OutcomeStatus,
    still_loading,
)
from .metrics import ServiceMetrics

logger = logging.getLogger(__name__)

CONNECT_ATTEMPTS = 3


class RenderClient(Protocol):
    async def generate(self, job: GenerationJob) -> GenerationOutcome: ...

    async def cancel(self, request_id: str) -> bool: ...

    async def describe(self) -> dict[str, Any]: ...


def _was_dropped(exc: Exception) -> bool:
    """The render service closed the connection after taking the call (not a refusal)."""
    import aiohttp

    return isinstance(exc, aiohttp.ServerDisconnectedError)


def _is_connection_error(exc: Exception) -> bool:
    # BentoML's remote proxy talks aiohttp; a render process that is not
    # listening yet refuses the connection.
    import aiohttp
    import httpx
    from bentoml.exceptions import BentoMLException

    transport_errors = aiohttp.ClientConnectionError | httpx.TransportError | ConnectionError
    return isinstance(exc, transport_errors) or (
        isinstance(exc, BentoMLException) and getattr(exc, "error_code", 0) in (502, 503)
    )


class BentoRenderClient:
    def __init__(self, handle: Any, metrics: ServiceMetrics | None = None) -> None:
        self._handle = handle
        self._metrics = metrics

    async def generate(self, job: GenerationJob) -> GenerationOutcome:
        dropped = False
        for attempt in range(1, CONNECT_ATTEMPTS + 1):
            try:
                result = await self._handle.to_async.generate(job=job)
                outcome = GenerationOutcome.model_validate(result)
                if dropped and outcome.status is OutcomeStatus.LOADING:
                    # Dropped, then answered by a worker that is still loading:
                    # the one that held the call died and BentoML started anew
                    # (on the same socket, so no refusal in between).
                    return self._worker_lost()
                return outcome
            except Exception as exc:
                if not _is_connection_error(exc):
                    raise
                logger.warning("render service connection failed (%s), attempt %d", exc, attempt)
                if _was_dropped(exc):
                    # A pooled keep-alive connection the server had already
                    # closed fails like this before any work: try again.
                    dropped = True
                elif dropped:
                    # Dropped, then refused: the process that held the call is
                    # gone and a new one is starting. Say so now, not after
                    # the new one has loaded.
                    return self._worker_lost()
        if dropped:
            return self._worker_lost()
        return still_loading("The render service is not reachable (starting?); try again shortly.")

    def _worker_lost(self) -> GenerationOutcome:
        if self._metrics is not None:
            self._metrics.count_render_call_lost()
        return GenerationOutcome(
            status=OutcomeStatus.WORKER_RESTARTED,
            message="The render worker stopped while it made these images and is restarting; "
            "retry shortly.",
            retry_after=LOADING_RETRY_AFTER,
        )

    async def cancel(self, request_id: str) -> bool:
        try:
            return bool(await self._handle.to_async.cancel(request_id=request_id))
        except Exception:
            # Nothing left to cancel when the render process is gone.
            logger.warning("could not cancel %s", request_id, exc_info=True)
            return False

    async def describe(self) -> dict[str, Any]:
        try:
            return dict(await self._handle.to_async.describe())
        except Exception as exc:
            if _is_connection_error(exc):
                return {"loaded": False, "error": None}
            raise
