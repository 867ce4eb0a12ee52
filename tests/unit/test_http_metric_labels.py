"""Route templates as metric labels: a small fixed set, whatever paths clients send."""

from __future__ import annotations

import asyncio

import pytest

from sdxl_service.api.metric_labels import RealPath, route_template


@pytest.mark.parametrize(
    ("path", "template"),
    [
        ("/v1/images/generations", "/v1/images/generations"),
        ("/v1", "/v1"),
        ("/metrics", "/metrics"),
        ("/generate", "/generate"),
        ("/v1/images/files/abc", "/v1/images/files/{file_id}"),
        ("/v1/images/files/a\nb", "/v1/images/files/{file_id}"),
        ("/v1/images/files/a/b", "/v1/{unknown}"),
        ("/v1/nope", "/v1/{unknown}"),
        ("/v1images/generations", "/{unknown}"),
        ("/static_content/index.css", "/static_content/{asset}"),
    ],
)
def test_paths_map_to_their_route(path: str, template: str) -> None:
    assert route_template(path) == template


def test_a_thousand_made_up_paths_give_three_labels() -> None:
    paths = [f"/v1/images/files/{i}" for i in range(500)] + [f"/x/{i}" for i in range(500)]
    paths += [f"/v1/{i}" for i in range(500)]
    assert {route_template(path) for path in paths} == {
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
