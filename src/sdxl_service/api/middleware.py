"""ASGI middleware: the request body limit, `/v1` without its slash, and the
OpenAI envelope for the errors BentoML answers itself.

`BodySizeLimit` wraps the /v1 FastAPI app; the others wrap BentoML's whole app
(`add_asgi_middleware` in service.py).
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError, client_closed, routing_error
from .metric_labels import real_path
from .paths import BENTOML_PATHS


class BodyBudget:
    """Bytes of request bodies held in memory by this process, against a budget.

    Eight concurrent 45 MB uploads once took the HTTP process from 350 MB to
    1.55 GB before each was refused; past the budget a body is refused (429)
    before it is read. One event loop per process: no lock needed.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.held = 0

    def fits(self, n: int) -> bool:
        return self.held + n <= self.max_bytes

    def reserve(self, n: int) -> bool:
        if not self.fits(n):
            return False
        self.held += n
        return True

    def release(self, n: int) -> None:
        self.held -= n


class BodySizeLimit:
    """413 for bodies over the limit, whether Content-Length says so or not;
    429 while the bodies in flight already fill the budget.

    The body is read here, before FastAPI, because FastAPI turns any error
    raised while it reads a body into its own 400.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, budget: BodyBudget | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.budget = budget or BodyBudget(max_bytes * 4)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        too_large = APIError(
            413, f"The request body is larger than {self.max_bytes} bytes.", code="too_large"
        ).response()
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await too_large(scope, receive, send)
            return
        if declared.isdigit() and not self.budget.fits(int(declared)):
            await self._busy(scope, receive, send)
            return
        reserved = 0
        try:
            body = bytearray()
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    # The client went away part-way through its body. Nobody reads
                    # the answer, but BentoML's traffic middleware waits for one
                    # (and keeps the request "in progress") until it comes.
                    await client_closed().response()(scope, receive, send)
                    return
                chunk = message.get("body", b"")
                if not self.budget.reserve(len(chunk)):
                    await self._busy(scope, receive, send)
                    return
                reserved += len(chunk)
                body += chunk
                if len(body) > self.max_bytes:
                    await too_large(scope, receive, send)
                    return
                if not message.get("more_body", False):
                    break
            data = bytes(body)
            del body  # one copy in memory while the request runs, not two
            await self.app(scope, self._replay(data, receive), send)
        finally:
            self.budget.release(reserved)

    async def _busy(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = APIError(
            429,
            "The server is receiving too many large requests at once; retry shortly.",
            code="uploads_busy",
            headers={"Retry-After": "2", "x-should-retry": "true"},
        )
        await error.response()(scope, receive, send)

    @staticmethod
    def _replay(body: bytes, receive: Receive) -> Receive:
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                # Later reads wait for the disconnect, as they would have.
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return replay


class MountRootAlias:
    """Serves `/v1` as `/v1/` instead of Starlette's 307 redirect.

    The Prem app health-checks `GET {baseUrl}/v1` and counts only a 2xx as up.
    """

    def __init__(self, app: ASGIApp, path: str) -> None:
        self.app = app
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == self.path:
            scope = {**scope, "path": self.path + "/", "raw_path": (self.path + "/").encode()}
        await self.app(scope, receive, send)


class OpenAIErrorsEverywhere:
    """Any error BentoML answers in plain text (an unknown path outside /v1, a
    /v1 path its router cannot match) leaves in the OpenAI envelope instead.

    BentoML's probes and /metrics keep their own answers.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = real_path(scope)
        if scope["type"] != "http" or path in BENTOML_PATHS:
            await self.app(scope, receive, send)
            return
        replaced: list[int] = []

        async def send_enveloped(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                is_json = headers.get(b"content-type", b"").startswith(b"application/json")
                if message["status"] >= 400 and not is_json:
                    replaced.append(message["status"])
                    return
            elif replaced:
                if not message.get("more_body", False):
                    await self._send_error(scope, replaced[0], path, send)
                return
            await send(message)

        await self.app(scope, receive, send_enveloped)

    @staticmethod
    async def _send_error(scope: Scope, status: int, path: str, send: Send) -> None:
        error = routing_error(status, scope.get("method", "GET"), path)
        body = json.dumps(error.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
