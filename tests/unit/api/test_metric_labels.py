"""Route templates as metric labels: a small fixed set, whatever paths clients send."""

from __future__ import annotations

import asyncio

import pytest
from starlette.routing import Route

from sdxl_service.api.app import create_app
from sdxl_service.api.metric_labels import RealPath, RouteLabels
from sdxl_service.api.playground import create_playground_app

API = create_app(lambda: None, max_body_bytes=1024)  # type: ignore[arg-type, return-value]
LABELS = RouteLabels.of(("/v1", API), ("", create_playground_app()))


@pytest.mark.parametrize(
    ("path", "template"),
    [
        ("/v1/images/generations", "/v1/images/generations"),
        ("/v1", "/v1"),
        ("/v1/", "/v1/"),
        ("/metrics", "/metrics"),
        ("/readyz", "/readyz"),
        ("/", "/"),
        ("/v1/images/files/abc", "/v1/images/files/{file_id}"),
        ("/v1/images/files/a\nb", "/v1/images/files/{file_id}"),
        ("/v1/images/files/a/b", "/v1/{unknown}"),
        ("/v1/nope", "/v1/{unknown}"),
        ("/v1images/generations", "/{unknown}"),
        # The render service's routes are not the HTTP process's: its metrics are off.
        ("/render", "/{unknown}"),
        ("/static_content/index.css", "/static_content/{asset}"),
        ("/playground/app.js", "/playground/{asset}"),
    ],
)
def test_paths_map_to_their_route(path: str, template: str) -> None:
    assert LABELS(path) == template


def test_every_route_of_the_api_is_labelled_as_itself() -> None:
    """A route added to api/app.py needs no list edited to get its own label."""
    routes = [r for r in API.routes if isinstance(r, Route) and r.name != "unknown_path"]
    assert len(routes) >= 6
    for route in routes:
        # A templated route's path stands for itself too: its template is the label.
        assert LABELS("/v1" + route.path) == "/v1" + route.path, route.path
    added = create_app(lambda: None, max_body_bytes=1024)  # type: ignore[arg-type, return-value]
    added.add_api_route("/images/brand-new/{thing}", lambda thing: None)
    labels = RouteLabels.of(("/v1", added))
    assert labels("/v1/images/brand-new/42") == "/v1/images/brand-new/{thing}"
    assert LABELS("/v1/images/brand-new/42") == "/v1/{unknown}"


def test_a_thousand_made_up_paths_give_three_labels() -> None:
    paths = [f"/v1/images/files/{i}" for i in range(500)] + [f"/x/{i}" for i in range(500)]
    paths += [f"/v1/{i}" for i in range(500)]
    assert {LABELS(path) for path in paths} == {
        "/v1/images/files/{file_id}",
        "/{unknown}",
        "/v1/{unknown}",
    }


def test_real_path_restores_what_the_metrics_middleware_hid() -> None:
    seen: list[str] = []

    async def app(scope: dict, receive: object, send: object) -> None:
        seen.append(scope["path"])

    hidden = {
        "type": "http",
        "path": "/v1/images/files/{file_id}",
        "sdxl.real_path": "/v1/images/files/abc",
    }
    asyncio.run(RealPath(app)(hidden, None, None))
    asyncio.run(RealPath(app)({"type": "http", "path": "/v1/models"}, None, None))
    assert seen == ["/v1/images/files/abc", "/v1/models"]
