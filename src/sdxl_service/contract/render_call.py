"""The render call: the route of the render service and the body the HTTP service sends it.

service.py's `RenderService.render` takes these fields as its arguments (BentoML builds
its input model from the signature); tests/unit/contract/test_render_call.py keeps the two equal.
"""

from __future__ import annotations

from pydantic import BaseModel

from .render_request import RenderRequest

RENDER_ROUTE = "/render"


class RenderCall(BaseModel):
    """What one POST to RENDER_ROUTE carries."""

    job: RenderRequest
    # Take the job only if this worker has nothing queued or rendering, else answer
    # BUSY at once: the caller then tries another worker (api/render_client.py).
    only_if_idle: bool = False
