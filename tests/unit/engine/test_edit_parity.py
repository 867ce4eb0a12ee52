"""Edits, inpainting and variations give, seed for seed, what the stock diffusers pipelines give.

The stock recipes are diffusers' own, run on the tiny pair's modules: the base
img2img / inpaint pipeline from the picture (`denoising_end=high_noise_frac`
in the ensemble), then the refiner from the base's latents
(`denoising_start=high_noise_frac`, or `strength` for `sequential`). The
tolerance is the generations': 1 in 255 on the decoded pixels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline
from PIL import Image

from sdxl_service.choices import RefinerMode, RenderKind
from sdxl_service.contract.render_request import RenderParams
from sdxl_service.engine import Engine
from sdxl_service.engine.render_batch import ImageTask, RenderBatch
from sdxl_service.engine.schedulers import make_scheduler
from tests.jobs import make_params

from .test_engine import LEFT_HALF, noise_picture, pixels

SIZE = 64
SEEDS = (7, 8)  # the n images of one request: one picture, their own seeds
HIGH_NOISE_FRAC = 0.8


@pytest.fixture(scope="module")
def stock(tiny_engine: Engine) -> dict[str, Any]:
    """diffusers' own pipeline classes over the engine's modules."""
    base, refiner = tiny_engine.base, tiny_engine.refiner
    return {
        "base_img2img": StableDiffusionXLImg2ImgPipeline(**base.components),
        "base_inpaint": StableDiffusionXLInpaintPipeline(**base.components),
        "refiner_img2img": refiner,
        "refiner_inpaint": StableDiffusionXLInpaintPipeline(
            **refiner.components, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False
        ),
    }


def stock_recipe(
    engine: Engine,
    stock: dict[str, Any],
    params: RenderParams,
    *,
    prompt: str,
    picture: bytes,
    mask: bytes | None,
    stages: list[tuple[str, dict[str, Any]]],
) -> list[np.ndarray]:
    """Run `stages` ((pipeline, arguments) in order) as diffusers documents, and decode."""
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in SEEDS]
    n = len(SEEDS)
    inputs: dict[str, Any] = {}
    if mask is not None:
        mask_image = Image.frombytes("L", (SIZE, SIZE), mask)
        inputs = {"mask_image": [mask_image] * n, "width": SIZE, "height": SIZE}
    image: Any = [Image.frombytes("RGB", (SIZE, SIZE), picture)] * n
    with torch.inference_mode():
        for name, arguments in stages:
            pipeline = stock[name]
            config = engine._refiner_scheduler_config if "refiner" in name else None
            pipeline.scheduler = make_scheduler(
                params.scheduler, config or engine._base_scheduler_config
            )
            image = pipeline(
                prompt=[prompt] * n,
                image=image,
                num_inference_steps=params.num_inference_steps,
                guidance_scale=params.guidance_scale,
                generator=generators,
                output_type="latent",
                **inputs,
                **arguments,
            ).images
        return [pixels(decoded) for decoded in engine.latent_codec.decode(image)]


def ours(
    engine: Engine, params: RenderParams, *, prompt: str, picture: bytes, mask: bytes | None
) -> list[np.ndarray]:
    tasks = [
        ImageTask(prompt=prompt, negative_prompt="", seed=seed, init_image=picture, mask=mask)
        for seed in SEEDS
    ]
    return [pixels(image) for image in engine.render(RenderBatch(params=params, tasks=tasks))]


def edit_params(kind: RenderKind, mode: RefinerMode, strength: float, scheduler: str) -> Any:
    return make_params(
        kind=kind,
        width=SIZE,
        height=SIZE,
        num_inference_steps=10,
        high_noise_frac=HIGH_NOISE_FRAC,
        refiner=mode,
        scheduler=scheduler,
        strength=strength,
    )


def recipe(kind: RenderKind, mode: RefinerMode, strength: float) -> list[tuple[str, dict]]:
    stage = "inpaint" if kind is RenderKind.INPAINT else "img2img"
    base, refiner = f"base_{stage}", f"refiner_{stage}"
    if mode is RefinerMode.NONE:
        return [(base, {"strength": strength})]
    if mode is RefinerMode.SEQUENTIAL:
        # The sequential refiner re-noises no more than the edit itself did.
        refiner_strength = min(strength, 1 - HIGH_NOISE_FRAC)
        return [(base, {"strength": strength}), (refiner, {"strength": refiner_strength})]
    if strength <= 0.2:
        # A light edit starts below the hand-over: the engine lets the refiner
        # make it alone from the picture. diffusers' ensemble recipe would add
        # the base's noise at `strength`, run no base step and start the refiner
        # at `denoising_start`, a noise level those latents do not have.
        return [(refiner, {"strength": strength})]
    return [
        (base, {"strength": strength, "denoising_end": HIGH_NOISE_FRAC}),
        (refiner, {"denoising_start": HIGH_NOISE_FRAC}),
    ]


def assert_same_pixels(ours: list[np.ndarray], stock: list[np.ndarray]) -> None:
    differences = [int(np.abs(a - b).max()) for a, b in zip(ours, stock, strict=True)]
    assert max(differences) <= 1, f"max pixel differences per image: {differences}"
    assert np.abs(ours[0] - ours[1]).mean() > 1.0  # the seeds do give different images


CASES = [
    (RefinerMode.NONE, 0.75),
    (RefinerMode.ENSEMBLE, 0.75),
    (RefinerMode.SEQUENTIAL, 0.75),
    (RefinerMode.ENSEMBLE, 0.15),  # the refiner alone
    (RefinerMode.SEQUENTIAL, 0.15),  # a refiner strength capped at the edit's
]


@pytest.mark.parametrize("scheduler", ["euler", "euler_a"])
@pytest.mark.parametrize(("mode", "strength"), CASES)
def test_edit_matches_the_stock_img2img_recipe(
    tiny_engine: Engine, stock: dict, mode: RefinerMode, strength: float, scheduler: str
) -> None:
    params = edit_params(RenderKind.IMAGE_TO_IMAGE, mode, strength, scheduler)
    picture = noise_picture(3)
    prompt = "a red fox in the snow"
    expected = stock_recipe(
        tiny_engine,
        stock,
        params,
        prompt=prompt,
        picture=picture,
        mask=None,
        stages=recipe(RenderKind.IMAGE_TO_IMAGE, mode, strength),
    )
    got = ours(tiny_engine, params, prompt=prompt, picture=picture, mask=None)
    assert_same_pixels(got, expected)


@pytest.mark.parametrize("scheduler", ["euler", "euler_a"])
@pytest.mark.parametrize(("mode", "strength"), [*CASES, (RefinerMode.ENSEMBLE, 1.0)])
def test_inpainting_matches_the_stock_inpaint_recipe(
    tiny_engine: Engine, stock: dict, mode: RefinerMode, strength: float, scheduler: str
) -> None:
    """Inside the mask; outside it the service puts the picture's own pixels back."""
    params = edit_params(RenderKind.INPAINT, mode, strength, scheduler)
    picture = noise_picture(4)
    prompt = "a red fox in the snow"
    expected = stock_recipe(
        tiny_engine,
        stock,
        params,
        prompt=prompt,
        picture=picture,
        mask=LEFT_HALF,
        stages=recipe(RenderKind.INPAINT, mode, strength),
    )
    got = ours(tiny_engine, params, prompt=prompt, picture=picture, mask=LEFT_HALF)
    inside = np.frombuffer(LEFT_HALF, np.uint8).reshape(SIZE, SIZE) > 127
    assert_same_pixels([image[inside] for image in got], [image[inside] for image in expected])


def test_variation_matches_the_stock_img2img_recipe(tiny_engine: Engine, stock: dict) -> None:
    """A variation: an edit with no prompt at strength 0.6."""
    params = edit_params(RenderKind.IMAGE_TO_IMAGE, RefinerMode.ENSEMBLE, 0.6, "euler")
    picture = noise_picture(5)
    expected = stock_recipe(
        tiny_engine,
        stock,
        params,
        prompt="",
        picture=picture,
        mask=None,
        stages=recipe(RenderKind.IMAGE_TO_IMAGE, RefinerMode.ENSEMBLE, 0.6),
    )
    got = ours(tiny_engine, params, prompt="", picture=picture, mask=None)
    assert_same_pixels(got, expected)
