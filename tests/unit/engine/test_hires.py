"""The hires fix in the engine: a first pass at the smaller size, upscaled, denoised again.

Pinned against what each part already equals: the first pass is the text-to-image render
at the first size, and with the Lanczos upscaler the second pass is the edit (img2img,
pixel-equal to diffusers' elsewhere) of that image resized; with the latent upscaler it is
diffusers' img2img from the bilinear-upscaled latents.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline
from PIL import Image

from sdxl_service.api.jobs.serving import progress_steps
from sdxl_service.choices import HiresUpscaler, RefinerMode, RenderKind
from sdxl_service.contract.render_request import HiresParams, RenderParams
from sdxl_service.engine import Engine
from sdxl_service.engine.render_batch import ImageTask, RenderBatch
from sdxl_service.engine.schedulers import make_scheduler
from tests.jobs import make_params

SEEDS = (21, 22)
PROMPT = "a harbour at night"
STRENGTH = 0.5


def hires_params(upscaler: HiresUpscaler, refiner: RefinerMode = RefinerMode.NONE) -> RenderParams:
    hires = HiresParams(
        first_width=64,
        first_height=64,
        scale=2.0,
        steps=6,
        denoising_strength=STRENGTH,
        upscaler=upscaler,
    )
    return make_params(width=128, height=128, refiner=refiner, hires=hires)


def render(engine: Engine, params: RenderParams, tasks: list[ImageTask] | None = None) -> list:
    tasks = tasks or [ImageTask(prompt=PROMPT, seed=seed) for seed in SEEDS]
    return [np.asarray(image) for image in engine.render(RenderBatch(params=params, tasks=tasks))]


@pytest.mark.parametrize("refiner", [RefinerMode.NONE, RefinerMode.ENSEMBLE])
def test_lanczos_hires_is_the_edit_of_the_first_pass_resized(
    tiny_engine: Engine, refiner: RefinerMode
) -> None:
    params = hires_params(HiresUpscaler.LANCZOS, refiner)
    first = render(tiny_engine, make_params(width=64, height=64, refiner=refiner))
    edit = params.model_copy(
        update={
            "kind": RenderKind.IMAGE_TO_IMAGE,
            "num_inference_steps": 6,
            "strength": STRENGTH,
            "hires": None,
        }
    )
    tasks = [
        ImageTask(
            prompt=PROMPT,
            seed=seed,
            init_image=Image.fromarray(image)
            .resize((128, 128), Image.Resampling.LANCZOS)
            .tobytes(),
        )
        for seed, image in zip(SEEDS, first, strict=True)
    ]
    expected = render(tiny_engine, edit, tasks)
    got = render(tiny_engine, params)
    assert [image.shape for image in got] == [(128, 128, 3)] * 2
    for ours, theirs in zip(got, expected, strict=True):
        assert np.array_equal(ours, theirs)


def test_latent_hires_is_diffusers_img2img_from_the_upscaled_latents(tiny_engine: Engine) -> None:
    params = hires_params(HiresUpscaler.LATENT)
    base = tiny_engine.base
    generators = [torch.Generator().manual_seed(seed) for seed in SEEDS]
    common: dict[str, Any] = {
        "prompt": [PROMPT] * 2,
        "guidance_scale": params.guidance_scale,
        "output_type": "latent",
    }
    with torch.inference_mode():
        base.scheduler = make_scheduler(params.scheduler, tiny_engine._base_scheduler_config)
        latents = base(
            **common, num_inference_steps=4, width=64, height=64, generator=generators
        ).images
        upscaled = torch.nn.functional.interpolate(latents, size=(16, 16), mode="bilinear")
        img2img = StableDiffusionXLImg2ImgPipeline(**base.components)
        img2img.scheduler = make_scheduler(params.scheduler, tiny_engine._base_scheduler_config)
        again = [torch.Generator().manual_seed(seed) for seed in SEEDS]
        final = img2img(
            **common, image=upscaled, strength=STRENGTH, num_inference_steps=6, generator=again
        ).images
        expected = [np.asarray(image) for image in tiny_engine.latent_codec.decode(final)]
    got = render(tiny_engine, params)
    for ours, theirs in zip(got, expected, strict=True):
        assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


def test_hires_seeds_reproduce_and_the_upscalers_differ(tiny_engine: Engine) -> None:
    params = hires_params(HiresUpscaler.LATENT, RefinerMode.ENSEMBLE)
    latent, again = render(tiny_engine, params), render(tiny_engine, params)
    assert all(np.array_equal(a, b) for a, b in zip(latent, again, strict=True))
    lanczos = render(tiny_engine, hires_params(HiresUpscaler.LANCZOS, RefinerMode.ENSEMBLE))
    assert not np.array_equal(latent[0], lanczos[0])
    assert not np.array_equal(latent[0], latent[1])  # each image its own seed


def test_the_hires_fix_is_for_text_to_image_only() -> None:
    params = hires_params(HiresUpscaler.LATENT)
    with pytest.raises(ValueError, match="text-to-image"):
        RenderParams(**{**params.model_dump(), "kind": RenderKind.IMAGE_TO_IMAGE})


@pytest.mark.parametrize(
    ("upscaler", "refiner"),
    [(HiresUpscaler.LATENT, RefinerMode.NONE), (HiresUpscaler.LANCZOS, RefinerMode.ENSEMBLE)],
)
def test_hires_steps_count_on_across_both_passes_to_the_jobs_total(
    tiny_engine: Engine, upscaler: HiresUpscaler, refiner: RefinerMode
) -> None:
    params = hires_params(upscaler, refiner)
    steps: list[int] = []
    tasks = [ImageTask(prompt=PROMPT, seed=seed) for seed in SEEDS]
    tiny_engine.render(RenderBatch(params=params, tasks=tasks, on_step=steps.append))
    # 4 steps of the first pass, then int(6 * 0.5) = 3 of the second: 1..7, never back.
    total = progress_steps(params)
    assert total == 4 + 3
    assert steps == list(range(1, total + 1))
