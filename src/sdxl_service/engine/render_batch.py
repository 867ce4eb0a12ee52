"""What one pipeline call of the engine takes: its images and the batch, and what the engine
raises. Used only inside the render worker (render/ and engine/); the render request that
crosses between the processes is contract/render_request.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..contract.render_request import RenderParams, RenderRequest, RgbPicture

if TYPE_CHECKING:
    from PIL import Image


@dataclass(frozen=True, kw_only=True)
class ImageTask:
    prompt: str
    negative_prompt: str = ""
    seed: int
    # Per image rather than per batch, so that edits of different pictures with
    # the same RenderParams still share a pipeline call. The images of one job
    # share the same bytes objects. Megabytes each: kept out of reprs and logs.
    init_image: bytes | None = field(default=None, repr=False)  # RGB, params' width x height
    mask: bytes | None = field(default=None, repr=False)  # L, 255 where the image is repainted
    # One per ControlNet unit of the batch's params: RGB, params' width x height.
    control_images: tuple[bytes, ...] = field(default=(), repr=False)
    # The same units' maps at the hires fix's first pass size (empty without the hires fix).
    first_pass_control_images: tuple[bytes, ...] = field(default=(), repr=False)
    # Per IP-Adapter of the params, its pictures; the images of one job share the same tuple
    # (engine/ip_adapters.py encodes each once).
    ip_adapter_images: tuple[tuple[RgbPicture, ...], ...] = field(default=(), repr=False)


def _never() -> bool:
    return False


@dataclass(kw_only=True)
class RenderBatch:
    """One pipeline call: compatible images, one generator (seed) per image."""

    params: RenderParams
    tasks: list[ImageTask]
    # Polled at every denoising step; True aborts the call with RenderCancelled.
    should_stop: Callable[[], bool] = _never
    # Live previews: on_preview(task index, preview index, image at the render
    # size), preview_counts[i] previews (0..3) for task i. None or all 0: none.
    on_preview: Callable[[int, int, Image.Image], None] | None = None
    preview_counts: tuple[int, ...] = ()
    # After each denoising step (base and refiner counted together): on_step(steps done).
    on_step: Callable[[int], None] | None = None


class RenderCancelled(Exception):
    """Raised from inside a pipeline call when nobody waits for its images."""


class OutOfMemory(Exception):
    """The accelerator ran out of memory; its cache was already released."""


class InvalidLora(Exception):
    """A LoRA of the batch cannot be applied (no SDXL LoRA, damaged); nothing of it
    stays loaded. The message is for the client: names, never file-system paths."""


class InvalidModel(Exception):
    """The model of SDXL_MODELS_DIR a batch asked for cannot be loaded; nothing of it stays
    loaded. The message is for the client: names, never file-system paths."""


class InvalidControlNet(Exception):
    """A ControlNet a batch asked for cannot be loaded (damaged, not made for this base); nothing
    of it stays loaded. The message is for the client: names, never file-system paths."""


class InvalidIpAdapter(Exception):
    """An IP-Adapter a batch asked for cannot be loaded (its weights or image encoder do not fit,
    are damaged or gone); nothing of it stays loaded. The message is for the client: names,
    never file-system paths."""


class InvalidUpscaler(Exception):
    """The upscaler model a batch asked for cannot be loaded (spandrel does not know it, or it
    is damaged). The message is for the client: names, never file-system paths."""


class InvalidEmbedding(Exception):
    """A prompt names an embedding that cannot be used (no SDXL embedding, other widths,
    damaged). The message is for the client: names, never file-system paths."""


def image_tasks(request: RenderRequest) -> list[ImageTask]:
    """A render request's images, one task per seed."""
    return [
        ImageTask(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            seed=seed,
            init_image=request.init_image,
            mask=request.mask,
            control_images=request.control_images,
            first_pass_control_images=request.first_pass_control_images,
            ip_adapter_images=request.ip_adapter_images,
        )
        for seed in request.seeds
    ]
