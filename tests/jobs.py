"""GenerationJobs for unit tests: one factory, with defaults for what a test leaves out."""

from __future__ import annotations

from sdxl_service.choices import RefinerMode, SchedulerName
from sdxl_service.contract.jobs import GenerationJob, RenderParams


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
) -> GenerationJob:
    """n images, seeds seed..seed+n-1; square unless `height` is given; the
    prompt is the request id unless given."""
    return GenerationJob(
        request_id=request_id,
        params=RenderParams(
            width=width,
            height=width if height is None else height,
            steps=steps,
            guidance_scale=5.0,
            high_noise_frac=0.8,
            refiner=RefinerMode.ENSEMBLE,
            scheduler=SchedulerName.EULER,
        ),
        prompt=request_id if prompt is None else prompt,
        seeds=[seed + i for i in range(n)],
        deadline=deadline,
        partial_images=partial_images,
    )
