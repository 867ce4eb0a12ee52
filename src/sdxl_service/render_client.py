"""How the HTTP service talks to the render service.

`RenderClient` is what the HTTP layer needs; `BentoRenderClient` adapts the
BentoML dependency handle to it (the remote proxy returns plain dicts, and a
render process that is still starting refuses connections).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from .jobs import GenerationJob, GenerationOutcome, still_loading

logger = logging.getLogger(__name__)

CONNECT_ATTEMPTS = 3


class RenderClient(Protocol):
    async def generate(self, job: GenerationJob) -> GenerationOutcome: ...

    async def cancel(self, request_id: str) -> bool: ...

    async def describe(self) -> dict[str, Any]: ...


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
                # A render process that is starting or restarting refuses or
                # drops the call before working on it; try again before saying
                # 503. (BentoML's own pool refresh used to cause this under load:
                # service.py turns it off.)
                logger.warning("render service connection failed (%s), attempt %d", exc, attempt)
        return still_loading("The render service is not reachable (starting?); try again shortly.")

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
