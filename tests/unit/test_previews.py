"""Live previews on the tiny engine: which images, when, and that the final images do not change."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl_service.choices import RefinerMode, RenderKind
from sdxl_service.engine import Engine
from sdxl_service.engine import engine as engine_module
from sdxl_service.engine.previews import (
    PreviewTap,
    approx_decoder,
    capture_clean_latents,
    preview_schedule,
    preview_tap,
    total_steps,
)
from sdxl_service.jobs import ImageTask, RenderBatch, RenderParams
from sdxl_service.schedulers import make_scheduler

Preview = tuple[int, int, Image.Image]


def params(**overrides: object) -> RenderParams:
    values: dict[str, object] = {
        "width": 64,
        "height": 48,
        "steps": 4,
        "guidance_scale": 5.0,
        "high_noise_frac": 0.8,
        "refiner": RefinerMode.ENSEMBLE,
        "scheduler": "euler",
    }
    values.update(overrides)
    return RenderParams(**values)


def tasks(*seeds: int, prompt: str = "a red fox in the snow") -> list[ImageTask]:
    return [ImageTask(prompt=prompt, seed=seed) for seed in seeds]


def render_with_previews(
    engine: Engine, batch: RenderBatch, counts: tuple[int, ...]
) -> tuple[list[Image.Image], list[Preview]]:
    previews: list[Preview] = []
    with_previews = RenderBatch(
        params=batch.params,
        tasks=batch.tasks,
        on_preview=lambda task, index, image: previews.append((task, index, image)),
        preview_counts=counts,
    )
    return engine.render(with_previews), previews


def same_pixels(a: list[Image.Image], b: list[Image.Image]) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("decoder", ["approx", "vae"])
def test_previews_go_only_to_the_task_that_asked_and_leave_the_images_unchanged(
    tiny_engine: Engine, tiny_settings_factory, monkeypatch: pytest.MonkeyPatch, decoder: str
) -> None:
    monkeypatch.setattr(tiny_engine, "settings", tiny_settings_factory(preview_decoder=decoder))
    batch = RenderBatch(params=params(), tasks=tasks(1, 2))
    plain = tiny_engine.render(batch)

    images, previews = render_with_previews(tiny_engine, batch, (2, 0))

    assert [(task, index) for task, index, _ in previews] == [(0, 0), (0, 1)]
    assert all(image.size == (64, 48) and image.mode == "RGB" for _, _, image in previews)
    assert same_pixels(images, plain)


def test_no_previews_asked_attaches_nothing(
    tiny_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*_args: Any) -> None:
        raise AssertionError("a scheduler was wrapped")

    monkeypatch.setattr(PreviewTap, "attach", fail)
    batch = RenderBatch(params=params(), tasks=tasks(1, 2))
    images, previews = render_with_previews(tiny_engine, batch, (0, 0))
    assert previews == [] and len(images) == 2
    assert (
        preview_tap(batch, "approx", tiny_engine.latent_codec, base_runs=True, scheduler_config={})
        is None
    )


@pytest.mark.parametrize(
    ("mode", "scheduler", "kind"),
    [
        (RefinerMode.ENSEMBLE, "dpmpp_2m", RenderKind.TEXT_TO_IMAGE),
        (RefinerMode.SEQUENTIAL, "unipc", RenderKind.TEXT_TO_IMAGE),
        (RefinerMode.NONE, "ddim", RenderKind.TEXT_TO_IMAGE),
        (RefinerMode.ENSEMBLE, "euler_a", RenderKind.IMAGE_TO_IMAGE),
        (RefinerMode.SEQUENTIAL, "euler", RenderKind.IMAGE_TO_IMAGE),
    ],
)
def test_previews_are_spread_over_the_steps_base_and_refiner_run(
    tiny_engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
    mode: RefinerMode,
    scheduler: str,
    kind: RenderKind,
) -> None:
    taps: list[PreviewTap] = []

    def recording_tap(*args: Any, **kwargs: Any) -> PreviewTap | None:
        tap = preview_tap(*args, **kwargs)
        if tap is not None:
            taps.append(tap)
        return tap

    monkeypatch.setattr(engine_module, "preview_tap", recording_tap)
    edit = kind is not RenderKind.TEXT_TO_IMAGE
    render = params(
        refiner=mode, scheduler=scheduler, steps=10, kind=kind, strength=0.75 if edit else 1.0
    )
    picture = np.random.default_rng(0).integers(0, 256, (48, 64, 3), np.uint8).tobytes()
    batch = RenderBatch(
        params=render,
        tasks=[
            ImageTask(prompt="a fox", seed=s, init_image=picture if edit else None) for s in (3, 4)
        ],
    )
    plain = tiny_engine.render(batch)

    images, previews = render_with_previews(tiny_engine, batch, (3, 1))

    assert sorted((task, index) for task, index, _ in previews) == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert same_pixels(images, plain)
    [tap] = taps
    config = tiny_engine._base_scheduler_config
    assert tap.steps_done == total_steps(render, base_runs=True, scheduler_config=config)


def test_previews_keep_task_indices_when_prompts_need_separate_calls(
    tiny_engine: Engine,
) -> None:
    long_prompt = " ".join(["a red fox in the snow"] * 30)  # over 75 tokens: two chunks
    batch = RenderBatch(params=params(), tasks=tasks(1) + tasks(2, prompt=long_prompt))
    _, previews = render_with_previews(tiny_engine, batch, (1, 2))
    assert sorted((task, index) for task, index, _ in previews) == [(0, 0), (1, 0), (1, 1)]


def test_preview_steps_are_evenly_spaced() -> None:
    assert preview_schedule([3, 1, 0], 8) == {2: [(0, 0)], 4: [(0, 1), (1, 0)], 6: [(0, 2)]}
    assert preview_schedule([2], 1) == {1: [(0, 0), (0, 1)]}


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m", "unipc"])
def test_x0_at_the_last_step_is_the_final_latents(tiny_engine: Engine, scheduler: str) -> None:
    pipeline = tiny_engine.base
    pipeline.scheduler = make_scheduler(scheduler, tiny_engine._base_scheduler_config)
    captured: list[torch.Tensor] = []
    capture_clean_latents(pipeline.scheduler, captured.append)
    with torch.inference_mode():
        latents = pipeline(
            prompt="a red fox in the snow",
            num_inference_steps=4,
            width=64,
            height=64,
            output_type="latent",
            generator=torch.Generator("cpu").manual_seed(7),
        ).images
    assert len(captured) == 4
    assert torch.allclose(captured[-1], latents, atol=1e-4)
    assert not torch.allclose(captured[0], latents, atol=1e-2)


def test_approx_decoder_is_deterministic_and_upscales_to_the_render_size() -> None:
    latents = torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(0))
    decode = approx_decoder(64, 48)
    first, again = decode(latents), decode(latents.clone())
    assert [image.size for image in first] == [(64, 48), (64, 48)]
    assert same_pixels(first, again)
    assert not np.array_equal(np.asarray(first[0]), np.asarray(first[1]))
