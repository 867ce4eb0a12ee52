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

The templates come from the mounted apps' own routes (`RouteLabels.of`), so a
new route is labelled as itself without anyone listing it here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .paths import BENTOML_ASSET_PREFIXES, BENTOML_PAGES, BENTOML_PATHS

_REAL_PATH_KEY = "sdxl.real_path"
# The /v1 app's catch-all (api/app.py) answers unknown paths; it is no route of its own.
_CATCH_ALL = "unknown_path"


class RouteLabels:
    """The route a path belongs to: one of a fixed, small set of strings."""

    def __init__(
        self,
        paths: Iterable[str],
        templates: Iterable[tuple[re.Pattern[str], str]] = (),
        prefixes: Iterable[str] = (),
        api_prefix: str = "/v1",
    ) -> None:
        self.paths = frozenset(paths)
        self.templates = tuple(templates)
        self.prefixes = tuple(prefixes)
        self.api_prefix = api_prefix

    @classmethod
    def of(cls, *mounted: tuple[str, Any], api_prefix: str = "/v1") -> RouteLabels:
        """The labels of BentoML's own paths and of each (prefix, Starlette app)'s routes."""
        paths: set[str] = {*BENTOML_PATHS, *BENTOML_PAGES}
        templates: list[tuple[re.Pattern[str], str]] = []
        prefixes: list[str] = list(BENTOML_ASSET_PREFIXES)
        for prefix, app in mounted:
            if prefix:
                # BentoML's mount answers its prefix both with and without the slash.
                paths.update({prefix, prefix + "/"})
            for route in _routes(app):
                if isinstance(route, Mount):
                    prefixes.append(f"{prefix}{route.path}/")
                elif isinstance(route, Route) and route.name != _CATCH_ALL:
                    full = prefix + route.path
                    if route.param_convertors:
                        pattern = re.escape(prefix) + route.path_regex.pattern.removeprefix("^")
                        templates.append((re.compile("^" + pattern), full))
                    else:
                        paths.add(full)
        return cls(paths, templates, prefixes, api_prefix)

    def __call__(self, path: str) -> str:
        if path in self.paths:
            return path
        for pattern, template in self.templates:
            if pattern.match(path):
                return template
        for prefix in self.prefixes:
            if path.startswith(prefix):
                return prefix + "{asset}"
        unknown = f"{self.api_prefix}/"
        return unknown + "{unknown}" if path.startswith(unknown) else "/{unknown}"


def _routes(app: Any) -> list[BaseRoute]:
    return list(getattr(app, "routes", []))


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


def bound_http_metric_labels(labels: RouteLabels) -> None:
    """Makes BentoML's HTTP metrics middleware label requests by route (the last labels win)."""
    from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware

    middleware: Any = RunnerTrafficMetricsMiddleware
    middleware._route_labels = labels
    if getattr(middleware, "_labels_bounded", False):
        return
    original_call = middleware.__call__

    async def call_with_route_label(self: Any, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            template = middleware._route_labels(scope["path"])
            if template != scope["path"]:
                if not isinstance(self.app, RealPath):
                    self.app = RealPath(self.app)
                scope = {**scope, "path": template, _REAL_PATH_KEY: scope["path"]}
        await original_call(self, scope, receive, send)

    middleware.__call__ = call_with_route_label
    middleware._labels_bounded = True
