"""An upscale through an upscaler model with ControlNet units (AUTOMATIC1111's "upscale with
ControlNet tile" recipe) gives, seed for seed, the latents of the stock recipe by hand.

The stock recipe: the picture through spandrel's model in the tiles engine/upscalers.py cuts
(`upscale_tensor`), Lanczos to the render size, then diffusers' ControlNet img2img pipeline
(a plain ControlNet, and a Union model in its "tile" mode) at strength = denoising_strength
with the picture itself, fitted to the render size, as the control image; the refiner's
ensemble as the other ControlNet img2img parity tests run it. CPU, float32, exact.
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
    StableDiffusionXLControlNetUnionImg2ImgPipeline,
)
from PIL import Image

from sdxl_service.api.control_maps import fit_crop_and_resize
from sdxl_service.choices import RefinerMode, RenderKind
from sdxl_service.contract.render_request import ControlNetParams, RenderParams, UpscaleParams
from sdxl_service.engine import Engine
from sdxl_service.engine.config import EngineConfig
from sdxl_service.engine.controlnets import stop_after
from sdxl_service.engine.render_batch import ImageTask
from sdxl_service.engine.upscalers import (
    picture_tensor,
    spandrel_module,
    tensor_picture,
    upscale_tensor,
)
from tests import upscaler_files
from tests.controlnet_files import save_controlnets
from tests.jobs import make_params

from .test_controlnet_parity import FRAC, PROMPT, SEEDS, ours_latents, refined, scheduled

# 72x64 through a 2x model is 144x128; the upscale's size (scale 2.25, to multiples of 8) is
# 160x144, so Lanczos has work to do. Tiles of 64 px: the source is two of them.
SOURCE = (72, 64)
SIZE = (160, 144)
TILE = 64
STRENGTH = 0.75
TILE_MODE = 6  # xinsir's ControlNet Union ProMax: "tile"


@pytest.fixture(scope="module")
def upscaler_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("upscalers")
    upscaler_files.esrgan(folder / "tiny-esrgan.safetensors", scale=2)
    return folder


@pytest.fixture(scope="module")
def engine(
    tiny_settings_factory: Any,
    tiny_pair: tuple[Path, Path],
    upscaler_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Engine]:
    controlnet_dir = save_controlnets(tmp_path_factory.mktemp("controlnets"), tiny_pair[0])
    settings = tiny_settings_factory(
        controlnet_dir=controlnet_dir, upscaler_dir=upscaler_dir, upscaler_tile=TILE
    )
    yield Engine.load(EngineConfig.of(settings))


def source() -> Image.Image:
    rng = np.random.default_rng(11)
    blocks = rng.integers(0, 256, (SOURCE[1] // 8, SOURCE[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(np.repeat(np.repeat(blocks, 8, 0), 8, 1), "RGB")


def tile_map() -> bytes:
    """The picture being upscaled as the unit's map, fitted to the render size as the HTTP
    process fits every unit's image (api/control_maps.py)."""
    return fit_crop_and_resize(source(), *SIZE).tobytes()


def upscale_params(
    refiner: RefinerMode, unit: ControlNetParams, strength: float = STRENGTH
) -> RenderParams:
    return make_params(
        kind=RenderKind.IMAGE_TO_IMAGE,
        width=SIZE[0],
        height=SIZE[1],
        num_inference_steps=10,
        high_noise_frac=FRAC,
        refiner=refiner,
        strength=strength,
        upscale=UpscaleParams(
            upscaler="tiny-esrgan", source_width=SOURCE[0], source_height=SOURCE[1]
        ),
        controlnets=(unit,),
    )


def tasks() -> list[ImageTask]:
    data = source().tobytes()
    return [
        ImageTask(prompt=PROMPT, seed=seed, init_image=data, control_images=(tile_map(),))
        for seed in SEEDS
    ]


def stock_upscaled(upscaler_dir: Path) -> Image.Image:
    """spandrel's model over the picture in engine/upscalers.py's tiles, then Lanczos."""
    spandrel = spandrel_module()
    model = spandrel.ModelLoader("cpu").load_from_file(upscaler_dir / "tiny-esrgan.safetensors")
    model.eval()
    tensor = upscale_tensor(model, picture_tensor(source(), "cpu", torch.float32), TILE)
    return tensor_picture(tensor).resize(SIZE, Image.Resampling.LANCZOS)


