"""The playground: one page at `GET /` to try prompts in a browser.

Plain HTML, CSS and JavaScript served by the service itself (no CDN, no build
step): it calls the service's own /v1 API with `stream: true` and shows each
image as its event arrives. `SDXL_PLAYGROUND=false` leaves `/` to BentoML.
"""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.responses import FileResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..paths import PLAYGROUND_ASSETS, PLAYGROUND_PAGE

ASSETS = Path(__file__).parent / "assets"
ASSETS_PATH = PLAYGROUND_ASSETS


async def _page(_request: object) -> FileResponse:
    # no-cache: a new version of the page shows without a hard reload.
    return FileResponse(ASSETS / "index.html", headers={"Cache-Control": "no-cache"})


def create_playground_app() -> Starlette:
    """`/` (the page) and `/playground/*` (its script and style sheet)."""
    return Starlette(
        routes=[
            Route(PLAYGROUND_PAGE, _page, methods=["GET", "HEAD"]),
            Mount(ASSETS_PATH, app=StaticFiles(directory=ASSETS), name="playground"),
        ]
    )
