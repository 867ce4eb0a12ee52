"""The IP-Adapters a request asks for: its `ip_adapters` list, checked against
SDXL_IP_ADAPTER_DIR, the pictures decoded.

The result is the render's `IpAdapterWeight`s in the request's order (part of the batch key:
requests naming the same adapters, scales and picture counts share a pipeline call) and each
adapter's pictures at their own size, raw RGB (the render worker's image encoder resizes
them, as diffusers' CLIPImageProcessor does). A bad entry is a 400 naming it by its path:
`ip_adapters[0].name`, `ip_adapters[1].images[2]`, `ip_adapters[0].scale`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..contract.render_request import IpAdapterWeight, RgbPicture
from ..ip_adapter_catalog import IpAdapterCatalog
from .errors import excerpt, invalid_value
from .inline_images import decode_inline_image
from .schemas import IpAdapterRequest
from .uploads import InvalidUpload

MAX_IMAGES = 4
MIN_SCALE, MAX_SCALE = 0.0, 2.0


@dataclass(frozen=True)
class IpAdapterSet:
    adapters: tuple[IpAdapterWeight, ...] = ()
    pictures: tuple[tuple[RgbPicture, ...], ...] = ()


def ip_adapter_set(
    asked: Sequence[IpAdapterRequest],
    catalog: IpAdapterCatalog | None,
    *,
    max_adapters: int,
    max_pixels: int,
) -> IpAdapterSet:
    """The checked adapters of a request and their decoded pictures; 400 naming the entry
    otherwise. Decoding takes CPU time: call it off the event loop. `max_adapters`: what a
    render worker keeps loaded at once (SDXL_CONTROL_CACHE); `max_pixels`: the largest
    picture taken (SDXL_MAX_PIXELS, the largest render)."""
    if not asked:
        return IpAdapterSet()
    if len(asked) > max_adapters:
        raise invalid_value(
            "ip_adapters",
            f"At most {max_adapters} IP-Adapters per request (SDXL_CONTROL_CACHE), got "
            f"{len(asked)}.",
        )
    folder = catalog.snapshot() if catalog is not None else {}
    adapters, pictures = [], []
    for index, one in enumerate(asked):
        param = f"ip_adapters[{index}]"
        entry = folder.get(one.name)
        if entry is None:
            raise invalid_value(
                f"{param}.name",
                f"There is no IP-Adapter '{excerpt(one.name)}'; GET /v1/models lists the "
                "available ones (owned_by ip_adapter_dir).",
                code="ip_adapter_not_found",
            )
        if entry.problem is not None:
            raise invalid_value(
                f"{param}.name",
                f"IP-Adapter '{one.name}' cannot be used: {entry.problem}.",
                code="invalid_ip_adapter",
            )
        if not MIN_SCALE <= one.scale <= MAX_SCALE:
            raise invalid_value(
                f"{param}.scale", f"The scale is {one.scale:g}; it must be between 0 and 2."
            )
        if not 1 <= len(one.images) <= MAX_IMAGES:
            raise invalid_value(
                f"{param}.images",
                f"An IP-Adapter takes 1 to {MAX_IMAGES} images, got {len(one.images)}.",
            )
        pictures.append(
            tuple(
                _picture(value, f"{param}.images[{number}]", max_pixels)
                for number, value in enumerate(one.images)
            )
        )
        adapters.append(IpAdapterWeight(name=one.name, scale=one.scale, images=len(one.images)))
    return IpAdapterSet(adapters=tuple(adapters), pictures=tuple(pictures))


def _picture(value: str, param: str, max_pixels: int) -> RgbPicture:
    try:
        image = decode_inline_image(value, param)
    except InvalidUpload as exc:
        raise invalid_value(exc.param, str(exc)) from None
    width, height = image.size
    if width * height > max_pixels:
        raise invalid_value(
            param,
            f"Invalid '{param}': {width}x{height} is more than the {max_pixels} pixels this "
            "server takes (SDXL_MAX_PIXELS); the image encoder sees 224x224 at most, so a "
            "smaller picture loses nothing.",
            code="image_too_large",
        )
    return RgbPicture(width=width, height=height, rgb=image.tobytes())
