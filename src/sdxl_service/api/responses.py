"""Rendered images -> the Images API answer: composite, encode, store (url) or base64.

Also the answer's stream form (`stream=true`) and the public URL of /v1 behind
proxies. Runs in the HTTP service; encoding is CPU work for threads.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from ..contract.render_request import (
    CONTENT_POLICY_MESSAGE,
    GenerationOutcome,
    OutcomeStatus,
    RenderedImage,
)
from ..metrics import ServiceMetrics
from ..settings import Settings
from .encoding import CONTENT_TYPES, encode_image, pixels_of, resize_to, to_base64, to_pil
from .errors import APIError, outcome_error
from .files import FileStore
from .infotext import infotext
from .inpaint_options import paste_back
from .request_rules import ResolvedRequest
from .schemas import ImageData, ImageError, ImagesResponse

# OpenAI's usage block; SDXL counts no tokens.
_NO_USAGE = {
    "input_tokens": 0,
    "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
    "output_tokens": 0,
    "total_tokens": 0,
}


# Encoding this many pixels or fewer (all images of an answer, at the render
# size) takes a few ms (PNG of 256x256: ~2 ms): less than the two thread
# handoffs of a thread pool on a busy machine, so it runs on the event loop.
# Larger answers (a 1024x1024 PNG is ~30 ms) and `url` ones (disk) go to threads,
# one per image (serving.py).
INLINE_ENCODE_PIXELS = 2 * 256 * 256


def encodes_inline(images: list[RenderedImage], resolved: ResolvedRequest) -> bool:
    """Whether encoding the answer is cheap enough to run on the event loop."""
    if resolved.response_format == "url":
        return False
    pixels = sum(image.width * image.height for image in images)
    return max(pixels, resolved.width * resolved.height * len(images)) <= INLINE_ENCODE_PIXELS


def answer_image(
    rendered: RenderedImage,
    *,
    resolved: ResolvedRequest,
    files: FileStore,
    base_url: str,
    metrics: ServiceMetrics | None = None,
) -> ImageData:
    """One image of the answer: encoded, then stored (`url`) or base64."""
    started = time.perf_counter()
    encoded = encode_rendered(rendered, resolved)
    if metrics is not None:
        metrics.observe_stage("encode", time.perf_counter() - started)
    if resolved.response_format == "url":
        file_id = files.put(encoded, CONTENT_TYPES[resolved.output_format])
        return ImageData(url=f"{base_url}/images/files/{file_id}", seed=rendered.seed)
    return ImageData(b64_json=to_base64(encoded), seed=rendered.seed)


def flagged_image(seed: int) -> ImageData:
    """An image the safety checker withheld: its place in the answer, no pixels, and why."""
    error = outcome_error(
        GenerationOutcome(
            status=OutcomeStatus.CONTENT_POLICY_VIOLATION, message=CONTENT_POLICY_MESSAGE
        )
    )
    return ImageData(seed=seed, error=ImageError.model_validate(error.body()["error"]))


def in_seed_order(data: list[ImageData], seeds: list[int]) -> list[ImageData]:
    """The answer's images (flagged ones included) in the order of the request's seeds."""
    order = {seed: index for index, seed in enumerate(seeds)}
    return sorted(data, key=lambda item: order.get(item.seed, len(order)))


def images_response(data: list[ImageData], resolved: ResolvedRequest) -> ImagesResponse:
    return ImagesResponse(
        created=int(time.time()),
        data=data,
        size=f"{resolved.width}x{resolved.height}",
        output_format=resolved.output_format,
        quality=resolved.quality,
    )


def encode_rendered(rendered: RenderedImage, resolved: ResolvedRequest) -> bytes:
    """A rendered image at the answered size (inpainting: over the kept picture), encoded."""
    text = None
    if resolved.provenance is not None:
        text = infotext(
            resolved.job,
            resolved.provenance,
            seed=rendered.seed,
            width=resolved.width,
            height=resolved.height,
        )
    fmt, compression = resolved.output_format, resolved.output_compression
    as_rendered = (resolved.width, resolved.height) == (rendered.width, rendered.height)
    if as_rendered and resolved.repaint_mask is None:
        return encode_image(pixels_of(rendered), fmt, compression, infotext=text)
    picture = to_pil(rendered)
    if resolved.paste_region is None:
        picture = resize_to(picture, resolved.width, resolved.height)
    if resolved.repaint_mask is not None and resolved.kept_picture is not None:
        # A blurred mask blends, "Only masked" pastes its region back.
        picture = paste_back(
            resolved.repaint_mask, resolved.kept_picture, picture, resolved.paste_region
        )
    return encode_image(picture, fmt, compression, infotext=text)


def server_timing(outcome: GenerationOutcome, *, encode_s: float, total_s: float) -> str:
    """The answer's Server-Timing header (W3C), ms: where its time went.

    queue: its time in the render worker besides rendering (queue, waiting
    for company); render: the pipeline calls that made its images (whole
    batches); encode: PNG/JPEG/WEBP and base64 or storing; total: from the
    job's hand-over to the render service until the answer was built.
    """
    parts = {"queue": outcome.waited_s, "render": outcome.render_s}
    parts |= {"encode": encode_s, "total": total_s}
    return ", ".join(f"{name};dur={1000 * s:.1f}" for name, s in parts.items() if s is not None)


def public_base_url(request: Request, settings: Settings) -> str:
    """Absolute URL of /v1 as the client sees it (behind proxies too)."""
    root = str(request.scope.get("root_path", ""))
    if settings.public_url:
        return settings.public_url.rstrip("/") + root
    headers = request.headers
    proto = headers.get("x-forwarded-proto", request.url.scheme).split(",")[0].strip()
    host = headers.get("x-forwarded-host", headers.get("host", request.url.netloc))
    host = host.split(",")[0].strip()
    return f"{proto}://{host}{root}"


def sse(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()


def partial_event(
    preview: RenderedImage, partial_index: int, resolved: ResolvedRequest, event_type: str
) -> bytes:
    """One `*.partial_image` event: the preview at the answered size and format.

    `seed` is ours, as on completed events: it says which image of n a preview
    belongs to (OpenAI streams one image per request).
    """
    return sse(
        {
            "type": event_type,
            "b64_json": to_base64(encode_rendered(preview, resolved)),
            "partial_image_index": partial_index,
            "created_at": int(time.time()),
            "size": f"{resolved.width}x{resolved.height}",
            "quality": resolved.quality,
            "background": "opaque",
            "output_format": resolved.output_format,
            "seed": preview.seed,
        }
    )


def error_event(error: APIError) -> bytes:
    """A failure after the stream began (previews were sent), as OpenAI streams say it."""
    return sse({"type": "error", "error": error.body()["error"]})


async def completed_events(
    response: ImagesResponse, event_type: str = "image_generation.completed"
) -> AsyncIterator[bytes]:
    """stream=true: one completed event per image (`image_edit.completed` for edits); then,
    for each image the safety checker withheld, an `error` event (content_policy_violation),
    after every image that is sent: the openai client raises at the first error event."""
    for item in response.data:
        if item.error is not None:
            continue
        event = {
            "type": event_type,
            "b64_json": item.b64_json,
            "created_at": response.created,
            "size": response.size,
            "quality": response.quality,
            "background": response.background,
            "output_format": response.output_format,
            "seed": item.seed,
            "usage": _NO_USAGE,
        }
        yield sse(event)
    for item in response.data:
        if item.error is not None:
            yield sse({"type": "error", "error": item.error.model_dump(), "seed": item.seed})
