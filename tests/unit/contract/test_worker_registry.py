"""WorkerRegistry: the files render workers publish their state in, as the HTTP side reads them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdxl_service.contract.worker_registry import (
    SHARED_DIR_ENV,
    WorkerRegistry,
    WorkerState,
    WorkerStatus,
)

ME = os.getpid()


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    assert child.wait(timeout=60) == 0
    return child.pid


def test_publish_then_read(tmp_path: Path) -> None:
    registry = WorkerRegistry(tmp_path)
    registry.publish(WorkerStatus(1, ME, WorkerState.LOADING, "cuda:0"))
    registry.publish(WorkerStatus(2, ME, WorkerState.READY))
    assert registry.statuses() == {
        1: WorkerStatus(1, ME, WorkerState.LOADING, "cuda:0"),
        2: WorkerStatus(2, ME, WorkerState.READY, None),
    }
    assert registry.ready_workers() == {2}
    # A reader in another process sees the same: only the files matter.
    assert WorkerRegistry(tmp_path).statuses() == registry.statuses()
    # No temporary file is left beside them.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "sdxl-render-worker-1.json",
        "sdxl-render-worker-2.json",
    ]


def test_a_new_state_replaces_the_old(tmp_path: Path) -> None:
    registry = WorkerRegistry(tmp_path)
    registry.publish(WorkerStatus(1, ME, WorkerState.LOADING))
    assert registry.ready_workers() == set()
    registry.publish(WorkerStatus(1, ME, WorkerState.READY))
    assert registry.ready_workers() == {1}
    registry.publish(WorkerStatus(1, ME, WorkerState.FAILED))
    assert registry.statuses()[1].state is WorkerState.FAILED
    assert registry.ready_workers() == set()


def test_the_file_of_a_dead_process_does_not_count(tmp_path: Path) -> None:
    registry = WorkerRegistry(tmp_path)
    registry.publish(WorkerStatus(1, dead_pid(), WorkerState.READY))
    assert registry.statuses() == {}
    assert registry.ready_workers() == set()
    assert not registry.all_ready(1)
    # Its successor writes its own.
    registry.publish(WorkerStatus(1, ME, WorkerState.READY))
    assert registry.all_ready(1)


def test_all_ready_only_when_every_worker_is(tmp_path: Path) -> None:
    registry = WorkerRegistry(tmp_path)
    assert not registry.all_ready(2)
    registry.publish(WorkerStatus(1, ME, WorkerState.READY))
    assert not registry.all_ready(2)
    registry.publish(WorkerStatus(2, ME, WorkerState.LOADING))
    assert not registry.all_ready(2)
    registry.publish(WorkerStatus(2, dead_pid(), WorkerState.READY))
    assert not registry.all_ready(2)
    registry.publish(WorkerStatus(2, ME, WorkerState.READY))
    assert registry.all_ready(2)
    assert registry.all_ready(1)
    assert not registry.all_ready(3)


@pytest.mark.parametrize(
    "content",
    [
        "",
        '{"worker": 3, "pid": ',  # half written
        "not json",
        "null",
        "[3]",
        '{"worker": 3, "state": "ready"}',
        '{"worker": "three", "pid": PID, "state": "ready"}',
        '{"worker": 3, "pid": PID, "state": "asleep"}',
    ],
)
def test_a_damaged_file_is_ignored(tmp_path: Path, content: str) -> None:
    registry = WorkerRegistry(tmp_path)
    registry.publish(WorkerStatus(1, ME, WorkerState.READY))
    (tmp_path / "sdxl-render-worker-3.json").write_text(content.replace("PID", str(ME)))
    assert registry.statuses() == {1: WorkerStatus(1, ME, WorkerState.READY)}
    assert registry.ready_workers() == {1}


def test_other_files_of_the_shared_directory_are_ignored(tmp_path: Path) -> None:
    registry = WorkerRegistry(tmp_path)
    # prometheus_client's multiprocess files live in the same directory.
    (tmp_path / "counter_123.db").write_bytes(b"\0" * 16)
    (tmp_path / "other.json").write_text(json.dumps({"worker": 1, "pid": ME, "state": "ready"}))
    (tmp_path / "sdxl-render-worker-1.99.tmp").write_text(
        json.dumps({"worker": 1, "pid": ME, "state": "ready"})
    )
    assert registry.statuses() == {}
    assert not registry.all_ready(1)


def test_a_missing_directory_has_no_workers(tmp_path: Path) -> None:
    assert WorkerRegistry(tmp_path / "absent").statuses() == {}


def test_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(SHARED_DIR_ENV, raising=False)
    assert WorkerRegistry.from_environment() is None
    monkeypatch.setenv(SHARED_DIR_ENV, str(tmp_path))
    registry = WorkerRegistry.from_environment()
    assert registry is not None and registry.directory == tmp_path
