"""Inpainting checkpoints (a UNet of 9 input channels) render, seed for seed, what the stock
`StableDiffusionXLInpaintPipeline` renders over the same modules, as a folder and as a single
file; text-to-image is refused; the refiner takes over as from any base.

The tolerance is the other edit tests': 1 in 255 on the decoded pixels (test_edit_parity.py).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLInpaintPipeline
from PIL import Image
from safetensors.torch import load_file, save_file

from sdxl_service.choices import RefinerMode, RenderKind
from sdxl_service.contract.render_request import RenderParams
from sdxl_service.engine import Engine
from sdxl_service.engine.config import EngineConfig
from sdxl_service.engine.render_batch import ImageTask, InvalidModel, RenderBatch
from sdxl_service.engine.schedulers import make_scheduler
from tests.inpainting_models import write_inpainting_model
from tests.jobs import make_params

from .test_engine import LEFT_HALF, noise_picture, pixels

SIZE = 64
SEEDS = (7, 8)
HIGH_NOISE_FRAC = 0.8
FULL = bytes([255]) * SIZE * SIZE


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory, tiny_pair: tuple[Path, Path]) -> Path:
    folder = tmp_path_factory.mktemp("inpainting-models")
    write_inpainting_model(tiny_pair[0], folder / "inpaint", folder / "inpaint_file.safetensors")
    # Its header still says inpainting (9 channels in), but a UNet tensor is missing.
    state = load_file(folder / "inpaint_file.safetensors")
    state.pop(next(key for key in state if key.endswith("middle_block.1.proj_out.weight")))
    save_file(state, folder / "broken_inpaint.safetensors")
    return folder


@pytest.fixture(scope="module")
def engine(tiny_settings_factory, models_dir: Path) -> Engine:
    settings = tiny_settings_factory(models_dir=models_dir, model_cache=2)
    return Engine.load(EngineConfig.of(settings))


def edit_params(model: str, kind: RenderKind, mode: RefinerMode, strength: float) -> RenderParams:
    return make_params(
        model=model,
        kind=kind,
        num_inference_steps=10,
        high_noise_frac=HIGH_NOISE_FRAC,
        refiner=mode,
        strength=strength,
    )


def ours(engine: Engine, params: RenderParams, picture: bytes, mask: bytes | None) -> list[Any]:
    tasks = [
        ImageTask(prompt="a fox", negative_prompt="", seed=seed, init_image=picture, mask=mask)
        for seed in SEEDS
    ]
    return [pixels(image) for image in engine.render(RenderBatch(params=params, tasks=tasks))]


def stock(
    engine: Engine,
    params: RenderParams,
    picture: bytes,
    mask: bytes,
    refiner_stage: tuple[str, dict[str, Any]] | None,
) -> list[Any]:
    """diffusers' inpaint pipeline over the model's modules, then the refiner as asked:
    `inpaint` (the refiner's inpaint pipeline, with the mask) or `img2img`."""
    model = engine.models._resident[params.model]  # loaded by the engine's render
    base = StableDiffusionXLInpaintPipeline(**model.base.components)
    base.scheduler = make_scheduler(params.scheduler, model.scheduler_config)
    refiner = engine.refiner
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in SEEDS]
    n = len(SEEDS)
    masks = [Image.frombytes("L", (SIZE, SIZE), mask)] * n
    common: dict[str, Any] = {
        "prompt": ["a fox"] * n,
        "num_inference_steps": params.num_inference_steps,
        "guidance_scale": params.guidance_scale,
        "generator": generators,
        "output_type": "latent",
    }
    ensemble = params.refiner == RefinerMode.ENSEMBLE
    with torch.inference_mode():
        latents = base(
            image=[Image.frombytes("RGB", (SIZE, SIZE), picture)] * n,
            mask_image=masks,
            width=SIZE,
            height=SIZE,
            strength=params.strength,
            denoising_end=HIGH_NOISE_FRAC if ensemble else None,
            **common,
        ).images
        if refiner_stage is not None:
            name, arguments = refiner_stage
            if name == "inpaint":
                refiner = StableDiffusionXLInpaintPipeline(
                    **refiner.components,
                    requires_aesthetics_score=True,
                    force_zeros_for_empty_prompt=False,
                )
                arguments = {"mask_image": masks, "width": SIZE, "height": SIZE, **arguments}
            refiner.scheduler = make_scheduler(params.scheduler, engine._refiner_scheduler_config)
            latents = refiner(image=latents, **arguments, **common).images
    return [pixels(image) for image in engine.latent_codec.decode(latents)]


