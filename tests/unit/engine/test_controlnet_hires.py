"""ControlNet with the hires fix gives, seed for seed, the pixels of stock diffusers run by
hand: `StableDiffusionXLControlNetPipeline` at the first size with the map fitted there, the
hires fix's upscale (Lanczos of the decoded picture, an upscaler model's 4x of it then
Lanczos, or bilinear latents), then
`StableDiffusionXLControlNetImg2ImgPipeline` at the final size with the final-size map, at
hires' denoising_strength over hires' steps, fresh generators of the same seeds; with the
refiner ensemble, diffusers' refiner after each pass. Pixel for pixel (CPU, float32).

Each picture is decoded one at a time with the base's VAE and diffusers' image processor (as
the engine decodes: a batch of two in one VAE call rounds otherwise).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetPipeline,
)
from PIL import Image

from sdxl_service.choices import HiresUpscaler, RefinerMode
from sdxl_service.contract.render_request import ControlNetParams, HiresParams, RenderParams
from sdxl_service.engine import Engine
from sdxl_service.engine.config import EngineConfig
from sdxl_service.engine.controlnets import stop_after
from sdxl_service.engine.render_batch import ImageTask, RenderBatch
from tests import upscaler_files
from tests.controlnet_files import save_controlnets
from tests.jobs import make_params

from .test_controlnet_parity import _flags, controlnet, scheduled

FIRST, FINAL = 64, 128
SEEDS = (7, 8)
STEPS, HIRES_STEPS, STRENGTH, FRAC = 5, 6, 0.5, 0.8
PROMPT = "a red fox in the snow"
UPSCALER_MODEL = "tiny-compact"
EDGES = ControlNetParams(name="edges", scale=0.9, start=0.1, end=0.9)
UNIT = {"controlnet_conditioning_scale": 0.9, "control_guidance_start": 0.1}
UNIT |= {"control_guidance_end": 0.9}


@pytest.fixture(scope="module")
def engine(
    tiny_settings_factory: Any, tmp_path_factory: pytest.TempPathFactory, tiny_pair: Any
) -> Iterator[Engine]:
    folder: Path = save_controlnets(tmp_path_factory.mktemp("controlnets"), tiny_pair[0])
    upscalers = tmp_path_factory.mktemp("upscalers")
    upscaler_files.compact(upscalers / f"{UPSCALER_MODEL}.safetensors", scale=4)
    settings = tiny_settings_factory(
        controlnet_dir=folder, upscaler_dir=upscalers, upscaler_tile=64
    )
    yield Engine.load(EngineConfig.of(settings))


def control_map(seed: int, side: int) -> bytes:
    """A blocky map (8 x 8 blocks, as an edge or depth map is) drawn at `side`: the same map
    at either pass's size, different for each seed."""
    blocks = np.random.default_rng(seed).integers(0, 256, (8, 8, 1), np.uint8)
    cell = side // 8
    return np.repeat(np.repeat(np.repeat(blocks, cell, 0), cell, 1), 3, 2).tobytes()


def hires_params(
    upscaler: HiresUpscaler, refiner: RefinerMode, model: str | None = None
) -> RenderParams:
    hires = HiresParams(
        first_width=FIRST,
        first_height=FIRST,
        scale=2.0,
        steps=HIRES_STEPS,
        denoising_strength=STRENGTH,
        upscaler=upscaler,
        upscaler_model=model,
    )
    return make_params(
        width=FINAL,
        height=FINAL,
        num_inference_steps=STEPS,
        high_noise_frac=FRAC,
        refiner=refiner,
        hires=hires,
        controlnets=(EDGES,),
    )


def hires_tasks() -> list[ImageTask]:
    return [
        ImageTask(
            prompt=PROMPT,
            seed=seed,
            control_images=(control_map(seed, FINAL),),
            first_pass_control_images=(control_map(seed, FIRST),),
        )
        for seed in SEEDS
    ]


def maps(side: int) -> list[Image.Image]:
    return [Image.frombytes("RGB", (side, side), control_map(seed, side)) for seed in SEEDS]


def decoded(pipeline: Any, latents: torch.Tensor) -> list[Image.Image]:
    vae = pipeline.vae
    return [
        pipeline.image_processor.postprocess(
            vae.decode(one / vae.config.scaling_factor, return_dict=False)[0], output_type="pil"
        )[0]
        for one in latents.split(1)
    ]


def refined(engine: Engine, p: RenderParams, latents: Any, steps: int, generators: Any) -> Any:
    refiner = engine.refiner
    stock = scheduled(engine, type(refiner)(**refiner.components, **_flags(refiner)), p, True)
    return stock(
        prompt=[PROMPT] * len(SEEDS),
        image=latents,
        denoising_start=FRAC,
        num_inference_steps=steps,
        guidance_scale=p.guidance_scale,
        generator=generators,
        output_type="latent",
    ).images


