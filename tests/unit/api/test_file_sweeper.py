"""FileSweeper: expired url files are purged at most once per interval, and on a timer."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

import pytest

from sdxl_service.api.files import SWEEP_INTERVAL_S, FileSweeper, LocalFileStore
from tests.polling import wait_until

PNG = b"\x89PNG\r\n\x1a\n" + b"pixels" * 10


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingStore(LocalFileStore):
    """A real local store that counts its sweeps and can fail or hold one."""

    def __init__(self, folder: Path, failures: int = 0) -> None:
        super().__init__(folder, ttl_seconds=-1)  # every file it puts is expired
        self.sweeps = 0
        self.failures = failures
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def purge_expired(self) -> int:
        self.sweeps += 1
        self.entered.set()
        self.release.wait()
        if self.failures:
            self.failures -= 1
            raise OSError("bucket unreachable")
        return super().purge_expired()


def _expired_files(store: LocalFileStore, n: int) -> None:
    for _ in range(n):
        store.put(PNG, "image/png")


def test_default_interval_is_a_minute(tmp_path: Path) -> None:
    assert SWEEP_INTERVAL_S == 60
    assert FileSweeper(LocalFileStore(tmp_path, 60)).interval_s == 60


@pytest.mark.parametrize("interval", [0, -1])
def test_interval_must_be_positive(tmp_path: Path, interval: float) -> None:
    with pytest.raises(ValueError, match="interval_s"):
        FileSweeper(LocalFileStore(tmp_path, 60), interval_s=interval)


def test_first_sweep_is_due_at_once_then_once_per_interval(tmp_path: Path) -> None:
    store = CountingStore(tmp_path)
    clock = FakeClock()
    sweeper = FileSweeper(store, interval_s=60, clock=clock)
    _expired_files(store, 2)

    assert sweeper.maybe_purge() == 2
    assert list(tmp_path.iterdir()) == []

    _expired_files(store, 1)
    clock.now += 59.9
    assert sweeper.maybe_purge() is None
    assert sweeper.seconds_until_due() == pytest.approx(0.1)
    assert store.sweeps == 1
    assert len(list(tmp_path.iterdir())) == 2  # the file and its metadata

    clock.now += 0.1
    assert sweeper.maybe_purge() == 1
    assert store.sweeps == 2
    assert list(tmp_path.iterdir()) == []


def test_nothing_expired_is_a_sweep_of_zero(tmp_path: Path) -> None:
    store = LocalFileStore(tmp_path, ttl_seconds=3600)
    kept = store.put(PNG, "image/png")

    assert FileSweeper(store, clock=FakeClock()).maybe_purge() == 0
    assert store.get(kept) is not None


def test_count_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = CountingStore(tmp_path)
    _expired_files(store, 3)

    with caplog.at_level(logging.INFO, logger="sdxl_service.api.files.sweeper"):
        FileSweeper(store, clock=FakeClock()).maybe_purge()

    assert "Purged 3 expired url file(s)" in caplog.messages


def test_failure_is_logged_not_raised_and_waits_for_the_interval(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = CountingStore(tmp_path, failures=1)
    clock = FakeClock()
    sweeper = FileSweeper(store, interval_s=60, clock=clock)
    _expired_files(store, 1)

    with caplog.at_level(logging.ERROR, logger="sdxl_service.api.files.sweeper"):
        assert sweeper.maybe_purge() is None
    [record] = caplog.records
    assert record.message.startswith("Purging expired url files failed")
    assert record.exc_info is not None and "bucket unreachable" in str(record.exc_info[1])

    # A broken bucket is not hammered: the next try waits for the interval.
    assert sweeper.maybe_purge() is None
    assert store.sweeps == 1
    clock.now += 60
    assert sweeper.maybe_purge() == 1


def test_a_second_caller_does_not_sweep_while_one_sweeps(tmp_path: Path) -> None:
    store = CountingStore(tmp_path)
    store.release.clear()
    clock = FakeClock()
    sweeper = FileSweeper(store, interval_s=60, clock=clock)
    first = threading.Thread(target=sweeper.maybe_purge)
    first.start()
    try:
        assert store.entered.wait(timeout=30)
        clock.now += 3600  # due again, but a sweep is running
        assert sweeper.maybe_purge() is None
    finally:
        store.release.set()
        first.join(timeout=30)
    assert store.sweeps == 1


def test_timer_sweeps_without_anyone_asking(tmp_path: Path) -> None:
    store = CountingStore(tmp_path)
    sweeper = FileSweeper(store, interval_s=0.05)

    async def scenario() -> None:
        sweeper.start()
        try:
            # No url answer arrives: only the timer can purge these.
            for _ in range(3):
                _expired_files(store, 2)
                await asyncio.to_thread(
                    wait_until,
                    lambda: not any(tmp_path.iterdir()),
                    timeout=30,
                    message="the timer to sweep the expired files",
                )
        finally:
            await sweeper.stop()

    asyncio.run(scenario())
    assert store.sweeps >= 3


def test_timer_keeps_going_after_a_failed_sweep(tmp_path: Path) -> None:
    store = CountingStore(tmp_path, failures=2)
    sweeper = FileSweeper(store, interval_s=0.05)
    _expired_files(store, 1)

    async def scenario() -> None:
        sweeper.start()
        try:
            await asyncio.to_thread(
                wait_until,
                lambda: not any(tmp_path.iterdir()),
                timeout=30,
                message="a sweep that works after two that failed",
            )
        finally:
            await sweeper.stop()

    asyncio.run(scenario())
    assert store.sweeps >= 3


def test_stop_waits_for_the_sweep_in_progress(tmp_path: Path) -> None:
    store = CountingStore(tmp_path)
    store.release.clear()
    sweeper = FileSweeper(store, interval_s=60)
    stopped = threading.Event()

    async def scenario() -> None:
        sweeper.start()
        await asyncio.to_thread(store.entered.wait, 30)
        stopping = asyncio.ensure_future(sweeper.stop())
        # stop() cannot return while the store is still sweeping.
        done, _ = await asyncio.wait({stopping}, timeout=0.2)
        assert not done
        store.release.set()
        await stopping
        stopped.set()

    asyncio.run(scenario())
    assert stopped.is_set()
    assert store.sweeps == 1


def test_start_twice_is_refused(tmp_path: Path) -> None:
    sweeper = FileSweeper(LocalFileStore(tmp_path, 60), interval_s=60)

    async def scenario() -> None:
        sweeper.start()
        try:
            with pytest.raises(RuntimeError, match="already running"):
                sweeper.start()
        finally:
            await sweeper.stop()

    asyncio.run(scenario())
