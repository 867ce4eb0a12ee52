"""BentoML wiring: the render service (GPU) and the OpenAI-facing HTTP service.

Logic lives in src/sdxl_service; torch and diffusers are imported only inside
the render process, so `bentoml build` and the HTTP process stay light.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

# The bento copies src/ beside this file but does not install it as a package.
sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

import bentoml

from sdxl_service.api_keys import APIKeyAuth, APIKeys
from sdxl_service.http_app import create_app
from sdxl_service.http_metric_labels import bound_http_metric_labels
from sdxl_service.jobs import GenerationJob, GenerationOutcome
from sdxl_service.middleware import MountRootAlias, OpenAIErrorsEverywhere
from sdxl_service.settings import DEFAULT_PORT, SERVICE_ID, get_settings

settings = get_settings()
API_PREFIX = "/v1"
bound_http_metric_labels()


@bentoml.service(
    name="sdxl-renderer",
    resources={"gpu": 1},
    workers=1,
    traffic={"timeout": settings.traffic_timeout},
    # BentoML's client to this service replaces its connection pool every 100
    # requests and every 300 s by closing the old one, which kills the calls
    # still in flight ("Server disconnected") while their images keep the GPU
    # busy for nobody. Generations are long; keep one pool for good.
    runner_connection={"max_requests": 2**31, "max_age": 1e9},
)
class RenderService:
    def __init__(self) -> None:
        from sdxl_service.metrics import ServiceMetrics
        from sdxl_service.render_host import RenderHost

        self.host = RenderHost(settings, ServiceMetrics())

    def __is_ready__(self) -> bool:
        return self.host.is_ready()

    def __is_alive__(self) -> bool:
        return self.host.is_alive()

    @bentoml.on_shutdown
    async def shutdown(self) -> None:
        await self.host.stop()

    @bentoml.api
    async def generate(self, job: GenerationJob) -> GenerationOutcome:
        return await self.host.generate(job)

    @bentoml.api
    async def cancel(self, request_id: str) -> bool:
        return self.host.cancel(request_id)

    @bentoml.api
    async def describe(self) -> dict[str, Any]:
        return self.host.describe()


# BentoML's own CORS middleware, for browser clients on other origins.
CORS = {
    "enabled": True,
    "access_control_allow_origins": settings.cors_origins,
    "access_control_allow_methods": ["GET", "POST", "OPTIONS"],
    "access_control_allow_headers": ["Authorization", "Content-Type", "OpenAI-Organization"],
    "access_control_max_age": 600,
}


def _current_serving() -> Any:
    return bentoml.get_current_service().serving


@bentoml.service(
    name=SERVICE_ID,
    http={"port": DEFAULT_PORT, **({"cors": CORS} if settings.cors_origins else {})},
    traffic={"timeout": settings.traffic_timeout},
)
@bentoml.asgi_app(
    create_app(_current_serving, settings.max_body_bytes, settings.max_body_bytes_in_flight),
    path=API_PREFIX,
)
class ImagesAPI:
    renderer = bentoml.depends(RenderService)

    def __init__(self) -> None:
        from sdxl_service.files import FileSweeper, open_file_store
        from sdxl_service.metrics import ServiceMetrics
        from sdxl_service.render_client import BentoRenderClient
        from sdxl_service.serving import ImagesServing

        metrics = ServiceMetrics()
        files = open_file_store(settings)
        self.serving = ImagesServing(
            settings, BentoRenderClient(self.renderer, metrics), files, metrics
        )
        self.sweeper = FileSweeper(files)

    @bentoml.on_startup
    async def start_sweeping(self) -> None:
        # Expired url files go on a timer, not only when a new one is stored.
        self.sweeper.start()

    @bentoml.on_shutdown
    async def stop_sweeping(self) -> None:
        await self.sweeper.stop()


if settings.playground:
    from sdxl_service.playground import create_playground_app

    # At "/": BentoML mounts passively, so only the page's own paths reach it.
    ImagesAPI.mount_asgi_app(create_playground_app(), path="/", name="playground")  # type: ignore[attr-defined]

# Outermost first: a request without an accepted key is refused before its body is read.
ImagesAPI.add_asgi_middleware(  # type: ignore[attr-defined]
    APIKeyAuth,
    keys=APIKeys([key.get_secret_value() for key in settings.api_keys], settings.api_keys_file),
    metrics_public=settings.metrics_public,
)
ImagesAPI.add_asgi_middleware(OpenAIErrorsEverywhere)  # type: ignore[attr-defined]
ImagesAPI.add_asgi_middleware(MountRootAlias, path=API_PREFIX)  # type: ignore[attr-defined]