def stock_recipe(
    engine: Engine, upscaler_dir: Path, p: RenderParams, pipeline_class: type, **control: Any
) -> torch.Tensor:
    unit = p.controlnets[0]
    net = engine.controlnets.models([unit.name], engine.base.unet)[0].model
    stock = scheduled(engine, pipeline_class(**engine.base.components, controlnet=net), p)
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in SEEDS]
    ensemble = p.refiner is RefinerMode.ENSEMBLE
    # Of the last int(10 * 0.75) = 7 steps, the 5 at or above t = 200 (the base's share).
    callback = stop_after(5, lambda *a: a[-1]) if ensemble else None
    latents = stock(
        prompt=[PROMPT] * len(SEEDS),
        image=[stock_upscaled(upscaler_dir)] * len(SEEDS),
        strength=STRENGTH,
        num_inference_steps=p.num_inference_steps,
        guidance_scale=p.guidance_scale,
        generator=generators,
        output_type="latent",
        controlnet_conditioning_scale=unit.scale,
        control_guidance_start=unit.start,
        control_guidance_end=unit.end,
        callback_on_step_end=callback,
        **control,
    ).images
    if ensemble:
        latents = refined(engine, p, latents, generators)
    return latents


@pytest.mark.parametrize("refiner", [RefinerMode.NONE, RefinerMode.ENSEMBLE])
def test_upscaler_then_controlnet_img2img_is_the_stock_recipe(
    engine: Engine, upscaler_dir: Path, refiner: RefinerMode
) -> None:
    p = upscale_params(refiner, ControlNetParams(name="edges", scale=0.9, start=0.0, end=0.9))
    with torch.inference_mode():
        ours = ours_latents(engine, p, tasks())
        control = Image.frombytes("RGB", SIZE, tile_map())
        stock = stock_recipe(
            engine,
            upscaler_dir,
            p,
            StableDiffusionXLControlNetImg2ImgPipeline,
            control_image=[control] * len(SEEDS),
        )
    assert ours.shape == (len(SEEDS), 4, SIZE[1] // 8, SIZE[0] // 8)
    assert torch.equal(ours, stock)


def test_union_tile_mode_is_the_stock_union_img2img_recipe(
    engine: Engine, upscaler_dir: Path
) -> None:
    p = upscale_params(RefinerMode.NONE, ControlNetParams(name="union", mode=TILE_MODE))
    with torch.inference_mode():
        ours = ours_latents(engine, p, tasks())
        pipeline = StableDiffusionXLControlNetUnionImg2ImgPipeline
        net = engine.controlnets.models(["union"], engine.base.unet)[0].model
        processor = pipeline(**engine.base.components, controlnet=net).control_image_processor
        control = processor.preprocess(
            [Image.frombytes("RGB", SIZE, tile_map())] * len(SEEDS),
            height=SIZE[1],
            width=SIZE[0],
        )
        stock = stock_recipe(
            engine,
            upscaler_dir,
            p,
            pipeline,
            control_image=[control],
            control_mode=[TILE_MODE],
        )
    assert torch.equal(ours, stock)


def test_the_units_change_the_upscale(engine: Engine) -> None:
    """The units steer the denoise: without them (the same upscale and seeds) it differs."""
    p = upscale_params(RefinerMode.NONE, ControlNetParams(name="edges"))
    bare = p.model_copy(update={"controlnets": ()})
    plain = [ImageTask(prompt=PROMPT, seed=seed, init_image=source().tobytes()) for seed in SEEDS]
    with torch.inference_mode():
        steered = ours_latents(engine, p, tasks())
        unsteered = ours_latents(engine, bare, plain)
    assert not torch.equal(steered, unsteered)


def test_strength_0_with_units_is_no_render() -> None:
    """The upscaler model's picture alone runs no denoising pass for a unit to steer."""
    with pytest.raises(ValueError, match="strength 0 runs none"):
        upscale_params(RefinerMode.NONE, ControlNetParams(name="edges"), strength=0.0)
