"""Waiting for a state instead of sleeping: `wait_until` and the service's `/metrics`.

A test that sleeps and then asserts fails on a busy machine and wastes time on
an idle one; these helpers poll for the state the test needs, with a generous
bound that only a real failure reaches.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import httpx
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 60.0


def wait_until(
    predicate: Callable[[], T],
    timeout: float = DEFAULT_TIMEOUT_S,
    interval: float = 0.05,
    message: str | Callable[[], str] = "the condition",
) -> T:
    """Polls `predicate` until it returns something truthy, and returns that.

    AssertionError after `timeout` seconds; `message` (or what it returns, for
    a description of the state at the time) says what was awaited.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            described = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout:g} s waiting for {described}")
        time.sleep(interval)


async def until(predicate: Callable[[], Any], what: str, timeout: float) -> Any:
    """`wait_until` for a test's own event loop: polls without blocking it."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.005)
    return value


def asyncio_test(
    guard_s: float,
) -> Callable[[Callable[..., Coroutine[Any, Any, None]]], Callable[..., None]]:
    """Runs an async test in a fresh event loop (no pytest plugin), failing it past `guard_s`."""

    def decorate(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
        @functools.wraps(test)
        def wrapper(*args: Any, **kwargs: Any) -> None:
            asyncio.run(asyncio.wait_for(test(*args, **kwargs), guard_s))

        return wrapper

    return decorate


def scrape(root: str) -> list[Sample]:
    """Every sample of `GET {root}/metrics`."""
    response = httpx.get(f"{root}/metrics", timeout=30)
    response.raise_for_status()
    return [
        sample
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    ]


def metric_value(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of the samples called `name` (e.g. `sdxl_images_generated_total`,
    `sdxl_stage_seconds_count`) whose labels include `labels`; 0 when none."""
    return sum(
        sample.value
        for sample in samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def metric(root: str, name: str, **labels: str) -> float:
    """One metric of the service at `root`, scraped now."""
    return metric_value(scrape(root), name, **labels)