def assert_same_pixels(got: list[Any], expected: list[Any]) -> None:
    differences = [int(np.abs(a - b).max()) for a, b in zip(got, expected, strict=True)]
    assert max(differences) <= 1, f"max pixel differences per image: {differences}"
    assert np.abs(got[0] - got[1]).mean() > 1.0  # the seeds do give different images


def refiner_stage(mode: RefinerMode, name: str, strength: float) -> tuple[str, dict] | None:
    if mode is RefinerMode.NONE:
        return None
    if mode is RefinerMode.ENSEMBLE:
        return name, {"denoising_start": HIGH_NOISE_FRAC}
    return name, {"strength": min(strength, 1 - HIGH_NOISE_FRAC)}


MODELS = ["inpaint", "inpaint_file"]


@pytest.mark.parametrize("model", MODELS)
def test_an_inpainting_model_refuses_text_to_image(engine: Engine, model: str) -> None:
    batch = RenderBatch(params=make_params(model=model), tasks=[ImageTask(prompt="a", seed=1)])
    with pytest.raises(InvalidModel, match=f"model '{model}' is an inpainting model"):
        engine.render(batch)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(
    ("mode", "strength"),
    [
        (RefinerMode.NONE, 1.0),
        (RefinerMode.NONE, 0.75),
        (RefinerMode.ENSEMBLE, 1.0),
        (RefinerMode.ENSEMBLE, 0.75),
        (RefinerMode.SEQUENTIAL, 0.75),
    ],
)
def test_a_masked_edit_matches_the_stock_inpaint_pipeline(
    engine: Engine, model: str, mode: RefinerMode, strength: float
) -> None:
    params = edit_params(model, RenderKind.INPAINT, mode, strength)
    picture = noise_picture(4)
    got = ours(engine, params, picture, LEFT_HALF)
    expected = stock(engine, params, picture, LEFT_HALF, refiner_stage(mode, "inpaint", strength))
    assert_same_pixels(got, expected)


@pytest.mark.parametrize("mode", [RefinerMode.NONE, RefinerMode.ENSEMBLE])
def test_an_edit_without_a_mask_repaints_the_whole_picture_as_automatic1111(
    engine: Engine, mode: RefinerMode
) -> None:
    """img2img on an inpainting model: its inpaint path with everything masked, then the
    refiner's img2img as after any base."""
    params = edit_params("inpaint", RenderKind.IMAGE_TO_IMAGE, mode, 0.75)
    picture = noise_picture(5)
    got = ours(engine, params, picture, None)
    expected = stock(engine, params, picture, FULL, refiner_stage(mode, "img2img", 0.75))
    assert_same_pixels(got, expected)


def test_the_masked_picture_conditions_the_unet(engine: Engine) -> None:
    """Another picture under the same mask and seeds gives another image: the 9-channel UNet
    reads the masked picture (a 4-channel one would only keep it outside the mask)."""
    params = edit_params("inpaint", RenderKind.INPAINT, RefinerMode.NONE, 1.0)
    black, white = bytes(SIZE * SIZE * 3), bytes([255]) * SIZE * SIZE * 3
    first = ours(engine, params, black, LEFT_HALF)
    second = ours(engine, params, white, LEFT_HALF)
    inside = np.frombuffer(LEFT_HALF, np.uint8).reshape(SIZE, SIZE) > 127
    assert np.abs(first[0][inside] - second[0][inside]).mean() > 1.0


