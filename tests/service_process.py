"""Starts and stops the real service (`bentoml serve`, tiny preset) on a free loopback port.

Used by the integration tests and by the benchmarks.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningService:
    root: str  # http://127.0.0.1:PORT
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def api(self) -> str:
        return f"{self.root}/v1"

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def start_service(workdir: Path, extra_env: dict[str, str] | None = None) -> RunningService:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = workdir / "service.log"
    env = {
        **os.environ,
        "SDXL_PRESET": "tiny",
        "SDXL_CACHE_DIR": str(REPO / ".cache" / "sdxl-service"),
        "SDXL_FILES_DIR": str(workdir / "files"),
        "SDXL_STEPS": "6",
        "BENTOML_HOME": str(workdir / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "true",
        "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),
    }
    bentoml_cli = Path(sys.executable).parent / "bentoml"
    log = log_path.open("wb")
    process = subprocess.Popen(
        [
            str(bentoml_cli),
            "serve",
            "service:ImagesAPI",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    service = RunningService(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"bentoml serve exited early:\n{service.log_tail()}")
        try:
            if httpx.get(f"{service.root}/readyz", timeout=2).status_code == 200:
                return service
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_service(service)
    raise RuntimeError(f"service not ready after {START_TIMEOUT_S} s:\n{service.log_tail()}")


def stop_service(service: RunningService) -> None:
    if service.process.poll() is None:
        os.killpg(service.process.pid, signal.SIGTERM)
        try:
            service.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(service.process.pid, signal.SIGKILL)
            service.process.wait()
