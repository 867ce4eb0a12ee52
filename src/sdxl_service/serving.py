"""The Images API behaviour: request -> generation job -> encoded response.

Handed a `PipelineClient` and a `FileStore`; knows nothing of BentoML or of
model internals, so it is tested with a real tiny pipeline or with fakes.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from .encoding import CONTENT_TYPES, encode_image, resize_to, to_base64, to_pil
from .errors import APIError, invalid_value, unavailable
from .files import FileStore
from .jobs import GenerationJob, GenerationOutcome, OutcomeStatus, RefinerMode, RenderedImage
from .metrics import ServiceMetrics
from .pipeline_client import LOADING_RETRY_AFTER, PipelineClient
from .protocol import (
    OPENAI_IMAGE_MODEL_PREFIX,
    OPENAI_IMAGE_MODELS,
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
)
from .settings import SERVICE_ID, Settings
from .sizing import AUTO_SIZE, SizeLimits, parse_size, render_size

logger = logging.getLogger(__name__)

AUTO_SIZE_PIXELS = (1024, 1024)
# OpenAI quality -> denoising steps (base + refiner together).
QUALITY_STEPS = {"low": 20, "medium": 30, "standard": 30, "high": 50, "hd": 50}
DISCONNECT_POLL_SECONDS = 0.25
# Expired `url` files are swept at most this often, on the back of a new one.
PURGE_INTERVAL_SECONDS = 60.0
TINY_WARNING = (
    "Serving the TINY preset: random weights, images are noise. "
    "Set SDXL_PRESET=sdxl on a machine with a CUDA GPU for real SDXL."
)


@dataclass(frozen=True)
class ResolvedRequest:
    job: GenerationJob
    width: int  # the size answered, which may differ from the job's render size
    height: int
    response_format: str
    output_format: str
    output_compression: int | None
    quality: str


class ClientDisconnected(Exception):
    pass


class ImagesServing:
    def __init__(
        self,
        settings: Settings,
        pipeline: PipelineClient,
        files: FileStore,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.pipeline = pipeline
        self.files = files
        self.limits = SizeLimits(settings.min_side, settings.max_side, settings.max_pixels)
        self._model_info: dict[str, Any] | None = None
        self._last_purge = 0.0
        self._started = int(time.time())

    # ---- model information -------------------------------------------------

    async def model_info(self) -> dict[str, Any] | None:
        """The pipeline's description once it has loaded; cached from then on."""
        if self._model_info is None:
            info = await self.pipeline.describe()
            if info.get("loaded"):
                self._model_info = info
            else:
                return info
        return self._model_info

    async def list_models(self) -> ModelList:
        info = await self.model_info() or {}
        preset = info.get("preset")
        card = ModelCard(
            id=SERVICE_ID,
            created=self._started,
            preset=preset,
            warning=TINY_WARNING if preset == "tiny" else None,
            details=info,
        )
        return ModelList(data=[card])

    # ---- generation ----------------------------------------------------------

    def _check_model(self, model: str | None) -> None:
        if model is None or model in (SERVICE_ID, *OPENAI_IMAGE_MODELS):
            return
        if model.startswith(OPENAI_IMAGE_MODEL_PREFIX) or model in (
            self.settings.base_model,
            self.settings.refiner_model,
        ):
            return
        raise APIError(
            404,
            f"The model '{model}' does not exist; this server serves '{SERVICE_ID}'.",
            param="model",
            code="model_not_found",
        )

    def _requested_size(self, req: ImageGenerationRequest) -> tuple[int, int]:
        if req.width is not None or req.height is not None:
            if req.width is None or req.height is None:
                param = "height" if req.height is None else "width"
                raise invalid_value(param, "width and height must be given together.")
            width, height, param = req.width, req.height, "width"
        elif req.size in (None, AUTO_SIZE):
            (width, height), param = AUTO_SIZE_PIXELS, "size"
        else:
            (width, height), param = parse_size(req.size), "size"
        try:
            self.limits.check(width, height)
        except ValueError as exc:
            raise invalid_value(param, f"Invalid size: {exc}.") from None
        return width, height

    def resolve(self, req: ImageGenerationRequest, native_resolution: int) -> ResolvedRequest:
        s = self.settings
        self._check_model(req.model)
        if req.background == "transparent":
            raise invalid_value(
                "background",
                "SDXL cannot make transparent images; use background 'opaque' or 'auto'.",
                code="unsupported_value",
            )
        if req.stream and req.response_format == "url":
            raise invalid_value(
                "response_format", "Streamed images are sent as b64_json; drop response_format."
            )
        n = req.n or 1
        if n > s.max_n:
            raise invalid_value("n", f"n must be between 1 and {s.max_n}, got {n}.")
        if len(req.prompt) > s.max_prompt_chars:
            raise invalid_value(
                "prompt", f"The prompt is longer than {s.max_prompt_chars} characters."
            )
        output_format = req.output_format or "png"
        if req.output_compression is not None and output_format == "png":
            raise invalid_value(
                "output_compression", "output_compression applies to jpeg and webp only."
            )
        width, height = self._requested_size(req)
        render_w, render_h = render_size(
            width,
            height,
            native_resolution,
            render_native=s.render_native,
            max_pixels=s.max_pixels,
        )
        quality = req.quality or "auto"
        steps = req.num_inference_steps or QUALITY_STEPS.get(quality, s.steps)
        seed = req.seed if req.seed is not None else secrets.randbelow(2**32)
        job = GenerationJob(
            request_id=uuid.uuid4().hex,
            prompt=req.prompt,
            negative_prompt=req.negative_prompt or "",
            seeds=[seed + i for i in range(n)],
            width=render_w,
            height=render_h,
            steps=steps,
            guidance_scale=s.guidance_scale if req.guidance_scale is None else req.guidance_scale,
            high_noise_frac=req.high_noise_frac or s.high_noise_frac,
            refiner=req.refiner or RefinerMode(s.refiner),
            scheduler=req.scheduler or s.scheduler,
            deadline=time.time() + s.request_timeout,
        )
        return ResolvedRequest(
            job=job,
            width=width,
            height=height,
            response_format=req.response_format or "b64_json",
            output_format=output_format,
            output_compression=req.output_compression,
            quality=quality,
        )

    async def generate(self, req: ImageGenerationRequest, http_request: Request) -> ImagesResponse:
        info = await self.model_info()
        if info and info.get("error"):
            raise APIError(
                503,
                f"The model failed to load: {info['error']}",
                code="model_load_failed",
                headers={"x-should-retry": "false"},
            )
        if not info or not info.get("loaded"):
            if self.metrics:
                self.metrics.reject("loading")
            raise unavailable(
                "The model is still loading; try again shortly.", LOADING_RETRY_AFTER, "loading"
            )
        resolved = self.resolve(req, int(info["native_resolution"]))
        outcome = await self._run(resolved.job, http_request)
        images = self._images_or_error(outcome)
        base_url = self._public_base_url(http_request)
        data = await run_in_threadpool(self._encode_all, images, resolved, base_url)
        return ImagesResponse(
            created=int(time.time()),
            data=data,
            size=f"{resolved.width}x{resolved.height}",
            output_format=resolved.output_format,
            quality=resolved.quality,
        )

    async def _run(self, job: GenerationJob, http_request: Request) -> GenerationOutcome:
        """Awaits the job; a client that goes away or a deadline cancels it."""
        task = asyncio.ensure_future(self.pipeline.generate(job))
        deadline = job.deadline or float("inf")
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
                if done:
                    return task.result()
                if await http_request.is_disconnected():
                    raise ClientDisconnected(job.request_id)
                if time.time() > deadline + 1.0:
                    return GenerationOutcome(
                        status=OutcomeStatus.TIMEOUT,
                        message=f"The request took longer than {self.settings.request_timeout} s.",
                    )
        finally:
            if not task.done():
                task.cancel()
                await self.pipeline.cancel(job.request_id)

    @staticmethod
    def _images_or_error(outcome: GenerationOutcome) -> list[RenderedImage]:
        status = outcome.status
        if status == OutcomeStatus.OK:
            return outcome.images
        message = outcome.message or status.value
        retry_after = outcome.retry_after or LOADING_RETRY_AFTER
        if status == OutcomeStatus.QUEUE_FULL:
            raise APIError(
                429,
                message,
                code="queue_full",
                headers={
                    "Retry-After": str(max(1, round(retry_after))),
                    "x-should-retry": "true",
                },
            )
        if status == OutcomeStatus.LOADING:
            raise unavailable(message, retry_after, "loading")
        if status == OutcomeStatus.TIMEOUT:
            raise APIError(504, message, code="timeout", headers={"x-should-retry": "false"})
        if status == OutcomeStatus.OUT_OF_MEMORY:
            raise APIError(503, message, code="out_of_memory", headers={"x-should-retry": "false"})
        if status == OutcomeStatus.CANCELLED:
            raise APIError(499, message, code="cancelled")
        raise APIError(500, message, code="generation_failed", headers={"x-should-retry": "false"})

    def _encode_all(
        self, images: list[RenderedImage], resolved: ResolvedRequest, base_url: str
    ) -> list[ImageData]:
        data = []
        for rendered in images:
            started = time.perf_counter()
            picture = resize_to(to_pil(rendered), resolved.width, resolved.height)
            encoded = encode_image(picture, resolved.output_format, resolved.output_compression)
            if self.metrics:
                self.metrics.observe_stage("encode", time.perf_counter() - started)
            if resolved.response_format == "url":
                file_id = self.files.put(encoded, CONTENT_TYPES[resolved.output_format])
                data.append(ImageData(url=f"{base_url}/images/files/{file_id}", seed=rendered.seed))
            else:
                data.append(ImageData(b64_json=to_base64(encoded), seed=rendered.seed))
        if resolved.response_format == "url":
            self._purge_if_due()
        return data

    def _purge_if_due(self) -> None:
        now = time.monotonic()
        if now - self._last_purge < PURGE_INTERVAL_SECONDS:
            return
        self._last_purge = now
        try:
            purged = self.files.purge_expired()
        except Exception:
            logger.warning("purging expired image files failed", exc_info=True)
            return
        if purged:
            logger.info("purged %d expired image files", purged)

    def _public_base_url(self, request: Request) -> str:
        """Absolute URL of /v1 as the client sees it (behind proxies too)."""
        root = request.scope.get("root_path", "")
        if self.settings.public_url:
            return self.settings.public_url.rstrip("/") + root
        headers = request.headers
        proto = headers.get("x-forwarded-proto", request.url.scheme).split(",")[0].strip()
        host = headers.get("x-forwarded-host", headers.get("host", request.url.netloc))
        host = host.split(",")[0].strip()
        return f"{proto}://{host}{root}"

    async def file(self, file_id: str) -> tuple[bytes, str]:
        stored = await run_in_threadpool(self.files.get, file_id)
        if stored is None:
            raise APIError(
                404, "No such image, or it has expired.", param="file_id", code="file_not_found"
            )
        return stored.data, stored.content_type
