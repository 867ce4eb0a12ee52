"""The Images API behaviour: request -> generation job -> encoded response.

Handed a `RenderClient` and a `FileStore`; knows nothing of BentoML or of
model internals, so it is tested with a real tiny pipeline or with fakes.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from PIL import Image
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile

from .encoding import CONTENT_TYPES, encode_image, resize_to, to_base64, to_pil
from .errors import APIError, invalid_value, missing_parameter, unavailable
from .files import FileStore
from .jobs import (
    GenerationJob,
    GenerationOutcome,
    OutcomeStatus,
    RefinerMode,
    RenderedImage,
    RenderKind,
)
from .metrics import ServiceMetrics
from .protocol import (
    OPENAI_IMAGE_MODEL_PREFIX,
    OPENAI_IMAGE_MODELS,
    ImageData,
    ImageEditRequest,
    ImageGenerationRequest,
    ImageRequest,
    ImagesResponse,
    ImageVariationRequest,
    ModelCard,
    ModelList,
)
from .render_client import LOADING_RETRY_AFTER, RenderClient
from .settings import SERVICE_ID, Settings
from .sizing import AUTO_SIZE, SizeLimits, fit_size, parse_size, render_size
from .uploads import open_image, repaint_mask, to_rgb

logger = logging.getLogger(__name__)

AUTO_SIZE_PIXELS = (1024, 1024)
# Default `strength` (share of the schedule re-drawn) of an edit without a mask,
# with one (OpenAI repaints the transparent region from scratch; what lies
# under it is often erased pixels), and of a variation (keeps the composition).
EDIT_STRENGTH = 0.75
INPAINT_STRENGTH = 1.0
VARIATION_STRENGTH = 0.6
VARIATION_SIZES = ((256, 256), (512, 512), (1024, 1024))
# Multipart parts accepted per request: `image` (or `image[]`) and `mask`, with
# room for clients that send more images (refused with a clear 400).
MAX_FORM_FILES = 16
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
class EditSource:
    """The uploaded picture of an edit or variation, and the region to repaint."""

    image: Image.Image  # RGB, as uploaded
    mask: Image.Image | None = None  # L, 255 where the picture is repainted


@dataclass(frozen=True)
class ResolvedRequest:
    job: GenerationJob
    width: int  # the size answered, which may differ from the job's render size
    height: int
    response_format: str
    output_format: str
    output_compression: int | None
    quality: str
    # Inpainting, at the answered size: the picture, whose pixels are kept
    # exactly outside the mask (diffusers keeps them only in latent space,
    # through a lossy VAE round trip), and the mask.
    kept_picture: Image.Image | None = None
    repaint_mask: Image.Image | None = None


class ImagesServing:
    def __init__(
        self,
        settings: Settings,
        pipeline: RenderClient,
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

    def _requested_size(
        self, req: ImageRequest, default_size: tuple[int, int] | None, source: EditSource | None
    ) -> tuple[int, int]:
        if req.width is not None or req.height is not None:
            if req.width is None or req.height is None:
                param = "height" if req.height is None else "width"
                raise invalid_value(param, "width and height must be given together.")
            width, height, param = req.width, req.height, "width"
        elif req.size not in (None, AUTO_SIZE):
            (width, height), param = parse_size(req.size), "size"
        elif default_size is not None:
            (width, height), param = default_size, "size"
        elif source is not None:
            try:
                return fit_size(*source.image.size, self.limits)
            except ValueError as exc:
                message = f"No size this server renders fits the image ({exc}); give a size."
                raise invalid_value("image", message) from None
        else:
            raise ValueError("default_size=None needs an edit source")
        try:
            self.limits.check(width, height)
        except ValueError as exc:
            raise invalid_value(param, f"Invalid size: {exc}.") from None
        return width, height

    def resolve(
        self,
        req: ImageRequest,
        native_resolution: int,
        *,
        prompt: str,
        source: EditSource | None = None,
        strength: float = 1.0,
        default_size: tuple[int, int] | None = AUTO_SIZE_PIXELS,
    ) -> ResolvedRequest:
        """The job and answer for a request; raises APIError for a bad value.

        `source`: the picture of an edit or variation (resized here, so this
        takes CPU time for those). `default_size` None: the picture's own size.
        """
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
        if len(prompt) > s.max_prompt_chars:
            raise invalid_value(
                "prompt", f"The prompt is longer than {s.max_prompt_chars} characters."
            )
        output_format = req.output_format or "png"
        if req.output_compression is not None and output_format == "png":
            raise invalid_value(
                "output_compression", "output_compression applies to jpeg and webp only."
            )
        width, height = self._requested_size(req, default_size, source)
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

        kept_picture = repaint = None
        edit_fields: dict[str, Any] = {}
        if source is not None:
            # diffusers runs the last int(steps * strength) steps of the schedule.
            if int(steps * strength) < 1:
                raise invalid_value(
                    "strength",
                    f"strength {strength} of {steps} steps runs no denoising step; "
                    "raise strength or num_inference_steps.",
                )
            edit_fields = {
                "kind": RenderKind.IMAGE_TO_IMAGE,
                "strength": strength,
                "init_image": resize_to(source.image, render_w, render_h).tobytes(),
            }
            if source.mask is not None:
                kept_picture = resize_to(source.image, width, height)
                repaint = _resize_mask(source.mask, width, height)
                edit_fields["kind"] = RenderKind.INPAINT
                edit_fields["mask"] = _resize_mask(source.mask, render_w, render_h).tobytes()

        job = GenerationJob(
            request_id=uuid.uuid4().hex,
            prompt=prompt,
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
            **edit_fields,
        )
        return ResolvedRequest(
            job=job,
            width=width,
            height=height,
            response_format=req.response_format or "b64_json",
            output_format=output_format,
            output_compression=req.output_compression,
            quality=quality,
            kept_picture=kept_picture,
            repaint_mask=repaint,
        )

    async def _native_resolution(self) -> int:
        """The model's native resolution once loaded; 503 while loading or after a failed load."""
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
        return int(info["native_resolution"])

    async def generate(self, req: ImageGenerationRequest, http_request: Request) -> ImagesResponse:
        native_resolution = await self._native_resolution()
        resolved = self.resolve(req, native_resolution, prompt=req.prompt)
        return await self._answer(resolved, http_request)

    async def edit(self, http_request: Request) -> tuple[ImageEditRequest, ImagesResponse]:
        """POST /images/edits: img2img over the picture, or inpainting with a mask."""
        async with _multipart_form(http_request) as form:
            req = _validate_form(ImageEditRequest, form)
            image = await _upload(form, "image", "image[]")
            mask = await _upload(form, "mask") if "mask" in form else None
        source = await run_in_threadpool(_edit_source, image, mask)
        native_resolution = await self._native_resolution()
        default_strength = EDIT_STRENGTH if source.mask is None else INPAINT_STRENGTH
        resolved = await run_in_threadpool(
            self.resolve,
            req,
            native_resolution,
            prompt=req.prompt,
            source=source,
            strength=req.strength or default_strength,
            default_size=None,
        )
        return req, await self._answer(resolved, http_request)

    async def create_variation(self, http_request: Request) -> ImagesResponse:
        """POST /images/variations: an edit of a square picture with no prompt."""
        async with _multipart_form(http_request) as form:
            req = _validate_form(ImageVariationRequest, form)
            image = await _upload(form, "image", "image[]")
        if req.stream:
            raise invalid_value("stream", "Variations are answered in one response; drop stream.")
        source = await run_in_threadpool(_edit_source, image, None)
        if source.image.width != source.image.height:
            raise invalid_value(
                "image",
                f"Variations take a square image; this one is "
                f"{source.image.width}x{source.image.height}.",
            )
        native_resolution = await self._native_resolution()
        resolved = await run_in_threadpool(
            self.resolve,
            req,
            native_resolution,
            prompt="",
            source=source,
            strength=req.strength or VARIATION_STRENGTH,
        )
        if (resolved.width, resolved.height) not in VARIATION_SIZES:
            sizes = ", ".join(f"{w}x{h}" for w, h in VARIATION_SIZES)
            param = "size" if req.width is None else "width"
            raise invalid_value(param, f"Variations come in {sizes}.")
        return await self._answer(resolved, http_request)

    async def _answer(self, resolved: ResolvedRequest, http_request: Request) -> ImagesResponse:
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
                    # Nobody reads this answer; 499 keeps it out of the error log.
                    raise APIError(499, "The client closed the request.", code="cancelled")
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
            if resolved.repaint_mask is not None and resolved.kept_picture is not None:
                picture = Image.composite(picture, resolved.kept_picture, resolved.repaint_mask)
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


