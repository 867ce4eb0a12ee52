"""How the HTTP service talks to the pipeline service.

`PipelineClient` is what the HTTP layer needs; `BentoPipelineClient` adapts the
BentoML dependency handle to it (the remote proxy returns plain dicts, and a
pipeline process that is still starting refuses connections).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from .jobs import GenerationJob, GenerationOutcome, OutcomeStatus

logger = logging.getLogger(__name__)

# Seconds a client should wait while the pipeline process starts or loads.
LOADING_RETRY_AFTER = 10.0
CONNECT_ATTEMPTS = 3


class PipelineClient(Protocol):
    async def generate(self, job: GenerationJob) -> GenerationOutcome: ...

    async def cancel(self, request_id: str) -> bool: ...

    async def describe(self) -> dict[str, Any]: ...


def _is_connection_error(exc: Exception) -> bool:
    # BentoML's remote proxy talks aiohttp; a pipeline process that is not
    # listening yet refuses the connection.
    import aiohttp
    import httpx
    from bentoml.exceptions import BentoMLException

    transport_errors = aiohttp.ClientConnectionError | httpx.TransportError | ConnectionError
    return isinstance(exc, transport_errors) or (
        isinstance(exc, BentoMLException) and getattr(exc, "error_code", 0) in (502, 503)
    )


class BentoPipelineClient:
    def __init__(self, handle: Any) -> None:
        self._handle = handle

    async def generate(self, job: GenerationJob) -> GenerationOutcome:
        for attempt in range(1, CONNECT_ATTEMPTS + 1):
            try:
                result = await self._handle.to_async.generate(job=job)
                return GenerationOutcome.model_validate(result)
            except Exception as exc:
                if not _is_connection_error(exc):
                    raise
                # A pipeline process that is starting or restarting refuses or
                # drops the call before working on it; try again before saying
                # 503. (BentoML's own pool refresh used to cause this under load:
                # service.py turns it off.)
                logger.warning("pipeline connection failed (%s), attempt %d", exc, attempt)
        return GenerationOutcome(
            status=OutcomeStatus.LOADING,
            message="The model server is not reachable (starting?); try again shortly.",
            retry_after=LOADING_RETRY_AFTER,
        )

    async def cancel(self, request_id: str) -> bool:
        try:
            return bool(await self._handle.to_async.cancel(request_id=request_id))
        except Exception:
            # Nothing left to cancel when the pipeline process is gone.
            logger.warning("could not cancel %s", request_id, exc_info=True)
            return False

    async def describe(self) -> dict[str, Any]:
        try:
            return dict(await self._handle.to_async.describe())
        except Exception as exc:
            if _is_connection_error(exc):
                return {"loaded": False, "error": None}
            raise
