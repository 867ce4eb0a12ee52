"""Bounded labels for BentoML's HTTP metrics: the route, never the raw path.

BentoML labels its HTTP metrics (`bentoml_service_request_*`) with
`scope["path"]`, so every guessed file id or made-up path adds series to
/metrics for good: 1,300 such requests grew the HTTP worker by 57 MB and
/metrics from 2 to 9 MB, memory anyone could exhaust. Its metrics middleware
is the outermost layer BentoML builds, outside anything a service can add
with `add_asgi_middleware`, so `bound_http_metric_labels` wraps that class:
it sees a route template, and the real path travels beside it in the scope
until `RealPath`, just inside it, puts it back. Checked against BentoML
1.4.40 by tests/integration (1,000 distinct paths leave /metrics as it was).
"""

from __future__ import annotations

import re
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

# The routes of this server, as labels may name them.
_KNOWN_PATHS = frozenset(
    {
        "/",
        "/livez",
        "/readyz",
        "/healthz",
        "/metrics",
        "/schema.json",
        "/docs.json",
        "/v1",
        "/v1/",
        "/v1/models",
        "/v1/images/generations",
        "/v1/images/edits",
        "/v1/images/variations",
        # The render service's APIs (service.py), called by the HTTP service.
        "/generate",
        "/cancel",
        "/describe",
    }
)
_FILE_ROUTE = re.compile(r"^/v1/images/files/[^/]*$")
# BentoML's index page assets.
_ASSETS = ("/static_content/", "/assets/", "/playground/")
_REAL_PATH_KEY = "sdxl.real_path"


def route_template(path: str) -> str:
    """The route a path belongs to: one of a fixed, small set of strings."""
    if path in _KNOWN_PATHS:
        return path
    if _FILE_ROUTE.match(path):
        return "/v1/images/files/{file_id}"
    for prefix in _ASSETS:
        if path.startswith(prefix):
            return prefix + "{asset}"
    return "/v1/{unknown}" if path.startswith("/v1/") else "/{unknown}"


def real_path(scope: Scope) -> str:
    return str(scope.get(_REAL_PATH_KEY, scope.get("path", "")))


class RealPath:
    """Puts the real path back, just inside BentoML's metrics middleware."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if _REAL_PATH_KEY in scope:
            # raw_path was never changed: only what the metrics read.
            scope = {**scope, "path": scope[_REAL_PATH_KEY]}
            del scope[_REAL_PATH_KEY]
        await self.app(scope, receive, send)


def bound_http_metric_labels() -> None:
    """Makes BentoML's HTTP metrics middleware label requests by route (idempotent)."""
    from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware

    middleware: Any = RunnerTrafficMetricsMiddleware
    if getattr(middleware, "_labels_bounded", False):
        return
    original_call = middleware.__call__

    async def call_with_route_label(self: Any, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            template = route_template(scope["path"])
            if template != scope["path"]:
                if not isinstance(self.app, RealPath):
                    self.app = RealPath(self.app)
                scope = {**scope, "path": template, _REAL_PATH_KEY: scope["path"]}
        await original_call(self, scope, receive, send)

    middleware.__call__ = call_with_route_label
    middleware._labels_bounded = True
