"""Live previews on the tiny engine: which images, when, and that the final images do not change."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl_service.choices import Preset, PreviewDecoder, RefinerMode, RenderKind
from sdxl_service.contract.render_request import RenderParams
from sdxl_service.engine import Engine
from sdxl_service.engine import engine as engine_module
from sdxl_service.engine.config import EngineConfig
from sdxl_service.engine.loading import PreviewModelError, load_preview_model
from sdxl_service.engine.previews import (
    PreviewDecoders,
    PreviewTap,
    approx_decoder,
    capture_clean_latents,
    preview_schedule,
    preview_tap,
    taesd_decoder,
    total_steps,
)
from sdxl_service.engine.render_batch import ImageTask, RenderBatch
from sdxl_service.engine.schedulers import make_scheduler
from sdxl_service.engine.tiny import build_tiny_taesd, taesd_config, tiny_pair_dir, tiny_taesd_dir
from tests.jobs import make_params

DECODERS = [str(decoder) for decoder in PreviewDecoder]

Preview = tuple[int, int, Image.Image]


def params(**overrides: object) -> RenderParams:
    return make_params(**{"height": 48, **overrides})


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


def test_every_decoder_is_tested() -> None:
    assert set(DECODERS) == {"approx", "vae", "taesd"}


@pytest.mark.parametrize("decoder", DECODERS)
def test_previews_go_only_to_the_task_that_asked_and_leave_the_images_unchanged(
    tiny_engine: Engine, tiny_settings_factory, monkeypatch: pytest.MonkeyPatch, decoder: str
) -> None:
    config = EngineConfig.of(tiny_settings_factory(preview_decoder=decoder))
    monkeypatch.setattr(tiny_engine, "config", config)
    batch = RenderBatch(params=params(), tasks=tasks(1, 2))
    plain = tiny_engine.render(batch)

    images, previews = render_with_previews(tiny_engine, batch, (2, 0))

    assert [(task, index) for task, index, _ in previews] == [(0, 0), (0, 1)]
    assert all(image.size == (64, 48) and image.mode == "RGB" for _, _, image in previews)
    assert same_pixels(images, plain)


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize(
    ("mode", "scheduler", "size"),
    [
        (RefinerMode.ENSEMBLE, "dpmpp_2m", (96, 64)),
        (RefinerMode.SEQUENTIAL, "euler_a", (64, 80)),
    ],
)
def test_each_decoder_gives_render_size_previews_and_identical_final_images(
    tiny_engine: Engine,
    tiny_settings_factory,
    monkeypatch: pytest.MonkeyPatch,
    decoder: str,
    mode: RefinerMode,
    scheduler: str,
    size: tuple[int, int],
) -> None:
    config = EngineConfig.of(tiny_settings_factory(preview_decoder=decoder))
    monkeypatch.setattr(tiny_engine, "config", config)
    width, height = size
    render = params(
        width=width, height=height, refiner=mode, scheduler=scheduler, num_inference_steps=5
    )
    batch = RenderBatch(params=render, tasks=tasks(5, 6, 7))
    plain = tiny_engine.render(batch)

    images, previews = render_with_previews(tiny_engine, batch, (1, 0, 3))

    assert sorted((task, index) for task, index, _ in previews) == [(0, 0), (2, 0), (2, 1), (2, 2)]
    assert all(image.size == size and image.mode == "RGB" for _, _, image in previews)
    # Previews show something of the picture, not a blank: they differ between images.
    first = {task: np.asarray(image) for task, index, image in previews if index == 0}
    assert not np.array_equal(first[0], first[2])
    assert same_pixels(images, plain)


def test_taesd_previews_come_from_the_tiny_presets_own_taesd_loaded_once(
    tiny_engine: Engine, tiny_settings_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = EngineConfig.of(tiny_settings_factory(preview_decoder=PreviewDecoder.TAESD))
    monkeypatch.setattr(tiny_engine, "config", config)
    batch = RenderBatch(params=params(), tasks=tasks(1))
    render_with_previews(tiny_engine, batch, (1,))
    taesd = tiny_engine.preview_decoders.taesd
    _, previews = render_with_previews(tiny_engine, batch, (1,))
    assert tiny_engine.preview_decoders.taesd is taesd  # not loaded again
    assert type(taesd).__name__ == "AutoencoderTiny"
    assert taesd.dtype == tiny_engine.dtype and str(taesd.device) == tiny_engine.device
    # The saved tiny taesd: the same weights as a fresh build, so the same preview.
    built = build_tiny_taesd().state_dict()
    assert all(torch.equal(tensor, built[name]) for name, tensor in taesd.state_dict().items())
    assert len(previews) == 1


def test_engine_load_loads_taesd_at_startup_when_it_is_the_decoder(
    tiny_settings_factory,
) -> None:
    engine = Engine.load(EngineConfig.of(tiny_settings_factory(preview_decoder="taesd")))
    assert engine.preview_decoders._taesd is not None  # before any render asked for it
    lazy = Engine.load(EngineConfig.of(tiny_settings_factory(preview_decoder="approx")))
    assert lazy.preview_decoders._taesd is None


def test_tiny_taesd_is_saved_with_the_tiny_pair(tiny_cache_dir: Path) -> None:
    folder = tiny_taesd_dir(tiny_cache_dir)
    assert folder.parent == tiny_pair_dir(tiny_cache_dir)
    assert (folder / "config.json").is_file()
    taesd = load_preview_model(
        str(folder), cache_dir=tiny_cache_dir, device="cpu", dtype=torch.float32
    )
    # SDXL's latent API: 4 channels in, x8 out, and no scaling of the UNet's latents.
    assert taesd.config.latent_channels == 4
    assert taesd.config.scaling_factor == 1.0
    with torch.inference_mode():
        assert taesd.decode(torch.zeros(1, 4, 6, 5)).sample.shape == (1, 3, 48, 40)


@pytest.mark.parametrize("what", ["missing folder", "empty folder", "another model"])
def test_an_unloadable_preview_model_is_a_clear_error_naming_the_variable(
    tiny_engine: Engine,
    tiny_settings_factory,
    tiny_pair: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    what: str,
) -> None:
    source = {
        "missing folder": tmp_path / "no-such-folder",
        "empty folder": tmp_path,
        "another model": tiny_pair[0] / "vae",  # an AutoencoderKL
    }[what]
    settings = tiny_settings_factory(preview_decoder="taesd", preview_model=str(source))
    # The SDXL preset reads SDXL_PREVIEW_MODEL (the tiny preset has its own taesd).
    decoders = PreviewDecoders.for_engine(
        tiny_engine.latent_codec,
        EngineConfig.of(settings),
        preset=Preset.SDXL,
        device="cpu",
        dtype=torch.float32,
    )
    with pytest.raises(PreviewModelError, match=r"SDXL_PREVIEW_MODEL='.+'.+taesd") as error:
        decoders.prepare("taesd")
    assert str(source) in str(error.value)
    if what == "another model":
        assert "AutoencoderKL" in str(error.value)

    # A render asking for taesd previews fails with the same message (not a bare traceback).
    monkeypatch.setattr(tiny_engine, "config", EngineConfig.of(settings))
    monkeypatch.setattr(tiny_engine, "preview_decoders", decoders)
    with pytest.raises(PreviewModelError, match="SDXL_PREVIEW_MODEL"):
        render_with_previews(tiny_engine, RenderBatch(params=params(), tasks=tasks(1)), (1,))


def test_taesd_decoder_decodes_the_unet_latents_in_one_call_at_the_render_size() -> None:
    taesd = build_tiny_taesd().eval()
    calls: list[tuple[int, ...]] = []
    taesd.decoder.register_forward_hook(lambda _m, args, _out: calls.append(tuple(args[0].shape)))
    latents = torch.randn(3, 4, 6, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        images = taesd_decoder(taesd, 64, 48)(latents)
        assert calls == [(3, 4, 6, 8)]
        expected = taesd.decode(latents).sample  # scaling_factor 1.0: the latents as they are
    assert [image.size for image in images] == [(64, 48)] * 3
    pixels = ((expected / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    assert np.array_equal(np.asarray(images[1]), pixels[1].permute(1, 2, 0).numpy())

    # Another scaling factor divides the latents first, as diffusers' pipelines do.
    scaled = build_tiny_taesd()
    scaled.register_to_config(scaling_factor=2.0)
    with torch.inference_mode():
        halved = taesd_decoder(scaled, 64, 48)(latents * 2.0)
    assert same_pixels(halved, images)
    assert taesd_config()["scaling_factor"] == 1.0


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
        preview_tap(
            batch, "approx", tiny_engine.preview_decoders, base_runs=True, scheduler_config={}
        )
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
        # Second order: two UNet calls a step, counted as diffusers calls back.
        (RefinerMode.ENSEMBLE, "heun", RenderKind.TEXT_TO_IMAGE),
        (RefinerMode.SEQUENTIAL, "dpm2_a", RenderKind.TEXT_TO_IMAGE),
        (RefinerMode.ENSEMBLE, "dpm2", RenderKind.IMAGE_TO_IMAGE),
        (RefinerMode.NONE, "dpmpp_2m_sde_karras", RenderKind.TEXT_TO_IMAGE),
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
        refiner=mode,
        scheduler=scheduler,
        num_inference_steps=10,
        kind=kind,
        strength=0.75 if edit else 1.0,
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


def test_cpu_preview_bench_runs_and_picks_the_fastest_decoder_within_the_bar(
    tiny_cache_dir: Path, tmp_path: Path
) -> None:
    from bench import previews_cpu

    out = tmp_path / "previews.json"
    argv = ["--quick", "--sizes", "64", "--batches", "1", "--repeats", "1", "--out", str(out)]
    assert previews_cpu.main([*argv, "--cache-dir", str(tiny_cache_dir)]) == 0
    document = json.loads(out.read_text())
    assert {row["decoder"] for row in document["rows"]} == {"none", *DECODERS}
    assert all(row["median_s"] > 0 for row in document["rows"])
    assert set(document["decode_ms"]["64x64 batch 1"]) == set(DECODERS)

    def rows(**ratios: float) -> list[dict[str, Any]]:
        return [{"decoder": d, "ratio": r} for d, r in ratios.items()]

    picked = previews_cpu.verdict(rows(approx=1.02, vae=1.5, taesd=1.01) + rows(taesd=1.0))
    assert picked["meets"] == ["approx", "taesd"] and picked["fastest_within"] == "taesd"
    assert previews_cpu.verdict(rows(approx=1.2, vae=1.3, taesd=1.11))["fastest_within"] is None
