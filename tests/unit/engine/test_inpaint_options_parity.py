"""A masked edit with `mask_blur` and `inpaint_area`, through the request rules, the engine and
the answer's encoding, gives what stock diffusers gives for the same inputs.

Stock: `mask_processor.blur(mask, blur_factor=mask_blur)`, then the inpaint pipeline with
`padding_mask_crop=inpaint_padding` ("Only masked"), which crops the region
(`get_crop_region`), fits it to the render size (`resize_mode="fill"`) and pastes the image
back (`apply_overlay`). The pipeline refuses `padding_mask_crop` with latents out, so the
refiner recipes (which hand latents over) run its same steps by hand: the crop fitted with the
processors' own `resize`, the stock stages of test_edit_parity.py, `apply_overlay` at the end.
The whole picture with a blur: the stock stages, then `apply_overlay` with the blurred mask,
as the service composites every masked edit. Tolerance: 1 in 255, as the edit parity tests.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl_service.api.request_kinds import EDIT
from sdxl_service.api.responses import encode_rendered
from sdxl_service.api.schemas import ImageEditRequest
from sdxl_service.api.uploads import EditSource
from sdxl_service.choices import RefinerMode, RenderKind
from sdxl_service.contract.render_request import RenderedImage
from sdxl_service.engine import Engine
from sdxl_service.engine.render_batch import RenderBatch, image_tasks
from sdxl_service.engine.schedulers import make_scheduler
from sdxl_service.settings import Settings

from .test_edit_parity import recipe, stock  # noqa: F401 (the fixture)
from .test_engine import pixels

WIDTH, HEIGHT = 96, 80
SEED = 7
PROMPT = "a red fox in the snow"
NATIVE = 64  # the tiny pair's: edits render at their own size


def picture() -> Image.Image:
    rng = np.random.default_rng(11)
    return Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), np.uint8))


def mask() -> Image.Image:
    """A small box off-centre (255: repainted): "Only masked" crops a region around it."""
    repaint = np.zeros((HEIGHT, WIDTH), np.uint8)
    repaint[44:60, 52:76] = 255
    return Image.fromarray(repaint)


def settings(mode: RefinerMode) -> Settings:
    return Settings(
        refiner=mode, scheduler="euler", steps=10, high_noise_frac=0.8, image_metadata=False
    )


def ours(engine: Engine, mode: RefinerMode, **fields: Any) -> list[np.ndarray]:
    """Resolved as the service resolves an edit, rendered by the engine, encoded as answered."""
    req = ImageEditRequest(prompt=PROMPT, n=2, seed=SEED, output_format="png", **fields)
    resolved = EDIT.resolve(req, EditSource(picture(), mask()), settings(mode), NATIVE)
    job = resolved.job
    rendered = engine.render(RenderBatch(params=job.params, tasks=image_tasks(job)))
    answers = []
    for seed, image in zip(job.seeds, rendered, strict=True):
        wire = RenderedImage(seed=seed, width=image.width, height=image.height, rgb=image.tobytes())
        answers.append(pixels(Image.open(io.BytesIO(encode_rendered(wire, resolved)))))
    return answers


def stock_recipe(
    engine: Engine,
    pipes: dict[str, Any],
    mode: RefinerMode,
    strength: float,
    *,
    mask_blur: int,
    padding: int | None,
) -> list[np.ndarray]:
    processor = pipes["base_inpaint"].mask_processor
    images = pipes["base_inpaint"].image_processor
    original = picture()
    blurred = processor.blur(mask(), blur_factor=mask_blur) if mask_blur else mask()
    crop = None
    image, mask_image = original, blurred
    if padding is not None:
        crop = processor.get_crop_region(blurred, WIDTH, HEIGHT, pad=padding)
        image = images.resize(original.crop(crop), HEIGHT, WIDTH, resize_mode="fill")
        mask_image = processor.resize(blurred.crop(crop), HEIGHT, WIDTH, resize_mode="fill")
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in (SEED, SEED + 1)]
    inputs: Any = [image] * 2
    with torch.inference_mode():
        for name, arguments in recipe(RenderKind.INPAINT, mode, strength):
            pipeline = pipes[name]
            config = engine._refiner_scheduler_config if "refiner" in name else None
            pipeline.scheduler = make_scheduler("euler", config or engine._base_scheduler_config)
            inputs = pipeline(
                prompt=[PROMPT] * 2,
                image=inputs,
                mask_image=[mask_image] * 2,
                width=WIDTH,
                height=HEIGHT,
                num_inference_steps=10,
                guidance_scale=5.0,
                generator=generators,
                output_type="latent",
                **arguments,
            ).images
        decoded = engine.latent_codec.decode(inputs)
    return [pixels(images.apply_overlay(blurred, original, out, crop)) for out in decoded]


def assert_same_pixels(got: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert [image.shape for image in got] == [(HEIGHT, WIDTH, 3)] * 2
    differences = [int(np.abs(a - b).max()) for a, b in zip(got, expected, strict=True)]
    assert max(differences) <= 1, f"max pixel differences per image: {differences}"
    assert np.abs(got[0] - got[1]).mean() > 0.1  # the seeds do give different images


@pytest.mark.parametrize(
    ("mode", "strength"),
    [(RefinerMode.NONE, 1.0), (RefinerMode.ENSEMBLE, 1.0), (RefinerMode.SEQUENTIAL, 0.75)],
)
@pytest.mark.parametrize(("mask_blur", "padding"), [(4, None), (0, 8), (6, 12)])
def test_mask_blur_and_only_masked_match_the_stock_inpaint_steps(
    tiny_engine: Engine,
    stock: dict,  # noqa: F811
    mode: RefinerMode,
    strength: float,
    mask_blur: int,
    padding: int | None,
) -> None:
    fields: dict[str, Any] = {"mask_blur": mask_blur, "strength": strength}
    if padding is not None:
        fields |= {"inpaint_area": "only_masked", "inpaint_padding": padding}
    expected = stock_recipe(
        tiny_engine, stock, mode, strength, mask_blur=mask_blur, padding=padding
    )
    assert_same_pixels(ours(tiny_engine, mode, **fields), expected)


def test_only_masked_matches_the_pipelines_own_padding_mask_crop(
    tiny_engine: Engine,
    stock: dict,  # noqa: F811
) -> None:
    """The base alone: the stock pipeline's `padding_mask_crop` call itself, PIL out (it takes
    one picture per call: one call per seed)."""
    pipeline = stock["base_inpaint"]
    pipeline.scheduler = make_scheduler("euler", tiny_engine._base_scheduler_config)
    blurred = pipeline.mask_processor.blur(mask(), blur_factor=4)
    expected = []
    with torch.inference_mode():
        for seed in (SEED, SEED + 1):
            expected += pipeline(
                prompt=PROMPT,
                image=picture(),
                mask_image=blurred,
                width=WIDTH,
                height=HEIGHT,
                num_inference_steps=10,
                guidance_scale=5.0,
                generator=torch.Generator("cpu").manual_seed(seed),
                strength=1.0,  # an edit with a mask (the pipeline's default is 0.9999)
                padding_mask_crop=16,
            ).images
    got = ours(
        tiny_engine, RefinerMode.NONE, mask_blur=4, inpaint_area="only_masked", inpaint_padding=16
    )
    assert_same_pixels(got, [pixels(image) for image in expected])
    # Outside the region, the picture's own pixels.
    assert np.array_equal(got[0][:, :8], pixels(picture())[:, :8])
