"""A safety checker that cannot serve, through the real service: a folder whose labels do not
fit SDXL_SAFETY_LABELS stops `bentoml serve` at start; damaged weights fail the render worker,
naming SDXL_SAFETY_CHECKER. Apart from test_safety_checker.py: one service at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import safety_checkers
from tests.polling import wait_until
from tests.service_process import running_service, start_service, stop_service

pytestmark = pytest.mark.integration


def test_a_checker_folder_with_labels_it_lacks_stops_the_start(
    tmp_path: Path,
) -> None:
    """Read at start, before any model loads: `bentoml serve` exits naming the variables."""
    folder = safety_checkers.vit_classifier(tmp_path / "vit", flags_everything=True)
    env = {"SDXL_SAFETY_CHECKER": str(folder), "SDXL_SAFETY_LABELS": "porn"}
    stopped = start_service(tmp_path / "svc", env, wait_ready=False)
    try:
        wait_until(lambda: stopped.process.poll() is not None, timeout=120, message="an exit")
    finally:
        stop_service(stopped)
    assert stopped.process.returncode != 0
    assert "SDXL_SAFETY_LABELS does not fit SDXL_SAFETY_CHECKER" in stopped.log_tail()


def test_a_checker_that_fails_to_load_fails_the_render_worker_naming_the_variable(
    tmp_path: Path,
) -> None:
    """As a bad SDXL_VAE: every request is a 503 model_load_failed naming the variable, and
    /readyz never says ready (the checker loads first: no minutes of SDXL before it)."""
    folder = safety_checkers.vit_classifier(tmp_path / "vit", flags_everything=True)
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    with running_service(
        tmp_path / "svc", {"SDXL_SAFETY_CHECKER": str(folder)}, wait_ready=False
    ) as failed:

        def refusal() -> dict[str, Any] | None:
            try:
                answer = httpx.post(f"{failed.api}/images/generations", json={"prompt": "x"})
            except httpx.HTTPError:
                return None  # not listening yet
            error: dict[str, Any] = answer.json().get("error", {})
            return error if error.get("code") == "model_load_failed" else None

        error = wait_until(refusal, timeout=240, interval=0.5, message="the failed load")
        assert f"SDXL_SAFETY_CHECKER='{folder}' cannot be loaded" in error["message"]
        assert httpx.get(f"{failed.root}/readyz").status_code == 503
