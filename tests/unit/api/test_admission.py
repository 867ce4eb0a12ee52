"""Queue capacity: what fits, what is refused, and the Retry-After it gets."""

from __future__ import annotations

from sdxl_service.api.admission import QueueCapacity
from sdxl_service.contract.render_request import OutcomeStatus


def test_images_that_fit_are_admitted() -> None:
    assert QueueCapacity(8).refusal(backlog=5, n=3) is None


def test_a_full_queue_refuses_with_a_retry_after_from_recent_calls() -> None:
    capacity = QueueCapacity(8)
    capacity.record_call(seconds=4.0, images=2)  # 2 s per image
    refusal = capacity.refusal(backlog=7, n=3)
    assert refusal is not None and refusal.status is OutcomeStatus.QUEUE_FULL
    assert refusal.retry_after == 4.0  # two images must finish first
    assert "busy" in refusal.message


def test_a_request_larger_than_the_queue_is_told_to_ask_for_fewer() -> None:
    refusal = QueueCapacity(4).refusal(backlog=0, n=5)
    assert refusal is not None and "fewer images" in refusal.message


def test_the_estimate_follows_recent_calls_smoothly() -> None:
    capacity = QueueCapacity(8)
    capacity.record_call(seconds=1.0, images=1)
    capacity.record_call(seconds=11.0, images=1)
    assert capacity.seconds_per_image == 1.0 + 0.3 * 10.0
