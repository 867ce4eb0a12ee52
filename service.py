"""BentoML wiring: the render service (GPU) and the OpenAI-facing HTTP service.

Logic lives in src/sdxl_service; torch and diffusers are imported only inside
the render process, so `bentoml build` and the HTTP process stay light.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

# The bento copies src/ beside this file but does not install it as a package.
sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

import bentoml

from sdxl_service.api.api_keys import APIKeyAuth, APIKeys
from sdxl_service.api.app import create_app
from sdxl_service.api.jobs import refuse_a_newer_job_database
from sdxl_service.api.metric_labels import RouteLabels, bound_http_metric_labels
from sdxl_service.api.middleware import MountRootAlias, OpenAIErrorsEverywhere
from sdxl_service.api.paths import API_PREFIX
from sdxl_service.api.playground import create_playground_app
from sdxl_service.contract.render_call import RENDER_ROUTE
from sdxl_service.contract.render_request import RenderRequest
from sdxl_service.contract.wire import event_frame
from sdxl_service.render.worker_plan import plan_from_environment
from sdxl_service.settings import DEFAULT_PORT, SERVICE_ID, get_settings

settings = get_settings()
# As a bad setting does: `bentoml serve` stops here, saying why, before any worker starts.
refuse_a_newer_job_database(settings)
# Pins the GPUs of SDXL_GPUS for the workers started from this process.
plan = plan_from_environment()


@bentoml.service(
    name="sdxl-renderer",
    resources={"gpu": plan.gpu_resources},
    workers=plan.workers,
    traffic={"timeout": settings.traffic_timeout},
    # BentoML's client to this service replaces its connection pool every 100
    # requests and every 300 s by closing the old one, which kills the calls
    # still in flight ("Server disconnected") while their images keep the GPU
    # busy for nobody. Generations are long; keep one pool for good.
    runner_connection={"max_requests": 2**31, "max_age": 1e9},
    # Every call here is one the HTTP service already logged and counted
    # (bentoml_service_request_* of /v1); a second access line and metrics per
    # call cost ~1 ms of this worker's event loop (make bench-overhead).
    logging={"access": {"enabled": False}},
    metrics={"enabled": False},
)
class RenderService:
    def __init__(self) -> None:
        from sdxl_service.contract.worker_registry import WorkerRegistry
        from sdxl_service.metrics import ServiceMetrics
        from sdxl_service.render.host import RenderHost

        worker = bentoml.server_context.worker_index or 1
        self.host = RenderHost(
            settings,
            ServiceMetrics(worker=worker),
            worker=worker,
            workers=plan.workers,
            device=plan.device_for(worker),
            registry=WorkerRegistry.from_environment(),
        )

    def __is_ready__(self) -> bool:
        return self.host.is_ready()

    def __is_alive__(self) -> bool:
        return self.host.is_alive()

    @bentoml.on_shutdown
    async def shutdown(self) -> None:
        await self.host.stop()

    @bentoml.api(route=RENDER_ROUTE)
    async def render(
        self, job: RenderRequest, only_if_idle: bool = False
    ) -> AsyncGenerator[bytes, None]:
        """A RenderCall's fields (contract/render_call.py) -> RenderEvents (contract/wire.py).

        The HTTP service closing the stream cancels the job.
        """
        async for event in self.host.stream(job, only_if_idle):
            yield event_frame(event)

    @bentoml.api
    async def describe(self) -> dict[str, Any]:
        return self.host.describe()

    @bentoml.api
    async def describe_upscalers(self) -> dict[str, Any]:
        """{"upscalers": by name, or None while loading}: spandrel reads the files, off the loop."""
        return {"upscalers": await asyncio.to_thread(self.host.describe_upscalers)}


# BentoML's own CORS middleware, for browser clients on other origins.
CORS = {
    "enabled": True,
    "access_control_allow_origins": settings.cors_origins,
    "access_control_allow_methods": ["GET", "POST", "DELETE", "OPTIONS"],
    "access_control_allow_headers": ["Authorization", "Content-Type", "OpenAI-Organization"],
    "access_control_max_age": 600,
}


def _current_serving() -> Any:
    return bentoml.get_current_service().serving


def _current_jobs() -> Any:
    return bentoml.get_current_service().jobs


api_app = create_app(
    _current_serving,
    settings.max_body_bytes,
    settings.max_body_bytes_in_flight,
    get_jobs=_current_jobs,
)
playground_app = create_playground_app() if settings.playground else None
bound_http_metric_labels(
    RouteLabels.of((API_PREFIX, api_app), ("", playground_app), api_prefix=API_PREFIX)
)


@bentoml.service(
    name=SERVICE_ID,
    http={"port": DEFAULT_PORT, **({"cors": CORS} if settings.cors_origins else {})},
    traffic={"timeout": settings.traffic_timeout},
)
@bentoml.asgi_app(api_app, path=API_PREFIX)
class ImagesAPI:
    renderer = bentoml.depends(RenderService)

    def __init__(self) -> None:
        from sdxl_service.api.files import FileSweeper, open_file_store
        from sdxl_service.api.jobs import JobRunner, JobsServing, open_jobs
        from sdxl_service.api.render_client import BentoRenderClient
        from sdxl_service.api.serving import ImagesServing
        from sdxl_service.contract.worker_registry import WorkerRegistry
        from sdxl_service.metrics import ServiceMetrics

        metrics = ServiceMetrics()
        files = open_file_store(settings)
        self.worker_registry = WorkerRegistry.from_environment()
        self.render_client = BentoRenderClient(
            self.renderer,
            metrics,
            workers=plan.workers,
            registry=self.worker_registry,
            timeout=settings.traffic_timeout,
            max_queue_images=settings.max_queue_images,
        )
        self.serving = ImagesServing(settings, self.render_client, files, metrics)
        self.sweeper = FileSweeper(files)
        jobs = open_jobs(settings, self.serving, self.render_client)
        # None when another service holds the SQLite job database (the job routes answer 404).
        self.job_runner: JobRunner | None = jobs[0] if jobs else None
        self.jobs: JobsServing | None = jobs[1] if jobs else None

    def __is_ready__(self) -> bool:
        # BentoML's own probe of the render service reaches one worker at
        # random; ready means every one of them has loaded.
        return self.worker_registry is None or self.worker_registry.all_ready(plan.workers)

    @bentoml.on_startup
    async def start_sweeping(self) -> None:
        # Expired url files go on a timer, not only when a new one is stored.
        self.sweeper.start()
        if self.job_runner is not None:
            self.job_runner.start()

    @bentoml.on_shutdown
    async def stop_sweeping(self) -> None:
        if self.job_runner is not None:
            await self.job_runner.stop()
        await self.sweeper.stop()
        await self.render_client.close()


if playground_app is not None:
    # At "/": BentoML mounts passively, so only the page's own paths reach it.
    ImagesAPI.mount_asgi_app(playground_app, path="/", name="playground")  # type: ignore[attr-defined]

# Outermost first: a request without an accepted key is refused before its body is read.
ImagesAPI.add_asgi_middleware(  # type: ignore[attr-defined]
    APIKeyAuth,
    keys=APIKeys([key.get_secret_value() for key in settings.api_keys], settings.api_keys_file),
    metrics_public=settings.metrics_public,
    playground_public=playground_app is not None,
)
ImagesAPI.add_asgi_middleware(OpenAIErrorsEverywhere)  # type: ignore[attr-defined]
ImagesAPI.add_asgi_middleware(MountRootAlias, path=API_PREFIX)  # type: ignore[attr-defined]
