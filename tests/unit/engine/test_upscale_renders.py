"""Upscaler models in the engine's renders, on the tiny SDXL pair.

Pinned against what each part already equals: the upscaler model's picture is
UpscalerModels.upscale's (itself spandrel's, tests/unit/engine/test_upscalers.py); with a
denoising pass the render is the edit (img2img) of that picture; the hires fix with a model is
the edit of the first pass through the model, then Lanczos.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdxl_service.choices import HiresUpscaler, RenderKind
from sdxl_service.contract.render_request import HiresParams, RenderParams, UpscaleParams
from sdxl_service.engine import Engine
from sdxl_service.engine.render_batch import ImageTask, InvalidUpscaler, RenderBatch
from sdxl_service.engine.upscalers import UpscalerModels
from tests import upscaler_files
from tests.jobs import make_params

SEEDS = (31, 32)
PROMPT = "a lighthouse"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("upscalers")
    upscaler_files.esrgan(folder / "tiny-esrgan.safetensors", scale=2)
    upscaler_files.compact(folder / "tiny-compact.safetensors", scale=4)
    upscaler_files.unknown(folder / "mystery.safetensors")
    return folder


@pytest.fixture
def engine(tiny_engine: Engine, folder: Path, monkeypatch: pytest.MonkeyPatch) -> Engine:
    # Tiles of 64 px: the 48x40 source is one tile, the hires first pass (64x64) one too;
    # tiling itself is pinned in test_upscalers.py.
    monkeypatch.setattr(tiny_engine, "upscalers", UpscalerModels(folder, "cpu", tile=64))
    return tiny_engine


def source(width: int = 48, height: int = 40) -> Image.Image:
    rng = np.random.default_rng(7)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def upscale_params(upscaler: str, strength: float) -> RenderParams:
    picture = source()
    return make_params(
        width=128,
        height=104,
        kind=RenderKind.IMAGE_TO_IMAGE,
        strength=strength,
        num_inference_steps=4,
        upscale=UpscaleParams(
            upscaler=upscaler, source_width=picture.width, source_height=picture.height
        ),
    )


def render(engine: Engine, params: RenderParams, tasks: list[ImageTask]) -> list[np.ndarray]:
    return [np.asarray(image) for image in engine.render(RenderBatch(params=params, tasks=tasks))]


def source_tasks() -> list[ImageTask]:
    data = source().tobytes()
    return [ImageTask(prompt=PROMPT, seed=seed, init_image=data) for seed in SEEDS]


@pytest.mark.parametrize("upscaler", ["tiny-esrgan", "tiny-compact"])
def test_strength_0_is_the_upscaler_models_picture_alone(engine: Engine, upscaler: str) -> None:
    got = render(engine, upscale_params(upscaler, 0.0), source_tasks())
    expected = np.asarray(engine.upscalers.upscale(upscaler, source(), 128, 104))
    assert [image.shape for image in got] == [(104, 128, 3)] * 2
    assert all(np.array_equal(image, expected) for image in got)


def test_with_a_denoising_pass_it_is_the_edit_of_the_upscaled_picture(engine: Engine) -> None:
    params = upscale_params("tiny-esrgan", 0.5)
    upscaled = engine.upscalers.upscale("tiny-esrgan", source(), 128, 104).tobytes()
    edit = params.model_copy(update={"upscale": None})
    tasks = [ImageTask(prompt=PROMPT, seed=seed, init_image=upscaled) for seed in SEEDS]
    expected = render(engine, edit, tasks)
    got = render(engine, params, source_tasks())
    for ours, theirs in zip(got, expected, strict=True):
        assert np.array_equal(ours, theirs)


def test_hires_with_a_model_is_the_edit_of_the_first_pass_through_it(engine: Engine) -> None:
    hires = HiresParams(
        first_width=64,
        first_height=64,
        scale=2.0,
        steps=6,
        denoising_strength=0.5,
        upscaler=HiresUpscaler.LANCZOS,
        upscaler_model="tiny-compact",
    )
    params = make_params(width=128, height=128, hires=hires)
    first = render(
        engine,
        make_params(width=64, height=64),
        [ImageTask(prompt=PROMPT, seed=seed) for seed in SEEDS],
    )
    edit = params.model_copy(
        update={
            "kind": RenderKind.IMAGE_TO_IMAGE,
            "num_inference_steps": 6,
            "strength": 0.5,
            "hires": None,
        }
    )
    tasks = [
        ImageTask(
            prompt=PROMPT,
            seed=seed,
            # 4x is 256x256, then Lanczos to 128x128.
            init_image=engine.upscalers.upscale(
                "tiny-compact", Image.fromarray(image), 128, 128
            ).tobytes(),
        )
        for seed, image in zip(SEEDS, first, strict=True)
    ]
    expected = render(engine, edit, tasks)
    got = render(engine, params, [ImageTask(prompt=PROMPT, seed=seed) for seed in SEEDS])
    for ours, theirs in zip(got, expected, strict=True):
        assert np.array_equal(ours, theirs)
    plain = render(
        engine,
        params.model_copy(update={"hires": hires.model_copy(update={"upscaler_model": None})}),
        [ImageTask(prompt=PROMPT, seed=seed) for seed in SEEDS],
    )
    assert not np.array_equal(got[0], plain[0])


def test_a_file_spandrel_does_not_know_fails_the_batch_as_invalid(engine: Engine) -> None:
    with pytest.raises(InvalidUpscaler, match="mystery"):
        render(engine, upscale_params("mystery", 0.0), source_tasks())


def test_strength_0_needs_an_upscaler_model() -> None:
    with pytest.raises(ValueError, match="strength 0"):
        make_params(width=64, height=64, kind=RenderKind.IMAGE_TO_IMAGE, strength=0.0)
