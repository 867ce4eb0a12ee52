"""Optional bearer API keys: required only when configured, rotated through a file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from sdxl_service.api.api_keys import APIKeyAuth, APIKeys


def app(keys: APIKeys, metrics_public: bool = False) -> TestClient:
    async def ok(_request: object) -> PlainTextResponse:
        return PlainTextResponse("ok")

    paths = ["/v1/images/generations", "/v1/models", "/metrics", "/livez", "/readyz", "/v1"]
    inner = Starlette(
        routes=[Route(path, ok, methods=["GET", "POST", "OPTIONS"]) for path in paths]
    )
    return TestClient(APIKeyAuth(inner, keys, metrics_public))


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_without_keys_any_key_or_none_is_accepted() -> None:
    client = app(APIKeys([]))
    assert client.post("/v1/images/generations").status_code == 200
    assert client.post("/v1/images/generations", headers=bearer("random-string")).status_code == 200


def test_with_keys_only_a_listed_key_gets_in() -> None:
    client = app(APIKeys(["k1", "k2"]))
    assert client.get("/v1/models", headers=bearer("k2")).status_code == 200
    for headers in ({}, bearer("k3"), {"Authorization": "Basic k1"}, bearer("")):
        response = client.get("/v1/models", headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        error = response.json()["error"]
        assert (error["code"], error["type"], error["param"]) == (
            "invalid_api_key",
            "invalid_request_error",
            None,
        )
        assert "k1" not in response.text and "k2" not in response.text


def test_probes_and_the_prem_health_check_stay_open() -> None:
    client = app(APIKeys(["k1"]))
    for path in ("/livez", "/readyz", "/v1"):
        assert client.get(path).status_code == 200


def test_the_playground_page_and_its_assets_load_without_a_key_when_it_is_served() -> None:
    async def ok(_request: object) -> PlainTextResponse:
        return PlainTextResponse("ok")

    paths = ["/", "/playground/playground.js", "/playgroundx", "/v1/models"]
    inner = Starlette(routes=[Route(path, ok, methods=["GET", "POST"]) for path in paths])
    served = TestClient(APIKeyAuth(inner, APIKeys(["k1"]), playground_public=True))
    assert served.get("/").status_code == 200
    assert served.get("/playground/playground.js").status_code == 200
    assert served.head("/").status_code == 200
    # Only reading the page: its API calls, other methods and look-alike paths need the key.
    for method, path in (("GET", "/v1/models"), ("POST", "/"), ("GET", "/playgroundx")):
        assert served.request(method, path).status_code == 401
    not_served = TestClient(APIKeyAuth(inner, APIKeys(["k1"])))
    assert not_served.get("/").status_code == 401  # BentoML's index with SDXL_PLAYGROUND=false


def test_metrics_need_a_key_unless_public() -> None:
    assert app(APIKeys(["k1"])).get("/metrics").status_code == 401
    assert app(APIKeys(["k1"])).get("/metrics", headers=bearer("k1")).status_code == 200
    assert app(APIKeys(["k1"]), metrics_public=True).get("/metrics").status_code == 200


def test_a_cors_preflight_needs_no_key() -> None:
    client = app(APIKeys(["k1"]))
    preflight = {"Origin": "http://ui", "Access-Control-Request-Method": "POST"}
    assert client.options("/v1/images/generations", headers=preflight).status_code == 200
    assert client.options("/v1/images/generations").status_code == 401


def test_the_key_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("# team keys\nold-key\n\n")
    keys = APIKeys([], keys_file)
    assert keys.required and keys.accepts("old-key") and not keys.accepts("# team keys")
    keys_file.write_text("new-key\n")
    stat = keys_file.stat()
    os.utime(keys_file, (stat.st_atime, stat.st_mtime + 5))  # a later write, whatever the clock
    assert keys.accepts("new-key") and not keys.accepts("old-key")


def test_an_empty_key_file_refuses_everyone(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("")
    client = app(APIKeys([], keys_file))
    assert client.get("/v1/models", headers=bearer("anything")).status_code == 401


def test_a_vanished_key_file_keeps_the_keys_read_before(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("k1\n")
    keys = APIKeys([], keys_file)
    keys_file.unlink()
    assert keys.accepts("k1")


@pytest.mark.parametrize("value", ["a,b", " a , b ,"])
def test_keys_come_comma_separated_and_stay_secret(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    from sdxl_service.settings import load_settings

    monkeypatch.setenv("SDXL_API_KEYS", value)
    settings = load_settings()
    assert [key.get_secret_value() for key in settings.api_keys] == ["a", "b"]
    assert "'a'" not in repr(settings) and "'b'" not in repr(settings)
