"""Which render workers are up: one small file per worker, read by the HTTP service.

BentoML gives no way to address one worker of a service: its workers share one
socket, so a probe of the render service (as BentoML's own /readyz makes)
reaches one of them at random. To say "ready" only when every worker has
loaded, each worker publishes its state in a file of the directory BentoML
already shares between all processes of one `bentoml serve` and empties when
it starts (`PROMETHEUS_MULTIPROC_DIR`). A file whose process is gone (killed,
restarting) does not count; the worker that replaces it writes its own.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

SHARED_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
_PREFIX = "sdxl-render-worker-"


class WorkerState(StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True)
class WorkerStatus:
    worker: int
    pid: int
    state: WorkerState
    device: str | None = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


class WorkerRegistry:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @classmethod
    def from_environment(cls) -> WorkerRegistry | None:
        """The registry of this `bentoml serve`; None outside of one."""
        shared = os.environ.get(SHARED_DIR_ENV)
        return cls(Path(shared)) if shared else None

    def _path(self, worker: int) -> Path:
        return self.directory / f"{_PREFIX}{worker}.json"

    def publish(self, status: WorkerStatus) -> None:
        """Writes the worker's state; readers never see half a file."""
        path = self._path(status.worker)
        temporary = path.with_suffix(f".{status.pid}.tmp")
        record = {
            "worker": status.worker,
            "pid": status.pid,
            "state": status.state.value,
            "device": status.device,
        }
        temporary.write_text(json.dumps(record))
        temporary.replace(path)

    def statuses(self) -> dict[int, WorkerStatus]:
        """The workers whose process is alive, by worker index."""
        found: dict[int, WorkerStatus] = {}
        for path in self.directory.glob(f"{_PREFIX}*.json"):
            try:
                record = json.loads(path.read_text())
                status = WorkerStatus(
                    worker=int(record["worker"]),
                    pid=int(record["pid"]),
                    state=WorkerState(record["state"]),
                    device=record.get("device"),
                )
            except (OSError, ValueError, KeyError, TypeError):
                continue  # being replaced, or not ours
            if _alive(status.pid):
                found[status.worker] = status
        return found

    def ready_workers(self) -> set[int]:
        return {w for w, s in self.statuses().items() if s.state is WorkerState.READY}

    def all_ready(self, workers: int) -> bool:
        return set(range(1, workers + 1)) <= self.ready_workers()
