"""The FastAPI app BentoML mounts at /v1: routes only, behaviour in serving.py."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError, install_error_handlers
from .protocol import ImageGenerationRequest, ImagesResponse, ModelList
from .serving import ImagesServing

_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


class BodySizeLimit:
    """413 for bodies over the limit, whether Content-Length says so or not.

    The body is read here, before FastAPI, because FastAPI turns any error
    raised while it reads a body into its own 400.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        too_large = APIError(
            413, f"The request body is larger than {self.max_bytes} bytes.", code="too_large"
        ).response()
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await too_large(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its body
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                # Later reads wait for the disconnect, as they would have.
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


class MountRootAlias:
    """Serves `/v1` as `/v1/` instead of Starlette's 307 redirect.

    The Prem app health-checks `GET {baseUrl}/v1` and counts only a 2xx as up.
    """

    def __init__(self, app: ASGIApp, path: str) -> None:
        self.app = app
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == self.path:
            scope = {**scope, "path": self.path + "/", "raw_path": (self.path + "/").encode()}
        await self.app(scope, receive, send)


async def completed_events(
    response: ImagesResponse, event_type: str = "image_generation.completed"
) -> AsyncIterator[bytes]:
    """stream=true: one completed event per image (`image_edit.completed` for edits).

    Partial previews are not produced (partial_images=0 behaviour): SDXL latents
    mid-way are noise, and decoding them would cost the GPU a VAE pass each.
    """
    for item in response.data:
        event = {
            "type": event_type,
            "b64_json": item.b64_json,
            "created_at": response.created,
            "size": response.size,
            "quality": response.quality,
            "background": response.background,
            "output_format": response.output_format,
            "seed": item.seed,
            "usage": {
                "input_tokens": 0,
                "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
                "output_tokens": 0,
                "total_tokens": 0,
            },
        }
        yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()


def create_app(get_serving: Callable[[], ImagesServing], max_body_bytes: int) -> FastAPI:
    app = FastAPI(
        title="stable-diffusion-xl-with-refiner",
        summary="OpenAI-compatible Images API for SDXL base 1.0 + refiner 1.0",
    )
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)

    def serving() -> ImagesServing:
        return get_serving()

    @app.get("/")
    async def health() -> dict[str, bool]:
        # The Prem app's health check: GET {baseUrl}/v1 -> 2xx.
        return {"status": True}

    @app.get("/models", response_model=ModelList, response_model_exclude_none=True)
    async def list_models(images: ImagesServing = Depends(serving)) -> ModelList:
        return await images.list_models()

    @app.post(
        "/images/generations", response_model=ImagesResponse, response_model_exclude_none=True
    )
    async def create_image(
        body: ImageGenerationRequest, request: Request, images: ImagesServing = Depends(serving)
    ) -> ImagesResponse | StreamingResponse:
        response = await images.generate(body, request)
        if body.stream:
            return StreamingResponse(completed_events(response), media_type="text/event-stream")
        return response

    @app.get("/images/files/{file_id}", name="image_file")
    async def image_file(file_id: str, images: ImagesServing = Depends(serving)) -> Response:
        data, content_type = await images.file(file_id)
        return Response(data, media_type=content_type, headers={"Cache-Control": "private"})

    @app.post("/images/edits", response_model=ImagesResponse, response_model_exclude_none=True)
    async def edit_image(
        request: Request, images: ImagesServing = Depends(serving)
    ) -> ImagesResponse | StreamingResponse:
        # multipart/form-data, read by ImagesServing: `image` may come as
        # `image[]`, which FastAPI's declared form parameters cannot express.
        body, response = await images.edit(request)
        if body.stream:
            events = completed_events(response, "image_edit.completed")
            return StreamingResponse(events, media_type="text/event-stream")
        return response

    @app.post("/images/variations", response_model=ImagesResponse, response_model_exclude_none=True)
    async def create_image_variation(
        request: Request, images: ImagesServing = Depends(serving)
    ) -> ImagesResponse:
        return await images.create_variation(request)

    # Last: BentoML mounts this app "passively" and would answer unknown
    # paths under /v1 with a plain-text 404 of its own.
    @app.api_route("/{unknown_path:path}", methods=_ALL_METHODS, include_in_schema=False)
    async def unknown_path(request: Request) -> JSONResponse:
        for route in app.router.routes:
            if route.name != "unknown_path" and route.matches(request.scope)[0] == Match.PARTIAL:
                message = f"Method {request.method} is not allowed on {request.url.path}."
                return APIError(405, message, code="method_not_allowed").response()
        message = f"Unknown path: {request.method} {request.url.path}."
        return APIError(404, message, code="not_found").response()

    return app
