"""The playground page at GET / (real service): served by the service itself, nothing else moved."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.integration


def test_the_page_is_served_with_its_own_script_and_style(service: Any) -> None:
    page = httpx.get(f"{service.root}/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    for field in ("prompt", "negative_prompt", "size", "n", "seed", "num_inference_steps"):
        assert f'id="{field}"' in page.text
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    # No CDN: every file the page needs comes from this server.
    assert assets and all(asset.startswith("/playground/") for asset in assets)
    for asset in assets:
        served = httpx.get(f"{service.root}{asset}")
        assert served.status_code == 200, asset
        assert served.content


def test_the_page_calls_the_v1_api_it_sits_beside(service: Any) -> None:
    script = httpx.get(f"{service.root}/playground/playground.js").text
    assert 'const API = "/v1"' in script
    assert "/images/generations" in script and "stream: true" in script


def test_the_other_routes_are_where_they_were(service: Any) -> None:
    assert httpx.get(f"{service.root}/v1").json() == {"status": True}
    assert httpx.get(f"{service.root}/livez").status_code == 200
    assert httpx.get(f"{service.root}/readyz").status_code == 200
    missing = httpx.get(f"{service.root}/playground/nope.js")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