def stock_hires(engine: Engine, p: RenderParams) -> list[np.ndarray]:
    assert p.hires is not None
    upscaler, model = p.hires.upscaler, p.hires.upscaler_model
    ensemble = p.refiner == RefinerMode.ENSEMBLE
    components = {**engine.base.components, "controlnet": controlnet(engine, "edges")}
    common = {"prompt": [PROMPT] * len(SEEDS), "guidance_scale": p.guidance_scale}
    common |= {"output_type": "latent"}

    # 1. The first pass: ControlNet text-to-image at the first size, its map fitted there.
    t2i = scheduled(engine, StableDiffusionXLControlNetPipeline(**components), p)
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in SEEDS]
    latents = t2i(
        image=maps(FIRST),
        width=FIRST,
        height=FIRST,
        num_inference_steps=STEPS,
        denoising_end=FRAC if ensemble else None,
        generator=generators,
        **UNIT,
        **common,
    ).images
    if ensemble:
        latents = refined(engine, p, latents, STEPS, generators)

    # 2. The hires fix's upscale.
    image: Any
    if upscaler is HiresUpscaler.LATENT:
        side = FINAL // 8
        image = torch.nn.functional.interpolate(latents, size=(side, side), mode="bilinear")
    elif model is not None:
        # The model's own 4x (spandrel's, pinned in test_upscalers.py), then Lanczos.
        image = [
            engine.upscalers.upscale(model, picture, FINAL, FINAL)
            for picture in decoded(t2i, latents)
        ]
    else:
        image = [
            picture.resize((FINAL, FINAL), Image.Resampling.LANCZOS)
            for picture in decoded(t2i, latents)
        ]

    # 3. The second pass: ControlNet img2img at the final size with the final-size map.
    img2img = scheduled(engine, StableDiffusionXLControlNetImg2ImgPipeline(**components), p)
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in SEEDS]
    # Of the last int(6 * 0.5) = 3 steps of 6 (t = 333, 167, 1: "leading" spacing), the
    # base's are those at or above t = 200 (diffusers' plain img2img with denoising_end=0.8).
    callback = stop_after(1, lambda *a: a[-1]) if ensemble else None
    latents = img2img(
        image=image,
        strength=STRENGTH,
        control_image=maps(FINAL),
        num_inference_steps=HIRES_STEPS,
        generator=generators,
        callback_on_step_end=callback,
        **UNIT,
        **common,
    ).images
    if ensemble:
        latents = refined(engine, p, latents, HIRES_STEPS, generators)
    return [np.asarray(picture) for picture in decoded(img2img, latents)]


def ours(engine: Engine, p: RenderParams) -> list[np.ndarray]:
    images = engine.render(RenderBatch(params=p, tasks=hires_tasks()))
    return [np.asarray(image) for image in images]


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> int:
    return max(int(np.abs(x.astype(int) - y.astype(int)).max()) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    ("upscaler", "refiner", "model"),
    [
        (HiresUpscaler.LANCZOS, RefinerMode.NONE, None),
        (HiresUpscaler.LANCZOS, RefinerMode.ENSEMBLE, None),
        (HiresUpscaler.LATENT, RefinerMode.NONE, None),
        (HiresUpscaler.LANCZOS, RefinerMode.NONE, UPSCALER_MODEL),
    ],
)
def test_hires_controlnet_is_stock_controlnet_then_controlnet_img2img(
    engine: Engine, upscaler: HiresUpscaler, refiner: RefinerMode, model: str | None
) -> None:
    p = hires_params(upscaler, refiner, model)
    with torch.inference_mode():
        got = ours(engine, p)
        expected = stock_hires(engine, p)
    assert [image.shape for image in got] == [(FINAL, FINAL, 3)] * len(SEEDS)
    assert max_diff(got, expected) == 0


def test_each_pass_takes_its_own_map(engine: Engine) -> None:
    """The first pass's map and the second's both count: another map in either pass is
    another image (so neither pass runs without its unit, nor with the other's map)."""
    p = hires_params(HiresUpscaler.LANCZOS, RefinerMode.NONE)
    with torch.inference_mode():
        base = ours(engine, p)
        tasks = hires_tasks()
        other_first = [
            ImageTask(
                prompt=PROMPT,
                seed=task.seed,
                control_images=task.control_images,
                first_pass_control_images=(control_map(99, FIRST),),
            )
            for task in tasks
        ]
        other_second = [
            ImageTask(
                prompt=PROMPT,
                seed=task.seed,
                control_images=(control_map(99, FINAL),),
                first_pass_control_images=task.first_pass_control_images,
            )
            for task in tasks
        ]
        first_changed = engine.render(RenderBatch(params=p, tasks=other_first))
        second_changed = engine.render(RenderBatch(params=p, tasks=other_second))
    assert max_diff(base, [np.asarray(i) for i in first_changed]) > 8
    assert max_diff(base, [np.asarray(i) for i in second_changed]) > 8