# ---- multipart uploads (edits, variations) -----------------------------------


def _multipart_form(http_request: Request) -> AbstractAsyncContextManager[FormData]:
    """The parsed form, as a context that deletes its spooled files on exit."""
    content_type = http_request.headers.get("content-type", "")
    # A form with no file comes url-encoded, or with no body at all: parsed,
    # to answer "missing image" rather than "wrong content type".
    form_types = ("multipart/form-data", "application/x-www-form-urlencoded")
    if content_type and not content_type.startswith(form_types):
        raise APIError(
            400,
            f"POST {http_request.url.path} takes multipart/form-data, with the image as a file "
            f"part; got content-type '{content_type}'.",
            code="invalid_content_type",
        )
    return http_request.form(max_files=MAX_FORM_FILES)


RequestModel = TypeVar("RequestModel", bound=ImageRequest)
_FILE_FIELDS = ("image", "image[]", "mask")


def _validate_form(model: type[RequestModel], form: FormData) -> RequestModel:
    """The form's text fields as `model`; errors come out as for JSON bodies."""
    fields = {
        key: value
        for key, value in form.multi_items()
        if isinstance(value, str) and key not in _FILE_FIELDS
    }
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


async def _upload(form: FormData, *names: str) -> bytes:
    """The bytes of the one file sent under any of `names` (`image` or `image[]`)."""
    param = names[0]
    parts = [value for key, value in form.multi_items() if key in names]
    if not parts:
        raise missing_parameter(param)
    if len(parts) > 1:
        raise invalid_value(param, f"One {param} per request, got {len(parts)}.")
    if not isinstance(parts[0], UploadFile):
        raise invalid_value(param, f"'{param}' must be a file part (with a filename), not text.")
    return await parts[0].read()


def _edit_source(image_data: bytes, mask_data: bytes | None) -> EditSource:
    try:
        picture = open_image(image_data)
    except ValueError as exc:
        raise invalid_value("image", f"Invalid image: {exc}.") from None
    mask = None
    if mask_data is not None:
        try:
            mask = repaint_mask(open_image(mask_data), picture.size)
        except ValueError as exc:
            raise invalid_value("mask", f"Invalid mask: {exc}.") from None
    return EditSource(to_rgb(picture), mask)


def _resize_mask(mask: Image.Image, width: int, height: int) -> Image.Image:
    # Nearest: the mask stays two-valued.
    if mask.size == (width, height):
        return mask
    return mask.resize((width, height), Image.Resampling.NEAREST)