def test_the_single_file_renders_the_pixels_of_the_folder(engine: Engine) -> None:
    picture = noise_picture(4)
    folder, file = (
        ours(
            engine,
            edit_params(model, RenderKind.INPAINT, RefinerMode.ENSEMBLE, 0.75),
            picture,
            LEFT_HALF,
        )
        for model in MODELS
    )
    # Equal weights at other offsets in memory may round one level apart (test_single_file.py).
    assert max(int(np.abs(a - b).max()) for a, b in zip(folder, file, strict=True)) <= 1


@pytest.mark.parametrize("source", ["inpaint", "inpaint_file.safetensors"])
def test_an_inpainting_default_model_edits_refuses_text_and_warms_up(
    engine: Engine,
    tiny_settings_factory,
    models_dir: Path,
    tiny_pair: tuple[Path, Path],
    source: str,
) -> None:
    """SDXL_BASE_MODEL an inpainting folder or file: described so, its warm-up an inpaint."""
    assert engine.describe()["kind"] == "text_to_image"
    settings = tiny_settings_factory(
        preset="sdxl",
        base_model=str(models_dir / source),
        refiner_model=str(tiny_pair[1]),
        warmup="on",
    )
    default = Engine.load(EngineConfig.of(settings))
    assert default.describe()["kind"] == "inpainting"
    assert default.warmup()
    with pytest.raises(InvalidModel, match="this server's default model is an inpainting model"):
        default.render(RenderBatch(params=make_params(), tasks=[ImageTask(prompt="a", seed=1)]))
    params = edit_params("inpaint", RenderKind.INPAINT, RefinerMode.ENSEMBLE, 0.75)
    picture = noise_picture(4)
    as_default = ours(default, params.model_copy(update={"model": None}), picture, LEFT_HALF)
    as_model = ours(engine, params, picture, LEFT_HALF)
    assert max(int(np.abs(a - b).max()) for a, b in zip(as_default, as_model, strict=True)) <= 1


def test_an_outpainting_canvas_renders_as_the_stock_inpaint_pipeline(engine: Engine) -> None:
    """The canvas and mask api/outpainting.py makes (a 64x64 picture widened to 96x64, its
    border filled) through the inpainting model at strength 0.8, where the fill matters."""
    from sdxl_service.api.outpainting import Canvas, extend

    picture = Image.frombytes("RGB", (SIZE, SIZE), noise_picture(4))
    canvas, mask = extend(picture, None, Canvas(96, 64, 32, 0))
    params = make_params(
        model="inpaint",
        kind=RenderKind.INPAINT,
        width=96,
        height=64,
        num_inference_steps=10,
        refiner=RefinerMode.NONE,
        strength=0.8,
    )
    task = ImageTask(prompt="a fox", seed=7, init_image=canvas.tobytes(), mask=mask.tobytes())
    got = pixels(engine.render(RenderBatch(params=params, tasks=[task]))[0])
    model = engine.models._resident["inpaint"]
    stock_pipeline = StableDiffusionXLInpaintPipeline(**model.base.components)
    stock_pipeline.scheduler = make_scheduler(params.scheduler, model.scheduler_config)
    with torch.inference_mode():
        latents = stock_pipeline(
            prompt="a fox",
            image=canvas,
            mask_image=mask,
            width=96,
            height=64,
            strength=0.8,
            num_inference_steps=10,
            guidance_scale=params.guidance_scale,
            generator=torch.Generator("cpu").manual_seed(7),
            output_type="latent",
        ).images
    expected = pixels(engine.latent_codec.decode(latents)[0])
    assert got.shape == expected.shape == (64, 96, 3)
    assert int(np.abs(got - expected).max()) <= 1


