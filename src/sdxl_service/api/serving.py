"""The Images API behaviour: a validated request -> a render request -> the answer.

Handed a `RenderClient` and a `FileStore`; knows nothing of BentoML or of
model internals, so it is tested with a real tiny engine or with fakes. The
rules for a request live in api/request_rules.py, the answer's form in responses.py,
the mapping of outcomes to errors in errors.py; this class puts them in order
and watches the client while the images are made.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from ..choices import RenderKind
from ..contract.render_request import (
    GenerationOutcome,
    OutcomeStatus,
    RenderEvent,
    RenderEventType,
    loading_outcome,
)
from ..controlnet_catalog import ControlNetCatalog
from ..embedding_catalog import EmbeddingCatalog, EmbeddingFile, names_in
from ..ip_adapter_catalog import IpAdapterCatalog
from ..lora_catalog import LoraCatalog
from ..metrics import ServiceMetrics
from ..model_catalog import INPAINTING, ModelCatalog, inpainting_text_to_image
from ..settings import SERVICE_ID, Settings
from ..upscaler_catalog import UpscalerCatalog
from .control_map_previews import ControlMapRequest, ControlMapsResponse, control_map_answer
from .control_requests import with_controlnets
from .errors import APIError, client_closed, invalid_value, missing_parameter, outcome_error
from .files import FileStore
from .infotext import model_name
from .infotext_reader import Catalogue, InfotextAnswer, infotext_answer
from .render_client import RenderClient
from .request_kinds import RequestKind
from .request_rules import ResolvedRequest
from .responses import (
    answer_image,
    completed_events,
    encodes_inline,
    error_event,
    flagged_image,
    images_response,
    in_seed_order,
    partial_event,
    public_base_url,
    server_timing,
)
from .schemas import (
    ImageRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
)
from .uploads import EditSource, InvalidUpload, decode_edit_source

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
        self.models = ModelCatalog(settings.models_dir)
        self.upscalers = UpscalerCatalog(settings.upscaler_dir)
        self.controlnets = ControlNetCatalog(settings.controlnet_dir)
        self.ip_adapters = IpAdapterCatalog(settings.ip_adapter_dir)
        self.embeddings = EmbeddingCatalog(settings.embeddings_dir)
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
        # Each model of SDXL_MODELS_DIR, read again when the folder changes; one that cannot
        # render is listed with its problem as the warning.
        entries = await run_in_threadpool(self.models.entries)
        model_cards = self._folder_cards(
            "models_dir", "details", ((n, e.describe(), e.problem) for n, e in entries.items())
        )
        # Each IP-Adapter of SDXL_IP_ADAPTER_DIR by its file's stem; one that cannot be used
        # is listed with its problem as the warning.
        adapters = await run_in_threadpool(self.ip_adapters.snapshot)
        adapter_cards = self._folder_cards(
            "ip_adapter_dir",
            "ip_adapter",
            ((n, e.describe(), e.problem) for n, e in adapters.items()),
        )
        upscaler_cards = await self._upscaler_cards()
        embedding_cards = await run_in_threadpool(self._embedding_cards, info)
        controlnets = await run_in_threadpool(self.controlnets.snapshot)
        controlnet_cards = self._folder_cards(
            "controlnet_dir",
            "controlnet",
            ((n, e.describe(), e.problem) for n, e in controlnets.items()),
        )
        return ModelList(
            data=[
                card,
                *model_cards,
                *lora_cards,
                *upscaler_cards,
                *embedding_cards,
                *controlnet_cards,
                *adapter_cards,
            ]
        )

    def _embedding_cards(self, info: dict[str, Any]) -> list[ModelCard]:
        """Each embedding of SDXL_EMBEDDINGS_DIR: its name and vectors per token, or why it
        cannot be used with the model's text encoders (their widths, from the render worker)."""
        widths = info.get("embedding_widths")
        described = [(n, e.describe(widths)) for n, e in self.embeddings.snapshot().items()]
        return self._folder_cards(
            "embeddings_dir", "embedding", ((n, c, c.pop("problem", None)) for n, c in described)
        )

    def _folder_cards(
        self, owned_by: str, card_field: str, entries: Iterable[tuple[str, dict[str, Any], Any]]
    ) -> list[ModelCard]:
        """A model folder's entries (name, card, problem) as models by name: the card under
        `card_field`, the problem (one that cannot be used is listed, with why) as the warning."""
        return [
            ModelCard(
                id=name,
                created=self._started,
                owned_by=owned_by,
                warning=None if problem is None else str(problem),
                **{card_field: card},
            )
            for name, card, problem in sorted(entries, key=lambda entry: entry[0])
        ]

    def _with_embeddings(self, resolved: ResolvedRequest) -> ResolvedRequest:
        """400 naming the prompt field when it names an embedding that cannot be used; the
        embeddings the prompts name, with their hashes, in the infotext's provenance."""
        folder = self.embeddings.snapshot()
        if not folder:
            return resolved
        widths = (self._model_info or {}).get("embedding_widths")
        job = resolved.job
        used: dict[str, EmbeddingFile] = {}
        for param, text in (("prompt", job.prompt), ("negative_prompt", job.negative_prompt)):
            for name in names_in(text, folder):
                problem = folder[name].problem_for(widths)
                if problem is not None:
                    raise invalid_value(
                        param,
                        f"The embedding '{name}' named in {param} cannot be used: {problem}.",
                        code="invalid_embedding",
                    )
                used.setdefault(name, folder[name])
        if not used or resolved.provenance is None:
            return resolved
        hashes = {
            name: digest
            for name, entry in used.items()
            if (digest := self.embeddings.short_hash(entry)) is not None
        }
        return replace(resolved, provenance=replace(resolved.provenance, ti_hashes=hashes))

    async def _upscaler_cards(self) -> list[ModelCard]:
        """Each upscaler model of SDXL_UPSCALER_DIR: its file from here (no torch), its
        architecture and scale from the render worker (spandrel), or its problem."""
        files = await run_in_threadpool(self.upscalers.snapshot)
        if not files:
            return []
        described = await self.renderer.describe_upscalers() or {}
        cards = [(n, {**e.describe(), **described.get(n, {})}) for n, e in files.items()]
        return self._folder_cards(
            "upscaler_dir", "upscaler", ((n, c, c.pop("problem", None)) for n, c in cards)
        )

    async def _check_upscaler(self, resolved: ResolvedRequest) -> None:
        """400 naming the parameter when the upscaler model a request names is a file the
        render worker cannot use (spandrel does not know it); the render would fail anyway."""
        params = resolved.job.params
        if params.hires is not None and params.hires.upscaler_model is not None:
            name, param = params.hires.upscaler_model, "hires.upscaler"
        elif params.upscale is not None:
            name, param = params.upscale.upscaler, "upscaler"
        else:
            return
        described = await self.renderer.describe_upscalers() or {}
        problem = described.get(name, {}).get("problem")
        if problem is not None:
            raise invalid_value(
                param, f"The upscaler '{name}' cannot be used: {problem}.", code="invalid_upscaler"
            )

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
            raise outcome_error(loading_outcome())
        return int(info["native_resolution"])

    # ---- the endpoints ---------------------------------------------------

    async def serve(
        self,
        kind: RequestKind,
        req: ImageRequest,
        http_request: Request,
        image: bytes | None = None,
        mask: bytes | None = None,
    ) -> Answer | EventStream:
        """Any endpoint's answer, or with `stream` its events (previews first when asked)."""
        resolved = await self.resolve(kind, req, image, mask)
        if req.stream and kind.stream_event is not None:
            return await self._stream(resolved, http_request, kind.stream_event)
        return await self._answer(resolved, http_request)

    async def resolve(
        self,
        kind: RequestKind,
        req: ImageRequest,
        image: bytes | None = None,
        mask: bytes | None = None,
    ) -> ResolvedRequest:
        """Any endpoint's validated request (and an edit's uploads) -> what it renders.

        The one way in for the synchronous endpoints and for image jobs alike, so
        a job renders exactly what its synchronous call would.
        """
        catalogs = (self.loras, self.models, self.upscalers)
        source = None
        if not kind.multipart and not req.ip_adapters:
            native = await self._native_resolution()
            resolved = kind.resolve(req, None, self.settings, native, *catalogs)
        elif not kind.multipart:
            # IP-Adapter pictures are decoded while resolving: CPU time, off the event loop.
            native = await self._native_resolution()
            resolved = await run_in_threadpool(
                kind.resolve, req, None, self.settings, native, *catalogs, self.ip_adapters
            )
        else:
            if image is None:
                raise missing_parameter("image")
            source = await _decoded(image, mask if kind.takes_mask else None)
            native = await self._native_resolution()
            resolved = await run_in_threadpool(
                kind.resolve,
                req,
                source,
                self.settings,
                native,
                *catalogs,
                self.ip_adapters,
            )
        await self._check_upscaler(resolved)
        await self._check_model_kind(resolved)
        resolved = await run_in_threadpool(self._with_embeddings, resolved)
        if req.controlnets:
            if await self._is_inpainting_model(resolved.job.params.model):
                # diffusers' ControlNet pipelines over a 9-channel UNet: not tested here.
                raise invalid_value(
                    "controlnets",
                    "ControlNet units take a model with SDXL's own UNet; an inpainting "
                    "checkpoint takes none.",
                )
            folder = await run_in_threadpool(self.controlnets.snapshot)
            region = resolved.paste_region
            job, provenance = await run_in_threadpool(
                with_controlnets,
                resolved.job,
                resolved.provenance,
                req.controlnets,
                folder,
                self.settings,
                None if region is None else (region, (resolved.width, resolved.height)),
                source.image if source is not None and kind.units_default_to_picture else None,
            )
            resolved = replace(resolved, job=job, provenance=provenance)
        return resolved

    async def control_map(self, req: ControlMapRequest) -> ControlMapsResponse:
        """POST /images/control-maps: the map a ControlNet unit renders with (no render call)."""
        native = await self._native_resolution()
        return await run_in_threadpool(control_map_answer, req, self.settings, native)

    async def infotext(self, image: bytes) -> InfotextAnswer:
        """POST /images/infotext: the settings an image's infotext holds, as a generation
        request of this server (no render call); 400 naming `image` for a file that is no
        image."""
        entries = await run_in_threadpool(self.models.entries)
        upscalers = await run_in_threadpool(self.upscalers.snapshot)
        catalogue = Catalogue(model_name(self.settings.base_model), set(entries), set(upscalers))
        try:
            return await run_in_threadpool(infotext_answer, image, catalogue)
        except ValueError as exc:
            raise invalid_value("image", f"Invalid image: {exc}.") from None

    async def _check_model_kind(self, resolved: ResolvedRequest) -> None:
        """400 naming `model` for a text-to-image render on an inpainting model (the render
        worker would refuse it too, after its turn in the queue)."""
        params = resolved.job.params
        if params.kind != RenderKind.TEXT_TO_IMAGE:
            return
        if await self._is_inpainting_model(params.model):
            message = f"{inpainting_text_to_image(params.model)}."
            raise invalid_value("model", message, code="invalid_model")

    async def _is_inpainting_model(self, model: str | None) -> bool:
        """Whether `model` (None: the default) is an inpainting checkpoint (a 9-channel UNet)."""
        if model is None:
            return bool((await self.model_info()).get("kind") == INPAINTING)
        entry = await run_in_threadpool(self.models.find, model)
        return entry is not None and entry.inpainting

    async def render(
        self,
        resolved: ResolvedRequest,
        base_url: str,
        files: FileStore | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> ImagesResponse:
        """The answer of a resolved request with nobody connected (an image job).

        Cancelling the caller stops the images at the next step, as a client's
        disconnect does. `files`: where `url` images go (jobs keep theirs longer);
        `on_step(denoising steps done)` after each step.
        """
        job, sink = resolved.job, None
        if on_step is not None:
            job = job.model_copy(update={"report_progress": True})

            async def sink(event: RenderEvent) -> None:
                if event.type is RenderEventType.PROGRESS and event.step is not None:
                    on_step(event.step)

        render = asyncio.ensure_future(self.renderer.generate(job, sink))
        try:
            outcome = await render
        finally:
            await _stop(render)
        return await self._images(outcome, resolved, base_url, files)

    async def file(self, file_id: str) -> tuple[bytes, str]:
        stored = await run_in_threadpool(self.files.get, file_id)
        if stored is None:
            raise APIError(
                404, "No such image, or it has expired.", param="file_id", code="file_not_found"
            )
        return stored.data, stored.content_type

    # ---- one request's way through ---------------------------------------------

    async def _answer(self, resolved: ResolvedRequest, http_request: Request) -> Answer:
        started = time.perf_counter()
        render = asyncio.ensure_future(self.renderer.generate(resolved.job))
        try:
            outcome = await self._while_connected(render, http_request)
        finally:
            await _stop(render)
        encoding = time.perf_counter()
        response = await self._images_for(outcome, resolved, http_request)
        done = time.perf_counter()
        timing = server_timing(outcome, encode_s=done - encoding, total_s=done - started)
        return Answer(response, timing)

    async def _images_for(
        self, outcome: GenerationOutcome, resolved: ResolvedRequest, http_request: Request
    ) -> ImagesResponse:
        if outcome.status is not OutcomeStatus.OK:
            raise outcome_error(outcome)
        base_url = public_base_url(http_request, self.settings)
        return await self._images(outcome, resolved, base_url)

    async def _images(
        self,
        outcome: GenerationOutcome,
        resolved: ResolvedRequest,
        base_url: str,
        files: FileStore | None = None,
    ) -> ImagesResponse:
        if outcome.status is not OutcomeStatus.OK:
            raise outcome_error(outcome)
        one = functools.partial(
            answer_image,
            resolved=resolved,
            files=self.files if files is None else files,
            base_url=base_url,
            metrics=self.metrics,
        )
        if encodes_inline(outcome.images, resolved):
            data = [one(image) for image in outcome.images]
        else:
            # An image per thread: OpenCV and Pillow let go of the GIL while they
            # encode, so n images take about as long as one where there are cores
            # (n=4 at 1024x1024, Server-Timing encode on 2 cores: PNG 138 -> 91 ms,
            # WEBP 329 -> 179 ms).
            encoded = (run_in_threadpool(one, image) for image in outcome.images)
            data = list(await asyncio.gather(*encoded))
        if outcome.flagged_seeds:
            flagged = [flagged_image(seed) for seed in outcome.flagged_seeds]
            data = in_seed_order(data + flagged, resolved.job.seeds)
        return images_response(data, resolved)

    async def _stream(
        self, resolved: ResolvedRequest, http_request: Request, kind: str
    ) -> EventStream:
        """The events of a streamed request, once its first one is known.

        Until a preview arrives nothing is sent, so a request refused (queue
        full, bad LoRA, ...) still gets its HTTP error status; after one, a
        failure is an `error` event.
        """
        previews: asyncio.Queue[RenderEvent] = asyncio.Queue()
        render = asyncio.ensure_future(self.renderer.generate(resolved.job, previews.put))
        try:
            first = await self._while_connected(_next_preview(previews, render), http_request)
            if first is None:
                response = await self._images_for(render.result(), resolved, http_request)
                return completed_events(response, f"{kind}.completed")
        except BaseException:
            await _stop(render)
            raise
        return self._events(first, render, previews, resolved, http_request, kind)

    async def _events(
        self,
        first: RenderEvent,
        render: asyncio.Future[GenerationOutcome],
        previews: asyncio.Queue[RenderEvent],
        resolved: ResolvedRequest,
        http_request: Request,
        kind: str,
    ) -> EventStream:
        # Starlette cancels this generator when the client goes away; the
        # finally then closes the render stream, which cancels the images.
        try:
            event: RenderEvent | None = first
            while event is not None:
                assert event.image is not None and event.partial_index is not None
                name = f"{kind}.partial_image"
                encode = functools.partial(
                    partial_event, event.image, event.partial_index, resolved, name
                )
                inline = encodes_inline([event.image], resolved)
                yield encode() if inline else await run_in_threadpool(encode)
                event = await _next_preview(previews, render)
            try:
                response = await self._images_for(render.result(), resolved, http_request)
            except APIError as error:
                yield error_event(error)
                return
            async for chunk in completed_events(response, f"{kind}.completed"):
                yield chunk
        finally:
            await _stop(render)

    async def _while_connected(self, work: Awaitable[T], http_request: Request) -> T:
        """`work`'s result; 499 when the client goes away first.

        The deadline is not watched here: the batcher owns it and answers TIMEOUT.
        """
        task = asyncio.ensure_future(work)
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


EventStream = AsyncIterator[bytes]


async def _decoded(image: bytes, mask: bytes | None) -> EditSource:
    """The uploads of an edit, decoded off the event loop; a 400 naming the bad one."""
    try:
        return await run_in_threadpool(decode_edit_source, image, mask)
    except InvalidUpload as exc:
        raise invalid_value(exc.param, str(exc)) from None


@dataclass(frozen=True)
class Answer:
    """A synchronous answer: its body, and the Server-Timing header that goes beside it."""

    body: ImagesResponse
    server_timing: str | None = None


T = TypeVar("T")


async def _next_preview(
    previews: asyncio.Queue[RenderEvent], render: asyncio.Future[GenerationOutcome]
) -> RenderEvent | None:
    """The next preview, in order; None once the render is over and all were taken."""
    if not previews.empty():
        return previews.get_nowait()
    waiting = asyncio.ensure_future(previews.get())
    either: set[asyncio.Future[Any]] = {render, waiting}
    await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    if waiting.done():
        return waiting.result()
    waiting.cancel()
    return previews.get_nowait() if not previews.empty() else None


async def _stop(render: asyncio.Future[GenerationOutcome]) -> None:
    """Cancels the render if it still runs and waits until its stream is closed.

    Shielded: when Starlette cancels a streamed answer (its client left), anyio
    cancels this task again at every await, and an unshielded wait would pass
    each of those cancellations on to the render's own clean-up, which then
    never closes the connection to the worker (so the worker never stops).
    """
    if render.done():
        return
    render.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.shield(render)
