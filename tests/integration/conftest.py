"""Fixtures: the real service (`bentoml serve`, tiny preset) on a free loopback port."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.service_process import RunningService, running_service


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    with running_service(tmp_path_factory.mktemp("service")) as running:
        yield running


@pytest.fixture(scope="session")
def service_url(service: RunningService) -> str:
    """Base URL of the OpenAI-compatible API (…/v1)."""
    return service.api


@pytest.fixture
def http(service: RunningService) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.api, timeout=120) as client:
        yield client
