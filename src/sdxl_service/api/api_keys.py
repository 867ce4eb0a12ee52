"""Who may call the service: optional bearer API keys.

With `SDXL_API_KEYS` or `SDXL_API_KEYS_FILE` set, every request needs
`Authorization: Bearer <key>` (what every OpenAI client sends), except the
probes, the Prem app's health check and, with `SDXL_METRICS_PUBLIC`,
/metrics; anything else is a 401 in OpenAI's envelope. Keys are compared in
constant time and never logged. The file is re-read when it changes, so keys
rotate without a restart.
"""

from __future__ import annotations

import hmac
import logging
import threading
from collections.abc import Iterable
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import APIError
from .paths import API_PREFIX, METRICS_PATH, PLAYGROUND_ASSETS, PLAYGROUND_PAGE, PROBE_PATHS

logger = logging.getLogger(__name__)

# The probes, and the Prem app's health check (GET /v1), which tells nothing.
# The probes and the Prem app's health check (the /v1 index).
OPEN_PATHS = (*PROBE_PATHS, API_PREFIX, API_PREFIX + "/")


def _read_key_file(path: Path) -> list[bytes]:
    lines = path.read_text().splitlines()
    return [line.strip().encode() for line in lines if line.strip() and not line.startswith("#")]


class APIKeys:
    """The accepted keys: from the settings, plus a file watched by its mtime."""

    def __init__(self, keys: Iterable[str], file: Path | None = None) -> None:
        self._fixed = [key.encode() for key in keys if key]
        self._file = file
        self._file_keys: list[bytes] = []
        self._file_stamp: tuple[float, int] | None = None
        self._lock = threading.Lock()
        self._reload_if_changed()

    @property
    def required(self) -> bool:
        return bool(self._fixed) or self._file is not None

    def accepts(self, presented: str) -> bool:
        self._reload_if_changed()
        candidate = presented.encode()
        # Every key is compared, match or not: the time taken says nothing.
        matches = [hmac.compare_digest(candidate, key) for key in self._fixed + self._file_keys]
        return any(matches)

    def _reload_if_changed(self) -> None:
        if self._file is None:
            return
        try:
            stat = self._file.stat()
        except OSError:
            logger.warning("API key file %s is gone; keeping the keys read before", self._file)
            return
        stamp = (stat.st_mtime, stat.st_size)
        if stamp == self._file_stamp:
            return
        with self._lock:
            if stamp == self._file_stamp:
                return
            try:
                self._file_keys = _read_key_file(self._file)
            except OSError:
                logger.warning(
                    "cannot read API key file %s; keeping the keys read before", self._file
                )
                return
            self._file_stamp = stamp
        if not self._file_keys and not self._fixed:
            logger.warning("API key file %s holds no key: every request is refused", self._file)
        else:
            logger.info("API keys loaded: %d from %s", len(self._file_keys), self._file)


class APIKeyAuth:
    """401 for a request without an accepted key, before anything reads its body."""

    def __init__(
        self,
        app: ASGIApp,
        keys: APIKeys,
        metrics_public: bool = False,
        playground_public: bool = False,
    ) -> None:
        self.app = app
        self.keys = keys
        self.metrics_public = metrics_public
        # A browser loads a page without an Authorization header: the playground's
        # page asks for the key and sends it on its /v1 calls.
        self.playground_public = playground_public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys.required or self._is_open(scope):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        scheme, _, key = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and self.keys.accepts(key.strip()):
            await self.app(scope, receive, send)
            return
        message = (
            "Incorrect API key provided."
            if key
            else "You didn't provide an API key: send it as 'Authorization: Bearer <key>'."
        )
        error = APIError(
            401,
            message,
            code="invalid_api_key",
            error_type="invalid_request_error",
            headers={"WWW-Authenticate": "Bearer"},
        )
        await error.response()(scope, receive, send)

    def _is_open(self, scope: Scope) -> bool:
        path = scope["path"]
        if path in OPEN_PATHS or (path == METRICS_PATH and self.metrics_public):
            return True
        page = path == PLAYGROUND_PAGE or path.startswith(PLAYGROUND_ASSETS + "/")
        if page and self.playground_public and scope["method"] in ("GET", "HEAD"):
            return True
        # A CORS preflight carries no credentials by design; the real request will.
        headers = dict(scope["headers"])
        return scope["method"] == "OPTIONS" and b"access-control-request-method" in headers
