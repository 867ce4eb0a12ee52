"""The render stream's wire format, between a render worker and the HTTP service.

Each `RenderEvent` is one JSON line without its images' pixels, then those
pixels raw, image after image in the order of the line: 3 * width * height
bytes each, so the line says all a reader needs to cut them apart. Base64
inside the line made a 256x256 answer a 262 KB line that both sides encoded,
parsed and decoded, and that crossed the socket in several round trips; raw
it is a quarter smaller and costs no work on either side (make bench-overhead).

Hand-rolled because httpx reads a body as lines or as bytes, not as both; the
reader is a buffer and two loops.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterable
from typing import Any

from .render_request import RenderedImage, RenderEvent

logger = logging.getLogger(__name__)

# The pixels leave the JSON; the reader puts them back from the payload.
_NO_PIXELS: Any = {"image": {"rgb"}, "outcome": {"images": {"__all__": {"rgb"}}}}


def _images(event: RenderEvent) -> list[RenderedImage]:
    if event.image is not None:
        return [event.image]
    return event.outcome.images if event.outcome is not None else []


def event_frame(event: RenderEvent) -> bytes:
    """One event as it goes on the wire: its line, then its images' pixels."""
    line = event.model_dump_json(exclude=_NO_PIXELS).encode() + b"\n"
    return b"".join([line, *(image.rgb for image in _images(event))])


def _image_dicts(header: dict[str, Any]) -> list[dict[str, Any]]:
    if header.get("image") is not None:
        return [header["image"]]
    outcome = header.get("outcome")
    return list(outcome.get("images") or []) if outcome else []


async def read_events(chunks: AsyncIterable[bytes]) -> AsyncGenerator[RenderEvent, None]:
    """The events of a render stream, each once its pixels have all arrived.

    A stream cut short (the worker died mid-event) just ends: the caller
    tells a stream without its outcome by the missing outcome.
    """
    source = aiter(chunks)
    buffer = bytearray()

    async def more() -> bool:
        try:
            buffer.extend(await anext(source))
        except StopAsyncIteration:
            return False
        return True

    while True:
        newline = buffer.find(b"\n")
        while newline < 0:
            if not await more():
                if buffer.strip():
                    logger.warning("render stream ended inside an event line")
                return
            newline = buffer.find(b"\n")
        header = json.loads(buffer[:newline])
        del buffer[: newline + 1]
        images = _image_dicts(header)
        needed = sum(3 * image["width"] * image["height"] for image in images)
        while len(buffer) < needed:
            if not await more():
                logger.warning("render stream ended inside an event's pixels")
                return
        start = 0
        for image in images:
            end = start + 3 * image["width"] * image["height"]
            image["rgb"] = bytes(buffer[start:end])
            start = end
        del buffer[:needed]
        yield RenderEvent.model_validate(header)
