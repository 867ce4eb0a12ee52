"""Deletes a store's expired url files: on demand at most once per interval, and on a timer.

`get` already refuses an expired file, so sweeping is housekeeping: it keeps the
folder or bucket from growing with files nobody fetched. The timer sweeps even
when no new url answer arrives; `maybe_purge` lets a caller sweep sooner, and the
interval keeps either from listing the store more than once a minute (on S3 one
sweep is one HEAD request per object).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable

from .store import FileStore

SWEEP_INTERVAL_S = 60.0

logger = logging.getLogger(__name__)


class FileSweeper:
    """Purges `store`'s expired files at most once per `interval_s`."""

    def __init__(
        self,
        store: FileStore,
        interval_s: float = SWEEP_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.store = store
        self.interval_s = interval_s
        self._clock = clock
        # Due at once: the first sweep clears what an earlier run left behind.
        self._next_due = clock()
        # Held for a whole sweep: a second caller skips instead of sweeping twice.
        self._sweeping = threading.Lock()
        self._task: asyncio.Task[None] | None = None

    def seconds_until_due(self) -> float:
        return max(0.0, self._next_due - self._clock())

    def maybe_purge(self) -> int | None:
        """Sweeps when due; the number of files purged, or None when it did not sweep.

        Blocking (the store's I/O): call it from a thread. Never raises: an
        unreachable bucket must neither fail a request nor stop the timer, and
        the failed sweep waits for the next interval like a good one.
        """
        if not self._sweeping.acquire(blocking=False):
            return None
        try:
            now = self._clock()
            if now < self._next_due:
                return None
            self._next_due = now + self.interval_s
            purged = self.store.purge_expired()
        except Exception:
            logger.exception("Purging expired url files failed; next try in %g s", self.interval_s)
            return None
        finally:
            self._sweeping.release()
        if purged:
            logger.info("Purged %d expired url file(s)", purged)
        return purged

    async def run(self) -> None:
        """Sweeps every interval until cancelled; the sweep runs in a thread."""
        while True:
            await asyncio.to_thread(self.maybe_purge)
            await asyncio.sleep(self.seconds_until_due())

    def start(self) -> None:
        """Starts `run` as a task of the running event loop."""
        if self._task is not None and not self._task.done():
            raise RuntimeError("the sweeper is already running")
        self._task = asyncio.get_running_loop().create_task(self.run(), name="file-sweeper")

    async def stop(self) -> None:
        """Stops the timer; returns once no sweep is in progress."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # A cancelled to_thread leaves its thread running: wait for it to finish.
        await asyncio.to_thread(self._wait_for_sweep)

    def _wait_for_sweep(self) -> None:
        with self._sweeping:
            pass
