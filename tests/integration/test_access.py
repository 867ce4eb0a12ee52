"""Who may call it (real service with SDXL_API_KEYS and SDXL_CORS_ORIGINS set)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.service_process import RunningService, running_service

pytestmark = pytest.mark.integration

KEY = "sk-test-0123456789"
ORIGIN = "http://playground.example"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    env = {"SDXL_API_KEYS": f"other-key,{KEY}", "SDXL_CORS_ORIGINS": ORIGIN}
    with running_service(tmp_path_factory.mktemp("access"), env) as running:
        yield running


def client(service: RunningService, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=service.api, api_key=key, max_retries=0, timeout=120)


def test_the_openai_client_with_a_listed_key_gets_images(service: RunningService) -> None:
    result = client(service, KEY).images.generate(prompt="x", size="64x64")
    assert result.data[0].b64_json


def test_the_openai_client_with_another_key_gets_authentication_error(
    service: RunningService,
) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        client(service, "random-string").images.generate(prompt="x", size="64x64")
    error = caught.value.body
    assert isinstance(error, dict) and error["code"] == "invalid_api_key"
    assert "random-string" not in caught.value.message


@pytest.mark.parametrize("path", ["/v1/models", "/v1/images/files/x", "/metrics", "/nope"])
def test_without_a_key_only_the_probes_answer(service: RunningService, path: str) -> None:
    response = httpx.get(f"{service.root}{path}")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("path", ["/livez", "/readyz", "/v1"])
def test_probes_and_the_prem_health_check_need_no_key(service: RunningService, path: str) -> None:
    assert httpx.get(f"{service.root}{path}").status_code == 200


def test_metrics_answer_with_a_key(service: RunningService) -> None:
    response = httpx.get(f"{service.root}/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200 and "sdxl_queue_images" in response.text


def test_a_browser_on_an_allowed_origin_passes_the_preflight(service: RunningService) -> None:
    preflight = httpx.options(
        f"{service.api}/images/generations",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    allowed = preflight.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed
    real = httpx.post(
        f"{service.api}/images/generations",
        json={"prompt": "x", "size": "64x64"},
        headers={"Origin": ORIGIN, "Authorization": f"Bearer {KEY}"},
        timeout=120,
    )
    assert real.status_code == 200
    assert real.headers["access-control-allow-origin"] == ORIGIN


def test_another_origin_gets_no_cors_grant(service: RunningService) -> None:
    preflight = httpx.options(
        f"{service.api}/images/generations",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in preflight.headers
