"""The Images API behaviour: a validated request -> a render job -> the answer.

Handed a `RenderClient` and a `FileStore`; knows nothing of BentoML or of
model internals, so it is tested with a real tiny engine or with fakes. The
rules for a request live in resolution.py, the answer's form in responses.py,
the mapping of outcomes to errors in errors.py; this class puts them in order
and watches the client while the images are made.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from .errors import APIError, client_closed, outcome_error
from .files import FileStore
from .forms import ImageForm
from .jobs import GenerationJob, GenerationOutcome, OutcomeStatus, still_loading
from .lora_catalog import LoraCatalog
from .metrics import ServiceMetrics
from .protocol import (
    ImageEditRequest,
    ImageGenerationRequest,
    ImagesResponse,
    ImageVariationRequest,
    ModelCard,
    ModelList,
)
from .render_client import RenderClient
from .resolution import ResolvedRequest, resolve_edit, resolve_generation, resolve_variation
from .responses import build_images, public_base_url
from .settings import SERVICE_ID, Settings
from .uploads import decode_edit_source

# How often a waiting request checks that its client is still there.
DISCONNECT_POLL_SECONDS = 0.25
TINY_WARNING = (
    "Serving the TINY preset: random weights, images are noise. "
    "Set SDXL_PRESET=sdxl on a machine with a CUDA GPU for real SDXL."
)


class ImagesServing:
    def __init__(
        self,
        settings: Settings,
        renderer: RenderClient,
        files: FileStore,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.renderer = renderer
        self.files = files
        self.metrics = metrics
        self.loras = LoraCatalog(settings.lora_folder)
        self._model_info: dict[str, Any] | None = None
        self._started = int(time.time())

    # ---- model information -------------------------------------------------

    async def model_info(self) -> dict[str, Any]:
        """The render service's description once it has loaded; cached from then on."""
        if self._model_info is not None:
            return self._model_info
        info = await self.renderer.describe()
        if info.get("loaded"):
            self._model_info = info
        return info

    async def list_models(self) -> ModelList:
        info = await self.model_info()
        preset = info.get("preset")
        card = ModelCard(
            id=SERVICE_ID,
            created=self._started,
            preset=preset,
            warning=TINY_WARNING if preset == "tiny" else None,
            details=info,
        )
        # Each LoRA as a model of its own, so clients that can send no extra
        # field can still pick one by name.
        loras = await run_in_threadpool(self.loras.available)
        lora_cards = [
            ModelCard(id=f"{SERVICE_ID}:{name}", created=self._started, lora=lora.describe())
            for name, lora in sorted(loras.items())
        ]
        return ModelList(data=[card, *lora_cards])

    async def _native_resolution(self) -> int:
        """The model's native resolution once loaded; 503 while loading or after a failed load."""
        info = await self.model_info()
        if info.get("error"):
            raise APIError(
                503,
                f"The model failed to load: {info['error']}",
                code="model_load_failed",
                headers={"x-should-retry": "false"},
            )
        if not info.get("loaded"):
            if self.metrics:
                self.metrics.reject(OutcomeStatus.LOADING.value)
            raise outcome_error(still_loading())
        return int(info["native_resolution"])

    # ---- the three endpoints ---------------------------------------------------

    async def generate(self, req: ImageGenerationRequest, http_request: Request) -> ImagesResponse:
        native = await self._native_resolution()
        resolved = resolve_generation(req, self.settings, native, self.loras)
        return await self._answer(resolved, http_request)

    async def edit(
        self, form: ImageForm[ImageEditRequest], http_request: Request
    ) -> ImagesResponse:
        """POST /images/edits: img2img over the picture, or inpainting with a mask."""
        source = await run_in_threadpool(decode_edit_source, form.image, form.mask)
        native = await self._native_resolution()
        resolved = await run_in_threadpool(
            resolve_edit, form.fields, source, self.settings, native, self.loras
        )
        return await self._answer(resolved, http_request)

    async def create_variation(
        self, form: ImageForm[ImageVariationRequest], http_request: Request
    ) -> ImagesResponse:
        """POST /images/variations: an edit of a square picture with no prompt."""
        source = await run_in_threadpool(decode_edit_source, form.image, None)
        native = await self._native_resolution()
        resolved = await run_in_threadpool(
            resolve_variation, form.fields, source, self.settings, native, self.loras
        )
        return await self._answer(resolved, http_request)

    async def file(self, file_id: str) -> tuple[bytes, str]:
        stored = await run_in_threadpool(self.files.get, file_id)
        if stored is None:
            raise APIError(
                404, "No such image, or it has expired.", param="file_id", code="file_not_found"
            )
        return stored.data, stored.content_type

    # ---- one request's way through ---------------------------------------------

    async def _answer(self, resolved: ResolvedRequest, http_request: Request) -> ImagesResponse:
        outcome = await self._render(resolved.job, http_request)
        if outcome.status is not OutcomeStatus.OK:
            raise outcome_error(outcome)
        return await run_in_threadpool(
            build_images,
            outcome.images,
            resolved,
            files=self.files,
            base_url=public_base_url(http_request, self.settings),
            metrics=self.metrics,
        )

    async def _render(self, job: GenerationJob, http_request: Request) -> GenerationOutcome:
        """Awaits the job's images; a client that goes away cancels the work.

        The deadline is not watched here: the batcher owns it and answers TIMEOUT.
        """
        task = asyncio.ensure_future(self.renderer.generate(job))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
                if done:
                    return task.result()
                if await http_request.is_disconnected():
                    raise client_closed()
        finally:
            if not task.done():
                task.cancel()
                await self.renderer.cancel(job.request_id)
