"""ControlNet renders give, seed for seed, the latents stock diffusers' ControlNet pipelines give.

The ControlNets are made from the tiny base's UNet (`ControlNetModel.from_unet`,
`ControlNetUnionModel.from_unet`) with their zero convolutions given random weights (at zero
they would add nothing, and a test of them could not fail), saved as a diffusers folder and as
single .safetensors files into the engine's SDXL_CONTROLNET_DIR. The stock recipes run
diffusers' pipeline classes over the engine's modules with the same seeds; the comparison is
of the final latents, exactly (CPU, float32).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetUnionModel,
    MultiControlNetModel,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLControlNetUnionInpaintPipeline,
    StableDiffusionXLControlNetUnionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
)
from diffusers.models.controlnets.multicontrolnet_union import MultiControlNetUnionModel
from PIL import Image
from prometheus_client import CollectorRegistry

from sdxl_service.choices import RefinerMode, RenderKind
from sdxl_service.contract.render_request import ControlNetParams, RenderParams
from sdxl_service.engine import Engine
from sdxl_service.engine.config import EngineConfig
from sdxl_service.engine.controlnets import stop_after
from sdxl_service.engine.render_batch import ImageTask, InvalidControlNet, RenderBatch
from sdxl_service.engine.schedulers import make_scheduler
from sdxl_service.metrics import ServiceMetrics
from tests.controlnet_files import save_controlnets
from tests.jobs import make_params

from .test_engine import LEFT_HALF, noise_picture

SIZE = 64
SEEDS = (7, 8)
FRAC = 0.8
PROMPT = "a red fox in the snow"


@pytest.fixture(scope="module")
def controlnet_dir(tmp_path_factory: pytest.TempPathFactory, tiny_pair: tuple[Path, Path]) -> Path:
    return save_controlnets(tmp_path_factory.mktemp("controlnets"), tiny_pair[0])


@pytest.fixture(scope="module")
def engine(tiny_settings_factory: Any, controlnet_dir: Path) -> Iterator[Engine]:
    settings = tiny_settings_factory(controlnet_dir=controlnet_dir)
    yield Engine.load(EngineConfig.of(settings))


def control_picture(seed: int) -> bytes:
    """A blocky picture (as an edge or depth map is), different for each seed."""
    blocks = np.random.default_rng(seed).integers(0, 256, (8, 8, 1), np.uint8)
    return np.repeat(np.repeat(np.repeat(blocks, 8, 0), 8, 1), 3, 2).tobytes()


def rgb(data: bytes) -> Image.Image:
    return Image.frombytes("RGB", (SIZE, SIZE), data)


def params(kind: RenderKind, refiner: RefinerMode, *units: ControlNetParams) -> RenderParams:
    strength = 1.0 if kind is RenderKind.TEXT_TO_IMAGE else 0.75
    return make_params(
        kind=kind,
        width=SIZE,
        height=SIZE,
        num_inference_steps=10,
        high_noise_frac=FRAC,
        refiner=refiner,
        strength=strength,
        controlnets=units,
    )


def ours_latents(engine: Engine, p: RenderParams, tasks: list[ImageTask]) -> torch.Tensor:
    """The engine's final latents for `tasks` (what it decodes)."""
    captured: list[torch.Tensor] = []
    decode = engine.latent_codec.decode

    def keep(latents: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        captured.append(latents.clone())
        return decode(latents, *args, **kwargs)

    engine.latent_codec.decode = keep  # type: ignore[method-assign]
    try:
        engine.render(RenderBatch(params=p, tasks=tasks))
    finally:
        del engine.latent_codec.decode
    return captured[0]


def tasks(p: RenderParams, *, mask: bytes | None = None) -> list[ImageTask]:
    edit = p.kind is not RenderKind.TEXT_TO_IMAGE
    return [
        ImageTask(
            prompt=PROMPT,
            seed=seed,
            init_image=noise_picture(0) if edit else None,
            mask=mask,
            control_images=tuple(control_picture(seed * 10 + i) for i in range(len(p.controlnets))),
        )
        for seed in SEEDS
    ]


def controlnet(engine: Engine, name: str) -> Any:
    return engine.controlnets.models([name], engine.base.unet)[0].model


def scheduled(engine: Engine, pipeline: Any, p: RenderParams, refiner: bool = False) -> Any:
    config = engine._refiner_scheduler_config if refiner else engine._base_scheduler_config
    pipeline.scheduler = make_scheduler(p.scheduler, config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def common(p: RenderParams) -> dict[str, Any]:
    return {
        "prompt": [PROMPT] * len(SEEDS),
        "num_inference_steps": p.num_inference_steps,
        "guidance_scale": p.guidance_scale,
        "generator": [torch.Generator("cpu").manual_seed(seed) for seed in SEEDS],
        "output_type": "latent",
    }


def refined(engine: Engine, p: RenderParams, latents: Any, generators: Any, **extra: Any) -> Any:
    """diffusers' refiner from the base's latents, at denoising_start (the ensemble)."""
    refiner = engine.refiner
    kind = StableDiffusionXLInpaintPipeline if "mask_image" in extra else type(refiner)
    stock = scheduled(engine, kind(**refiner.components, **_flags(refiner)), p, refiner=True)
    arguments = {**common(p), "generator": generators}
    return stock(image=latents, denoising_start=FRAC, **arguments, **extra).images


def _flags(pipeline: Any) -> dict[str, Any]:
    return {
        "requires_aesthetics_score": pipeline.config.get("requires_aesthetics_score", False),
        "force_zeros_for_empty_prompt": pipeline.config.force_zeros_for_empty_prompt,
    }


EDGES = ControlNetParams(name="edges", scale=0.9, start=0.1, end=0.9)


@pytest.mark.parametrize("refiner", [RefinerMode.NONE, RefinerMode.ENSEMBLE])
def test_text_to_image_is_stock_controlnet_pipeline(engine: Engine, refiner: RefinerMode) -> None:
    p = params(RenderKind.TEXT_TO_IMAGE, refiner, EDGES)
    batch = tasks(p)
    with torch.inference_mode():
        ours = ours_latents(engine, p, batch)
        stock = scheduled(
            engine,
            StableDiffusionXLControlNetPipeline(
                **engine.base.components, controlnet=controlnet(engine, "edges")
            ),
            p,
        )
        arguments = common(p)
        latents = stock(
            image=[rgb(task.control_images[0]) for task in batch],
            controlnet_conditioning_scale=0.9,
            control_guidance_start=0.1,
            control_guidance_end=0.9,
            width=SIZE,
            height=SIZE,
            denoising_end=FRAC if refiner is RefinerMode.ENSEMBLE else None,
            **arguments,
        ).images
        if refiner is RefinerMode.ENSEMBLE:
            latents = refined(engine, p, latents, arguments["generator"])
    assert torch.equal(ours, latents)


def test_control_changes_the_image_and_each_image_has_its_own(engine: Engine) -> None:
    p = params(RenderKind.TEXT_TO_IMAGE, RefinerMode.NONE, EDGES)
    with torch.inference_mode():
        controlled = ours_latents(engine, p, tasks(p))
        plain = ours_latents(
            engine,
            p.model_copy(update={"controlnets": ()}),
            [ImageTask(prompt=PROMPT, seed=seed) for seed in SEEDS],
        )
        alone = ours_latents(engine, p, tasks(p)[1:])
    assert (controlled - plain).abs().max() > 1.0
    # Each image's own control image counts: the first image with the second's control image
    # is another image.
    swapped = ours_latents(
        engine, p, [replace(tasks(p)[0], control_images=tasks(p)[1].control_images)]
    )
    assert (swapped - controlled[:1]).abs().max() > 1.0
    # The second image of the batch is the image its request renders alone (up to the float
    # rounding a batch of two in one call makes).
    assert torch.allclose(controlled[1:], alone, atol=1e-4)


def test_img2img_ensemble_stops_where_plain_img2img_denoising_end_does(engine: Engine) -> None:
    """The ControlNet img2img pipeline has no denoising_end: at scale 0 (it adds nothing) the
    interrupted loop gives exactly plain img2img's latents with denoising_end."""
    p = params(RenderKind.IMAGE_TO_IMAGE, RefinerMode.ENSEMBLE, EDGES)
    batch = tasks(p)
    picture = [rgb(noise_picture(0))] * len(SEEDS)
    with torch.inference_mode():
        stock = scheduled(engine, StableDiffusionXLImg2ImgPipeline(**engine.base.components), p)
        plain = stock(image=picture, strength=0.75, denoising_end=FRAC, **common(p)).images
        zero = p.model_copy(
            update={"controlnets": (EDGES.model_copy(update={"scale": 0.0}),), "refiner": "none"}
        )
        pipeline, call = engine.controlnets.stage(
            stock,
            zero,
            batch,
            {"denoising_end": FRAC, "callback_on_step_end": lambda *a: a[-1]},
            engine._base_scheduler_config,
        )
        cut = scheduled(engine, pipeline, p)(
            image=picture, strength=0.75, **common(p), **call
        ).images
    assert torch.equal(cut, plain)


@pytest.mark.parametrize("refiner", [RefinerMode.NONE, RefinerMode.ENSEMBLE])
def test_img2img_is_stock_controlnet_img2img(engine: Engine, refiner: RefinerMode) -> None:
    p = params(RenderKind.IMAGE_TO_IMAGE, refiner, EDGES)
    batch = tasks(p)
    with torch.inference_mode():
        ours = ours_latents(engine, p, batch)
        stock = scheduled(
            engine,
            StableDiffusionXLControlNetImg2ImgPipeline(
                **engine.base.components, controlnet=controlnet(engine, "edges")
            ),
            p,
        )
        arguments = common(p)
        steps = 5  # of the last int(10 * 0.75) = 7 steps, those at or above t = 200
        callback = stop_after(steps, lambda *a: a[-1]) if refiner is RefinerMode.ENSEMBLE else None
        latents = stock(
            image=[rgb(noise_picture(0))] * len(SEEDS),
            strength=0.75,
            control_image=[rgb(task.control_images[0]) for task in batch],
            controlnet_conditioning_scale=0.9,
            control_guidance_start=0.1,
            control_guidance_end=0.9,
            callback_on_step_end=callback,
            **arguments,
        ).images
        if refiner is RefinerMode.ENSEMBLE:
            latents = refined(engine, p, latents, arguments["generator"])
    assert torch.equal(ours, latents)


@pytest.mark.parametrize("refiner", [RefinerMode.NONE, RefinerMode.ENSEMBLE])
def test_inpaint_is_stock_controlnet_inpaint(engine: Engine, refiner: RefinerMode) -> None:
    p = params(RenderKind.INPAINT, refiner, EDGES)
    batch = tasks(p, mask=LEFT_HALF)
    mask = [Image.frombytes("L", (SIZE, SIZE), LEFT_HALF)] * len(SEEDS)
    size = {"width": SIZE, "height": SIZE}
    with torch.inference_mode():
        ours = ours_latents(engine, p, batch)
        stock = scheduled(
            engine,
            StableDiffusionXLControlNetInpaintPipeline(
                **engine.base.components, controlnet=controlnet(engine, "edges")
            ),
            p,
        )
        arguments = common(p)
        latents = stock(
            image=[rgb(noise_picture(0))] * len(SEEDS),
            mask_image=mask,
            strength=0.75,
            control_image=[rgb(task.control_images[0]) for task in batch],
            controlnet_conditioning_scale=0.9,
            control_guidance_start=0.1,
            control_guidance_end=0.9,
            denoising_end=FRAC if refiner is RefinerMode.ENSEMBLE else None,
            **size,
            **arguments,
        ).images
        if refiner is RefinerMode.ENSEMBLE:
            latents = refined(engine, p, latents, arguments["generator"], mask_image=mask, **size)
    assert torch.equal(ours, latents)


def test_two_units_are_stock_multi_controlnet(engine: Engine) -> None:
    """A folder and a single file together: diffusers' MultiControlNetModel (one image: stock
    takes one control image per unit for the whole batch)."""
    depth = ControlNetParams(name="depth", scale=0.5, start=0.0, end=1.0)
    p = params(RenderKind.TEXT_TO_IMAGE, RefinerMode.NONE, EDGES, depth)
    batch = tasks(p)[:1]
    with torch.inference_mode():
        ours = ours_latents(engine, p, batch)
        multi = MultiControlNetModel([controlnet(engine, "edges"), controlnet(engine, "depth")])
        stock = scheduled(
            engine,
            StableDiffusionXLControlNetPipeline(**engine.base.components, controlnet=multi),
            p,
        )
        arguments = {**common(p), "prompt": [PROMPT], "generator": arguments_generator(SEEDS[0])}
        latents = stock(
            image=[rgb(image) for image in batch[0].control_images],
            controlnet_conditioning_scale=[0.9, 0.5],
            control_guidance_start=[0.1, 0.0],
            control_guidance_end=[0.9, 1.0],
            width=SIZE,
            height=SIZE,
            **arguments,
        ).images
    assert torch.equal(ours, latents)


def arguments_generator(seed: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed)]


def test_union_single_file_is_stock_union_pipeline(engine: Engine) -> None:
    unit = ControlNetParams(name="union", scale=1.0, mode=3)
    p = params(RenderKind.TEXT_TO_IMAGE, RefinerMode.NONE, unit)
    batch = tasks(p)
    with torch.inference_mode():
        ours = ours_latents(engine, p, batch)
        stock = scheduled(
            engine,
            StableDiffusionXLControlNetUnionPipeline(
                **engine.base.components, controlnet=controlnet(engine, "union")
            ),
            p,
        )
        assert isinstance(stock.controlnet, ControlNetUnionModel)
        pictures = [rgb(task.control_images[0]) for task in batch]
        control = stock.control_image_processor.preprocess(pictures, height=SIZE, width=SIZE)
        latents = stock(
            control_image=[control], control_mode=[3], width=SIZE, height=SIZE, **common(p)
        ).images
    assert torch.equal(ours, latents)


def test_a_controlnet_that_does_not_load_leaves_nothing_behind(engine: Engine) -> None:
    p = params(RenderKind.TEXT_TO_IMAGE, RefinerMode.NONE, ControlNetParams(name="broken"))
    before = engine.controlnets.loaded()
    with pytest.raises(InvalidControlNet, match="broken"):
        engine.render(RenderBatch(params=p, tasks=tasks(p)))
    assert engine.controlnets.loaded() == before


def test_least_recently_used_controlnet_is_unloaded_past_the_cache(
    tiny_settings_factory: Any, controlnet_dir: Path
) -> None:
    settings = tiny_settings_factory(
        controlnet_dir=controlnet_dir, control_cache=1, max_controlnets=1
    )
    registry = CollectorRegistry()
    small = Engine.load(EngineConfig.of(settings), metrics=ServiceMetrics(registry))
    for name in ("edges", "depth", "depth"):
        p = params(RenderKind.TEXT_TO_IMAGE, RefinerMode.NONE, ControlNetParams(name=name))
        one_step = p.model_copy(update={"num_inference_steps": 1})
        small.render(RenderBatch(params=one_step, tasks=tasks(p)[:1]))
        assert small.controlnets.loaded() == [name]
    with pytest.raises(InvalidControlNet):
        small.render(
            RenderBatch(
                params=params(
                    RenderKind.TEXT_TO_IMAGE, RefinerMode.NONE, ControlNetParams(name="broken")
                ),
                tasks=tasks(p)[:1],
            )
        )
    assert small.controlnets.loaded() == ["depth"]

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert sample("sdxl_controlnet_loads_total", outcome="ok") == 2
    assert sample("sdxl_controlnet_loads_total", outcome="failed") == 1
    assert sample("sdxl_controlnets_resident", worker="1") == 1
    assert small.describe()["controlnets_loaded"] == ["depth"]


def test_two_units_of_one_union_model_are_stock_multi_union(engine: Engine) -> None:
    """One Union model twice (a depth map and a canny map): MultiControlNetUnionModel."""
    units = (
        ControlNetParams(name="union", scale=0.8, mode=1),
        ControlNetParams(name="union", scale=0.6, start=0.2, mode=3),
    )
    p = params(RenderKind.TEXT_TO_IMAGE, RefinerMode.ENSEMBLE, *units)
    batch = tasks(p)
    with torch.inference_mode():
        ours = ours_latents(engine, p, batch)
        union = controlnet(engine, "union")
        stock = scheduled(
            engine,
            StableDiffusionXLControlNetUnionPipeline(
                **engine.base.components, controlnet=MultiControlNetUnionModel([union, union])
            ),
            p,
        )
        controls = [
            stock.control_image_processor.preprocess(
                [rgb(task.control_images[index]) for task in batch], height=SIZE, width=SIZE
            )
            for index in range(2)
        ]
        arguments = common(p)
        latents = stock(
            control_image=controls,
            control_mode=[1, 3],
            controlnet_conditioning_scale=[0.8, 0.6],
            control_guidance_start=[0.0, 0.2],
            control_guidance_end=[1.0, 1.0],
            width=SIZE,
            height=SIZE,
            denoising_end=FRAC,
            **arguments,
        ).images
        latents = refined(engine, p, latents, arguments["generator"])
    assert torch.equal(ours, latents)


def test_union_inpaint_is_stock_union_inpaint(engine: Engine) -> None:
    p = params(RenderKind.INPAINT, RefinerMode.NONE, ControlNetParams(name="union", mode=7))
    batch = tasks(p, mask=LEFT_HALF)
    with torch.inference_mode():
        ours = ours_latents(engine, p, batch)
        stock = scheduled(
            engine,
            StableDiffusionXLControlNetUnionInpaintPipeline(
                **engine.base.components, controlnet=controlnet(engine, "union")
            ),
            p,
        )
        pictures = [rgb(task.control_images[0]) for task in batch]
        control = stock.control_image_processor.preprocess(pictures, height=SIZE, width=SIZE)
        latents = stock(
            image=[rgb(noise_picture(0))] * len(SEEDS),
            mask_image=[Image.frombytes("L", (SIZE, SIZE), LEFT_HALF)] * len(SEEDS),
            strength=0.75,
            control_image=[control],
            control_mode=[7],
            width=SIZE,
            height=SIZE,
            **common(p),
        ).images
    assert torch.equal(ours, latents)


@pytest.mark.parametrize("kind", [RenderKind.TEXT_TO_IMAGE, RenderKind.IMAGE_TO_IMAGE])
def test_steps_and_previews_count_as_without_a_controlnet(engine: Engine, kind: RenderKind) -> None:
    """The interrupted img2img loop reports no step it skips; previews come as asked."""
    p = params(kind, RefinerMode.ENSEMBLE, EDGES)
    counted: dict[bool, list[int]] = {}
    previews: list[tuple[int, int]] = []
    for with_control in (True, False):
        steps: list[int] = []
        batch_params = p if with_control else p.model_copy(update={"controlnets": ()})
        batch_tasks = tasks(p)
        if not with_control:
            batch_tasks = [replace(task, control_images=()) for task in batch_tasks]
        engine.render(
            RenderBatch(
                params=batch_params,
                tasks=batch_tasks,
                on_step=steps.append,
                on_preview=(lambda i, j, image: previews.append((i, j))) if with_control else None,
                preview_counts=(2, 1) if with_control else (),
            )
        )
        counted[with_control] = steps
    assert counted[True] == counted[False] == list(range(1, len(counted[False]) + 1))
    assert sorted(previews) == [(0, 0), (0, 1), (1, 0)]


def test_controlnet_inpainting_leaves_a_float32_vae_float32(
    tiny_settings_factory: Any, controlnet_dir: Path
) -> None:
    """diffusers' ControlNet inpaint encode upcasts the (force_upcast) VAE and casts it back
    to the UNets' dtype after; the VAE kept in float32 beside them stays float32."""
    settings = tiny_settings_factory(
        controlnet_dir=controlnet_dir, dtype="bfloat16", vae_dtype="float32"
    )
    mixed = Engine.load(EngineConfig.of(settings))
    assert (mixed.base.unet.dtype, mixed.vae.dtype) == (torch.bfloat16, torch.float32)
    p = params(RenderKind.INPAINT, RefinerMode.NONE, EDGES).model_copy(
        update={"num_inference_steps": 2}
    )
    images = mixed.render(RenderBatch(params=p, tasks=tasks(p, mask=LEFT_HALF)))
    assert [image.size for image in images] == [(SIZE, SIZE)] * len(SEEDS)
    assert mixed.vae.dtype == torch.float32


def test_a_render_without_units_builds_no_controlnet_pipeline(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a ControlNet pipeline was built for a render without units")

    monkeypatch.setattr(engine.controlnets, "stage", refuse)
    for kind in (RenderKind.TEXT_TO_IMAGE, RenderKind.IMAGE_TO_IMAGE, RenderKind.INPAINT):
        p = params(kind, RefinerMode.ENSEMBLE).model_copy(update={"num_inference_steps": 2})
        mask = LEFT_HALF if kind is RenderKind.INPAINT else None
        assert len(engine.render(RenderBatch(params=p, tasks=tasks(p, mask=mask)))) == 2


def test_only_masked_inpaint_is_stock_padding_mask_crop(
    engine: Engine, controlnet_dir: Path
) -> None:
    """An "Only masked" edit with a unit: the request rules crop the picture and mask, the
    unit's map is cut from the same region (control_requests.py), the engine renders, the
    answer pastes back: stock `StableDiffusionXLControlNetInpaintPipeline` with
    `padding_mask_crop` (one picture per call, so one per seed), within 1 in 255."""
    import base64
    import io

    from sdxl_service.api.control_requests import with_controlnets
    from sdxl_service.api.request_kinds import EDIT
    from sdxl_service.api.responses import encode_rendered
    from sdxl_service.api.schemas import ImageEditRequest
    from sdxl_service.api.uploads import EditSource
    from sdxl_service.contract.render_request import RenderedImage
    from sdxl_service.controlnet_catalog import ControlNetCatalog
    from sdxl_service.engine.render_batch import image_tasks
    from sdxl_service.settings import Settings

    width, height = 96, 80
    picture = Image.frombytes("RGB", (width, height), noise_picture(3, width, height))
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (56, 40, 80, 60))
    blocks = np.random.default_rng(5).integers(0, 256, (10, 12, 1), np.uint8)
    control = Image.fromarray(np.repeat(np.repeat(np.repeat(blocks, 8, 0), 8, 1), 3, 2))
    png = io.BytesIO()
    control.save(png, format="PNG")
    unit = {"name": "edges", "scale": 0.9, "start": 0.1, "end": 0.9}
    req = ImageEditRequest(
        prompt=PROMPT,
        n=2,
        seed=SEEDS[0],
        mask_blur=2,
        inpaint_area="only_masked",
        inpaint_padding=8,
        controlnets=[{**unit, "image": base64.b64encode(png.getvalue()).decode()}],
    )
    settings = Settings(refiner="none", scheduler="euler", steps=10, image_metadata=False)
    resolved = EDIT.resolve(req, EditSource(picture, mask), settings, SIZE)
    assert resolved.paste_region is not None and req.controlnets is not None
    job, _ = with_controlnets(
        resolved.job,
        None,
        req.controlnets,
        ControlNetCatalog(controlnet_dir).snapshot(),
        settings,
        (resolved.paste_region, (width, height)),
    )
    p = job.params
    got = []
    with torch.inference_mode():
        rendered = engine.render(RenderBatch(params=p, tasks=image_tasks(job)))
        for seed, image in zip(SEEDS, rendered, strict=True):
            wire = RenderedImage(seed=seed, width=width, height=height, rgb=image.tobytes())
            answer = Image.open(io.BytesIO(encode_rendered(wire, replace(resolved, job=job))))
            got.append(np.asarray(answer, dtype=np.int16))
        stock = scheduled(
            engine,
            StableDiffusionXLControlNetInpaintPipeline(
                **engine.base.components, controlnet=controlnet(engine, "edges")
            ),
            p,
        )
        blurred = stock.mask_processor.blur(mask, blur_factor=2)
        expected = [
            np.asarray(
                stock(
                    prompt=PROMPT,
                    image=picture,
                    mask_image=blurred,
                    control_image=control,
                    strength=1.0,
                    controlnet_conditioning_scale=0.9,
                    control_guidance_start=0.1,
                    control_guidance_end=0.9,
                    width=width,
                    height=height,
                    num_inference_steps=p.num_inference_steps,
                    guidance_scale=p.guidance_scale,
                    generator=torch.Generator("cpu").manual_seed(seed),
                    padding_mask_crop=8,
                ).images[0],
                dtype=np.int16,
            )
            for seed in SEEDS
        ]
    differences = [int(np.abs(a - b).max()) for a, b in zip(got, expected, strict=True)]
    assert max(differences) <= 1, differences
    assert np.abs(got[0] - got[1]).mean() > 0.1
