"""The kinds of Images request, one row each: its endpoint, its request model, whether it comes
as JSON or as a multipart form, and what it renders (its plan in request_rules.py).

The routes (app.py), the serving path (serving.py) and the image jobs (jobs/) read this table;
a new kind of request is a row here, its request model and its plan.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..ip_adapter_catalog import IpAdapterCatalog
from ..lora_catalog import LoraCatalog
from ..model_catalog import ModelCatalog
from ..settings import Settings
from ..upscaler_catalog import UpscalerCatalog
from .request_rules import (
    RenderPlan,
    ResolvedRequest,
    plan_edit,
    plan_generation,
    plan_upscale,
    plan_variation,
    resolve,
)
from .schemas import (
    ImageEditRequest,
    ImageGenerationRequest,
    ImageRequest,
    ImageUpscaleRequest,
    ImageVariationRequest,
)
from .uploads import EditSource


@dataclass(frozen=True, kw_only=True)
class RequestKind:
    # The kind's name: an image job's `kind`, and a metric label.
    name: str
    # Its synchronous endpoint under /v1.
    path: str
    request: type[ImageRequest]
    # A multipart form with the picture as its `image` file part (and `mask`); else JSON.
    multipart: bool
    takes_mask: bool = False
    # The prefix of its stream's events (`image_edit.partial_image`); None: never streamed.
    stream_event: str | None = None
    # A ControlNet unit without an `image` takes the uploaded picture (the upscale's "tile"
    # recipe); elsewhere every unit brings its own.
    units_default_to_picture: bool = False
    plan: Callable[[ImageRequest, EditSource | None, Settings], RenderPlan]

    def resolve(
        self,
        req: ImageRequest,
        source: EditSource | None,
        settings: Settings,
        native_resolution: int,
        loras: LoraCatalog | None = None,
        models: ModelCatalog | None = None,
        upscalers: UpscalerCatalog | None = None,
        ip_adapters: IpAdapterCatalog | None = None,
    ) -> ResolvedRequest:
        """What `req` (and an edit's decoded `source`) renders; CPU work for an edit."""
        return resolve(
            self.plan,
            req,
            source,
            settings,
            native_resolution,
            loras,
            models,
            upscalers,
            ip_adapters=ip_adapters,
        )


GENERATION = RequestKind(
    name="generation",
    path="/images/generations",
    request=ImageGenerationRequest,
    multipart=False,
    stream_event="image_generation",
    plan=plan_generation,
)
EDIT = RequestKind(
    name="edit",
    path="/images/edits",
    request=ImageEditRequest,
    multipart=True,
    takes_mask=True,
    stream_event="image_edit",
    plan=plan_edit,
)
VARIATION = RequestKind(
    name="variation",
    path="/images/variations",
    request=ImageVariationRequest,
    multipart=True,
    plan=plan_variation,
)
UPSCALE = RequestKind(
    name="upscale",
    path="/images/upscale",
    request=ImageUpscaleRequest,
    multipart=True,
    units_default_to_picture=True,
    plan=plan_upscale,
)

KINDS = {kind.name: kind for kind in (GENERATION, EDIT, VARIATION, UPSCALE)}
