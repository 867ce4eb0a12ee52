"""The FastAPI app BentoML mounts at /v1: routes only, behaviour in serving.py."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Match

from .control_map_previews import ControlMapRequest, ControlMapsResponse
from .errors import install_error_handlers, missing_parameter, routing_error
from .forms import read_image_file, read_image_form
from .infotext_reader import InfotextAnswer
from .jobs.routes import SUBMISSION_SCHEMAS
from .jobs.routes import router as jobs_router
from .jobs.serving import JobsServing
from .middleware import BodyBudget, BodySizeLimit
from .request_kinds import GENERATION, KINDS, RequestKind
from .schemas import ImageGenerationRequest, ImagesResponse, ModelList
from .serving import Answer, EventStream, ImagesServing

_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


async def _serving(request: Request) -> ImagesServing:
    # async: FastAPI runs a plain-def dependency in its thread pool, two thread hand-offs
    # per request for an attribute lookup (make bench-overhead).
    return request.app.state.get_serving()  # type: ignore[no-any-return]


Serving = Annotated[ImagesServing, Depends(_serving)]


def _answer(result: Answer | EventStream) -> Response:
    if isinstance(result, Answer):
        # Serialized here, once: FastAPI's response_model path dumps, validates
        # and dumps the answer again, then json.dumps it, ~1 ms per 256x256
        # image (make bench-overhead). The route keeps response_model for the
        # OpenAPI document.
        body = result.body.model_dump_json(by_alias=True, exclude_none=True)
        headers = {"Server-Timing": result.server_timing} if result.server_timing else None
        return Response(body, media_type="application/json", headers=headers)
    return StreamingResponse(result, media_type="text/event-stream")


def _form_endpoint(kind: RequestKind) -> Callable[..., Awaitable[Response]]:
    async def endpoint(request: Request, images: Serving) -> Response:
        form = await read_image_form(request, kind.request, takes_mask=kind.takes_mask)
        return _answer(await images.serve(kind, form.fields, request, form.image, form.mask))

    return endpoint


def _document_job_submissions(app: FastAPI) -> None:
    """The OpenAPI document with the schemas POST /images/jobs' requestBody refers to."""
    make_document = app.openapi

    def document() -> dict[str, Any]:
        schema = make_document()
        known = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, model_schema in SUBMISSION_SCHEMAS.items():
            known.setdefault(name, model_schema)
        return schema

    app.openapi = document  # type: ignore[method-assign]


def create_app(
    get_serving: Callable[[], ImagesServing],
    max_body_bytes: int,
    max_body_bytes_in_flight: int | None = None,
    get_jobs: Callable[[], JobsServing | None] | None = None,
) -> FastAPI:
    app = FastAPI(
        title="stable-diffusion-xl-with-refiner",
        summary="OpenAI-compatible Images API for SDXL base 1.0 + refiner 1.0",
    )
    # Looked up per request: BentoML builds the serving object after the app.
    app.state.get_serving = get_serving
    app.state.get_jobs = get_jobs
    install_error_handlers(app)
    budget = BodyBudget(max_body_bytes_in_flight or 4 * max_body_bytes)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes, budget=budget)

    @app.get("/")
    async def health() -> dict[str, bool]:
        # The Prem app's health check: GET {baseUrl}/v1 -> 2xx.
        return {"status": True}

    @app.get("/models", response_model=ModelList, response_model_exclude_none=True)
    async def list_models(images: Serving) -> ModelList:
        return await images.list_models()

    @app.post(GENERATION.path, response_model=ImagesResponse, response_model_exclude_none=True)
    async def create_image(
        body: ImageGenerationRequest, request: Request, images: Serving
    ) -> Response:
        return _answer(await images.serve(GENERATION, body, request))

    @app.post("/images/control-maps", response_model=ControlMapsResponse)
    async def control_map(images: Serving, body: ControlMapRequest | None = None) -> Response:
        # Optional here so that no body at all names what is missing (the shared handler
        # would name a generation's prompt).
        if body is None:
            raise missing_parameter("image")
        answer = await images.control_map(body)
        return Response(answer.model_dump_json(), media_type="application/json")

    @app.post("/images/infotext", response_model=InfotextAnswer)
    async def read_infotext(request: Request, images: Serving) -> Response:
        # Multipart as the edits take their picture (forms.py), within the same limits.
        answer = await images.infotext(await read_image_file(request))
        return Response(answer.model_dump_json(), media_type="application/json")

    @app.get("/images/files/{file_id}", name="image_file")
    async def image_file(file_id: str, images: Serving) -> Response:
        data, content_type = await images.file(file_id)
        return Response(data, media_type=content_type, headers={"Cache-Control": "private"})

    # The multipart kinds (edits, variations, upscale): their form is read by hand (forms.py).
    for kind in KINDS.values():
        if kind.multipart:
            app.add_api_route(
                kind.path,
                _form_endpoint(kind),
                methods=["POST"],
                name=f"{kind.name}_image",
                response_model=ImagesResponse,
                response_model_exclude_none=True,
            )

    app.include_router(jobs_router)
    _document_job_submissions(app)

    # Last: BentoML mounts this app "passively" and would answer unknown
    # paths under /v1 with a plain-text 404 of its own.
    @app.api_route("/{unknown_path:path}", methods=_ALL_METHODS, include_in_schema=False)
    async def unknown_path(request: Request) -> JSONResponse:
        for route in app.router.routes:
            if getattr(route, "name", None) == "unknown_path":
                continue
            if route.matches(request.scope)[0] == Match.PARTIAL:
                return routing_error(405, request.method, request.url.path).response()
        return routing_error(404, request.method, request.url.path).response()

    return app