def test_mask_blur_and_only_masked_render_as_the_stock_padding_mask_crop(engine: Engine) -> None:
    """A1111's "Only masked" with a blurred mask on an inpainting model: the request rules'
    crop, the engine's render and the answer's paste-back equal the stock pipeline's
    `padding_mask_crop` call (one picture per call, so one per seed)."""
    from sdxl_service.api.request_kinds import EDIT
    from sdxl_service.api.responses import encode_rendered
    from sdxl_service.api.schemas import ImageEditRequest
    from sdxl_service.api.uploads import EditSource
    from sdxl_service.contract.render_request import RenderedImage
    from sdxl_service.engine.render_batch import image_tasks
    from sdxl_service.settings import Settings

    picture = Image.frombytes("RGB", (96, 64), noise_picture(5, 96, 64))
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (60, 36, 80, 52))
    req = ImageEditRequest(
        prompt="a fox", n=2, seed=SEEDS[0], mask_blur=3, inpaint_area="only_masked"
    )
    settings = Settings(refiner="none", steps=10, image_metadata=False)
    resolved = EDIT.resolve(req, EditSource(picture, mask), settings, SIZE)
    params = resolved.job.params.model_copy(update={"model": "inpaint"})
    rendered = engine.render(RenderBatch(params=params, tasks=image_tasks(resolved.job)))
    got = []
    for seed, image in zip(SEEDS, rendered, strict=True):
        wire = RenderedImage(seed=seed, width=96, height=64, rgb=image.tobytes())
        got.append(pixels(Image.open(io.BytesIO(encode_rendered(wire, resolved)))))
    model = engine.models._resident["inpaint"]
    stock_pipeline = StableDiffusionXLInpaintPipeline(**model.base.components)
    stock_pipeline.scheduler = make_scheduler(params.scheduler, model.scheduler_config)
    blurred = stock_pipeline.mask_processor.blur(mask, blur_factor=3)
    expected = []
    with torch.inference_mode():
        for seed in SEEDS:
            expected += stock_pipeline(
                prompt="a fox",
                image=picture,
                mask_image=blurred,
                width=96,
                height=64,
                strength=1.0,
                num_inference_steps=10,
                guidance_scale=params.guidance_scale,
                generator=torch.Generator("cpu").manual_seed(seed),
                padding_mask_crop=32,
            ).images
    assert_same_pixels(got, [pixels(image) for image in expected])


def test_the_header_says_inpainting_and_the_packaged_config_matches_sdxl_inpainting(
    models_dir: Path,
) -> None:
    import json

    from sdxl_service.engine.checkpoint_layout import (
        SDXL_CONFIGS,
        read_checkpoint_layout,
        sdxl_architecture,
        signature,
    )

    layout = read_checkpoint_layout(
        models_dir / "inpaint_file.safetensors", "SDXL_BASE_MODEL", kind="base"
    )
    assert (layout.kind, layout.architecture, layout.inpainting) == ("base", "tiny", True)
    # diffusers/stable-diffusion-xl-1.0-inpainting-0.1: the base's UNet, 9 channels in.
    base = json.loads((SDXL_CONFIGS / "base" / "unet" / "config.json").read_text())
    inpaint = json.loads((SDXL_CONFIGS / "inpaint" / "unet" / "config.json").read_text())
    assert inpaint == base | {"in_channels": 9}
    shapes = signature(sdxl_architecture(), "base", inpainting=True)
    assert shapes["model.diffusion_model.input_blocks.0.0.weight"] == (320, 9, 3, 3)


def test_a_broken_inpainting_file_is_refused_and_nothing_of_it_stays(engine: Engine) -> None:
    params = edit_params("broken_inpaint", RenderKind.INPAINT, RefinerMode.NONE, 0.75)
    resident = engine.models.resident()
    with pytest.raises(InvalidModel, match="model 'broken_inpaint'") as refused:
        ours(engine, params, noise_picture(3), LEFT_HALF)
    assert "/" not in str(refused.value)  # no server paths for the client
    assert "broken_inpaint" not in engine.models.resident()
    assert set(engine.models.resident()) <= set(resident)
    # The good inpainting model still renders after it.
    ok = edit_params("inpaint", RenderKind.INPAINT, RefinerMode.NONE, 0.75)
    assert len(ours(engine, ok, noise_picture(3), LEFT_HALF)) == len(SEEDS)
