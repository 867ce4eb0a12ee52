"""contract.wire: events survive the wire whatever pieces the socket cuts them into."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from sdxl_service.contract.render_request import (
    GenerationOutcome,
    OutcomeStatus,
    RenderedImage,
    RenderEvent,
    RenderEventType,
)
from sdxl_service.contract.wire import event_frame, read_events


def image(seed: int, width: int, height: int) -> RenderedImage:
    # Every byte value, newlines included, so no pixel can pass for a line end.
    rgb = bytes((seed + i) % 256 for i in range(3 * width * height))
    return RenderedImage(seed=seed, width=width, height=height, rgb=rgb)


EVENTS = [
    RenderEvent(type=RenderEventType.ACCEPTED, worker=2),
    RenderEvent(type=RenderEventType.PARTIAL, index=1, partial_index=0, image=image(5, 16, 8)),
    RenderEvent(
        type=RenderEventType.OUTCOME,
        outcome=GenerationOutcome(
            status=OutcomeStatus.OK, images=[image(7, 24, 16), image(8, 8, 40)]
        ),
    ),
]


def wire(events: list[RenderEvent]) -> bytes:
    return b"".join(event_frame(event) for event in events)


async def pieces(data: bytes, sizes: list[int]) -> AsyncIterator[bytes]:
    start = 0
    for size in sizes:
        yield data[start : start + size]
        start += size
    if start < len(data):
        yield data[start:]


def read(data: bytes, sizes: list[int]) -> list[RenderEvent]:
    async def collect() -> list[RenderEvent]:
        return [event async for event in read_events(pieces(data, sizes))]

    return asyncio.run(collect())


def test_a_frame_carries_its_pixels_raw_after_one_json_line() -> None:
    frame = event_frame(EVENTS[2])
    line, _, payload = frame.partition(b"\n")
    assert b"rgb" not in line
    assert payload == image(7, 24, 16).rgb + image(8, 8, 40).rgb
    assert event_frame(EVENTS[0]) == EVENTS[0].model_dump_json().encode() + b"\n"


@pytest.mark.parametrize("piece", [1, 7, 100, 1 << 20])
def test_events_come_back_equal_whatever_the_piece_size(piece: int) -> None:
    data = wire(EVENTS)
    assert read(data, [piece] * (len(data) // piece + 1)) == EVENTS


def test_random_cuts_of_a_long_stream_lose_nothing() -> None:
    events = EVENTS * 20
    data = wire(events)
    rng = random.Random(3)
    sizes = [rng.randint(1, 5000) for _ in range(len(data))]
    assert read(data, sizes) == events


def test_an_outcome_without_images_needs_no_payload() -> None:
    refused = RenderEvent(
        type=RenderEventType.OUTCOME,
        outcome=GenerationOutcome(status=OutcomeStatus.QUEUE_FULL, retry_after=3.0),
    )
    assert read(wire([refused]), [4096]) == [refused]


@pytest.mark.parametrize("cut", [-1, -500, 30])
def test_a_stream_cut_inside_an_event_ends_before_that_event(cut: int) -> None:
    data = wire(EVENTS)
    complete = len(wire(EVENTS[:2]))
    cut_at = complete + cut if cut > 0 else len(data) + cut
    assert read(data[:cut_at], [4096] * 100) == EVENTS[:2]
