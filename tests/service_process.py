"""Starts and stops the real service (`bentoml serve`, tiny preset) on a free loopback port.

Used by the integration tests and by the benchmarks. BentoML starts each worker
in a session of its own, so killing the process group is not enough: stopping
finds every process of the server by its own BENTOML_HOME (each server gets
one) as well as by ancestry, and raises if any of them survives.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 300
# SIGTERM first: BentoML then stops its workers and the render process frees
# the model; what is still running after this gets SIGKILL.
STOP_GRACE_S = 30
KILL_WAIT_S = 10


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningService:
    root: str  # http://127.0.0.1:PORT
    process: subprocess.Popen[bytes]
    log_path: Path
    bentoml_home: Path

    @property
    def api(self) -> str:
        return f"{self.root}/v1"

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def start_service(
    workdir: Path,
    extra_env: dict[str, str] | None = None,
    target: str = "service:ImagesAPI",
    *,
    wait_ready: bool = True,
) -> RunningService:
    """The service (or another BentoML `target` of this repository), answering
    /readyz; if it never does, what was started is stopped. `wait_ready=False`
    returns at once, for a test that waits on another state (a failed load)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = workdir / "service.log"
    bentoml_home = workdir / "bentoml"
    env = {
        **os.environ,
        "SDXL_PRESET": "tiny",
        "SDXL_CACHE_DIR": str(REPO / ".cache" / "sdxl-service"),
        "SDXL_FILES_DIR": str(workdir / "files"),
        # Each server its own job database (the default would be shared in SDXL_CACHE_DIR).
        "SDXL_JOBS_DATABASE_URL": f"sqlite:///{workdir / 'jobs.sqlite3'}",
        "SDXL_STEPS": "6",
        "BENTOML_HOME": str(bentoml_home),
        "BENTOML_DO_NOT_TRACK": "true",
        "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),
    }
    bentoml_cli = Path(sys.executable).parent / "bentoml"
    # The child keeps its own copy of the log's descriptor.
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                str(bentoml_cli),
                "serve",
                target,
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
    service = RunningService(f"http://127.0.0.1:{port}", process, log_path, bentoml_home)
    if not wait_ready:
        return service
    try:
        _wait_until_ready(service)
    except BaseException:
        # Also on Ctrl-C: a half-started server must not outlive the tests.
        stop_service(service)
        raise
    return service


@contextlib.contextmanager
def running_service(
    workdir: Path,
    extra_env: dict[str, str] | None = None,
    target: str = "service:ImagesAPI",
    *,
    wait_ready: bool = True,
) -> Iterator[RunningService]:
    """The service for the length of a `with` block; stopped however the block ends."""
    service = start_service(workdir, extra_env, target, wait_ready=wait_ready)
    try:
        yield service
    finally:
        stop_service(service)


def _wait_until_ready(service: RunningService) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise RuntimeError(f"bentoml serve exited early:\n{service.log_tail()}")
        try:
            if httpx.get(f"{service.root}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"service not ready after {START_TIMEOUT_S} s:\n{service.log_tail()}")


def stop_service(service: RunningService) -> None:
    """Stops every process of the service; RuntimeError if any is still running after."""
    survivors = _stop(service, _processes_of(service), signal.SIGTERM, STOP_GRACE_S)
    if survivors:
        survivors = _stop(service, survivors, signal.SIGKILL, KILL_WAIT_S)
    with contextlib.suppress(subprocess.TimeoutExpired):
        service.process.wait(timeout=KILL_WAIT_S)  # reaps our own child
    if survivors:
        listed = "\n".join(_describe(p) for p in survivors)
        raise RuntimeError(f"service processes still running after SIGKILL:\n{listed}")


def kill_service(service: RunningService) -> None:
    """SIGKILL to every process of the service at once, as a crash or an OOM kill ends it:
    nothing gets to shut down cleanly. RuntimeError if any is still running after."""
    survivors = _stop(service, _processes_of(service), signal.SIGKILL, KILL_WAIT_S)
    with contextlib.suppress(subprocess.TimeoutExpired):
        service.process.wait(timeout=KILL_WAIT_S)
    if survivors:
        listed = "\n".join(_describe(p) for p in survivors)
        raise RuntimeError(f"service processes still running after SIGKILL:\n{listed}")


def _processes_of(service: RunningService) -> set[psutil.Process]:
    """The server and its descendants, and any process started with its BENTOML_HOME
    (a worker whose parent already died is no longer anyone's descendant)."""
    found: set[psutil.Process] = set()
    if service.process.poll() is None:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(service.process.pid)
            found.add(root)
            found.update(root.children(recursive=True))
    home = str(service.bentoml_home)
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.environ().get("BENTOML_HOME") == home:
                found.add(process)
    return found


def _stop(
    service: RunningService, processes: Iterable[psutil.Process], sig: int, timeout: float
) -> list[psutil.Process]:
    """Sends `sig` and waits for the processes to exit; those still running after `timeout`.

    A process of the service that appears meanwhile (an arbiter restarting a
    worker it saw die) gets the signal too and is waited for as well.
    """
    waiting: set[psutil.Process] = set()
    deadline = time.monotonic() + timeout
    while True:
        newcomers = set(_running({*processes, *_processes_of(service)})) - waiting
        if newcomers:
            _signal(service, newcomers, sig)
            waiting |= newcomers
        running = _running(waiting)
        if not running or time.monotonic() >= deadline:
            return running
        time.sleep(0.1)


def _signal(service: RunningService, processes: Iterable[psutil.Process], sig: int) -> None:
    # The group only while the server is not reaped: until then its pid, which
    # names the group, cannot have been reused.
    if service.process.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(service.process.pid, sig)
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.send_signal(sig)


def _running(processes: Iterable[psutil.Process]) -> list[psutil.Process]:
    """Those still running; a zombie has exited (nobody may be left to reap it)."""
    running = []
    for process in processes:
        with contextlib.suppress(psutil.Error):
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                running.append(process)
    return running


def _describe(process: psutil.Process) -> str:
    try:
        return f"{process.pid}: {' '.join(process.cmdline())}"
    except psutil.Error:
        return str(process.pid)
