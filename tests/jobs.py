"""RenderParams and GenerationJobs for unit tests: one factory each, with defaults for what a
test leaves out."""

from __future__ import annotations

from typing import Any

from sdxl_service.choices import RefinerMode, SchedulerName
from sdxl_service.contract.render_request import RenderParams, RenderRequest


def make_params(**overrides: Any) -> RenderParams:
    """A 64x64 ensemble render of 4 Euler steps, guidance 5, the refiner from 0.8."""
    values: dict[str, Any] = {
        "width": 64,
        "height": 64,
        "num_inference_steps": 4,
        "guidance_scale": 5.0,
        "high_noise_frac": 0.8,
        "refiner": RefinerMode.ENSEMBLE,
        "scheduler": SchedulerName.EULER,
    }
    return RenderParams(**{**values, **overrides})


def make_job(
    request_id: str = "req-1",
    n: int = 1,
    *,
    seed: int = 0,
    prompt: str | None = None,
    width: int = 8,
    height: int | None = None,
    steps: int = 2,
    deadline: float | None = None,
    partial_images: int = 0,
) -> RenderRequest:
    """n images, seeds seed..seed+n-1; square unless `height` is given; the
    prompt is the request id unless given."""
    return RenderRequest(
        request_id=request_id,
        params=make_params(
            width=width, height=width if height is None else height, num_inference_steps=steps
        ),
        prompt=request_id if prompt is None else prompt,
        seeds=[seed + i for i in range(n)],
        deadline=deadline,
        partial_images=partial_images,
    )
