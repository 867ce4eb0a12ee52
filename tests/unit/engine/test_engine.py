"""The engine on the real tiny pair: loading, rendering, refiner modes, cancel, OOM, speed-ups."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl_service.choices import Preset, RefinerMode, RenderKind
from sdxl_service.contract.render_request import RenderParams
from sdxl_service.engine import Engine, devices
from sdxl_service.engine.config import EngineConfig
from sdxl_service.engine.devices import (
    resolve_device,
    resolve_dtype,
    resolve_preset,
    resolve_vae_dtype,
)
from sdxl_service.engine.handover import ensemble_split
from sdxl_service.engine.loading import load_pipelines
from sdxl_service.engine.render_batch import ImageTask, OutOfMemory, RenderBatch, RenderCancelled
from sdxl_service.engine.schedulers import SCHEDULERS, make_scheduler
from sdxl_service.settings import Settings
from tests.jobs import make_params

STEPS = 4


def params(**overrides: object) -> RenderParams:
    return make_params(**{"num_inference_steps": STEPS, **overrides})


def tasks(*seeds: int, negative: str = "") -> list[ImageTask]:
    return [
        ImageTask(prompt="a red fox in the snow", negative_prompt=negative, seed=seed)
        for seed in seeds
    ]


def noise_picture(seed: int, width: int = 64, height: int = 64) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8).tobytes()


# Left half repainted: whole 8-pixel latent columns, so the latent mask is exact.
LEFT_HALF = np.repeat([[255] * 32 + [0] * 32], 64, axis=0).astype(np.uint8).tobytes()


def edit_params(kind: RenderKind = RenderKind.IMAGE_TO_IMAGE, **overrides: object) -> RenderParams:
    return params(kind=kind, **{"strength": 0.75, "num_inference_steps": 10, **overrides})


def edits(*seeds: int, picture: bytes | None = None, mask: bytes | None = None) -> list[ImageTask]:
    picture = picture or noise_picture(0)
    return [
        ImageTask(
            prompt="a red fox in the snow",
            negative_prompt="",
            seed=seed,
            init_image=picture,
            mask=mask,
        )
        for seed in seeds
    ]


def encoded(engine: Engine, picture: bytes, params: RenderParams, *seeds: int) -> torch.Tensor:
    """The picture's latents as the engine starts the images of `seeds` from them."""
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    return engine.latent_codec.encode([picture] * len(seeds), params, generators)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@contextmanager
def count_unet_calls(engine: Engine) -> Iterator[dict[str, int]]:
    calls = {"base": 0, "refiner": 0}

    def counter(stage: str):
        return lambda *_: calls.__setitem__(stage, calls[stage] + 1)

    hooks = [
        engine.base.unet.register_forward_hook(counter("base")),
        engine.refiner.unet.register_forward_hook(counter("refiner")),
    ]
    try:
        yield calls
    finally:
        for hook in hooks:
            hook.remove()


# --- loading -----------------------------------------------------------------


def test_refiner_shares_text_encoder_2_and_vae_with_base(tiny_engine: Engine) -> None:
    base, refiner = tiny_engine.base, tiny_engine.refiner
    assert refiner.text_encoder_2 is base.text_encoder_2
    assert refiner.vae is base.vae
    assert refiner.unet is not base.unet
    assert refiner.text_encoder is None
    assert refiner.config.requires_aesthetics_score is True


def test_describe_reports_what_was_loaded(tiny_engine: Engine, tiny_pair) -> None:
    info = tiny_engine.describe()
    assert info["preset"] == "tiny"
    assert info["base"] == str(tiny_pair[0])
    assert info["refiner"] == str(tiny_pair[1])
    assert info["device"] == "cpu"
    assert info["dtype"] == "float32"
    assert info["native_resolution"] == 64 == tiny_engine.native_resolution
    assert info["optimisations"] == {
        "attention": "sdpa",
        "vae_dtype": "float32",
        "channels_last": False,
        "fuse_qkv": False,
        "compile": False,
    }


def test_missing_weights_variant_falls_back_to_default_weights(tiny_pair) -> None:
    base, refiner = load_pipelines(
        str(tiny_pair[0]), str(tiny_pair[1]), dtype=torch.float32, variant="fp16"
    )
    assert refiner.vae is base.vae
    assert base.unet.dtype == torch.float32


# --- rendering ---------------------------------------------------------------


def test_render_returns_one_rgb_image_per_task_at_the_requested_size(tiny_engine: Engine) -> None:
    images = tiny_engine.render(RenderBatch(params=params(width=96, height=64), tasks=tasks(1, 2)))
    assert len(images) == 2
    for image in images:
        assert image.mode == "RGB"
        assert image.size == (96, 64)


def test_empty_batch_renders_nothing(tiny_engine: Engine) -> None:
    assert tiny_engine.render(RenderBatch(params=params(), tasks=[])) == []


def test_seed_reproduces_identical_pixels(tiny_engine: Engine) -> None:
    first = tiny_engine.render(RenderBatch(params=params(), tasks=tasks(42)))[0]
    second = tiny_engine.render(RenderBatch(params=params(), tasks=tasks(42)))[0]
    assert np.array_equal(pixels(first), pixels(second))


def test_different_seeds_give_different_images(tiny_engine: Engine) -> None:
    one, other = tiny_engine.render(RenderBatch(params=params(), tasks=tasks(1, 2)))
    assert np.abs(pixels(one) - pixels(other)).mean() > 1.0


@pytest.mark.parametrize(
    "scheduler", ["euler", "euler_a", "dpmpp_2m_sde_karras", "euler_a_karras", "dpm2_a"]
)
def test_image_in_a_batch_equals_the_same_seed_rendered_alone(
    tiny_engine: Engine, scheduler: str
) -> None:
    # Mixed prompts and negatives: an image must not depend on its neighbours.
    batch = [
        ImageTask(prompt="a lighthouse at dusk", negative_prompt="blurry, low quality", seed=11),
        ImageTask(prompt="a red fox in the snow", negative_prompt="", seed=12),
        ImageTask(prompt="a bowl of ramen", negative_prompt="text", seed=13),
    ]
    batched = tiny_engine.render(RenderBatch(params=params(scheduler=scheduler), tasks=batch))
    for task, image in zip(batch, batched, strict=True):
        alone = tiny_engine.render(RenderBatch(params=params(scheduler=scheduler), tasks=[task]))[0]
        assert np.allclose(pixels(image), pixels(alone), atol=2), task


def test_base_stage_matches_the_stock_diffusers_pipeline(tiny_engine: Engine) -> None:
    """Own prompt-embedding path == diffusers' (empty negative -> zeros, as SDXL base expects)."""
    base = tiny_engine.base
    for negative in ("", "blurry"):
        ours = tiny_engine.render(
            RenderBatch(params=params(refiner=RefinerMode.NONE), tasks=tasks(5, negative=negative))
        )[0]
        with torch.inference_mode():
            latents = base(
                prompt=["a red fox in the snow"],
                negative_prompt=[negative] if negative else None,
                num_inference_steps=STEPS,
                guidance_scale=5.0,
                width=64,
                height=64,
                generator=[torch.Generator("cpu").manual_seed(5)],
                output_type="latent",
            ).images
            stock = tiny_engine.latent_codec.decode(latents)[0]
        assert np.allclose(pixels(ours), pixels(stock), atol=1), negative


@pytest.mark.parametrize("scheduler", ["euler", "euler_a"])
@pytest.mark.parametrize("mode", [RefinerMode.ENSEMBLE, RefinerMode.SEQUENTIAL])
def test_refiner_modes_match_the_stock_diffusers_recipes(
    tiny_engine: Engine, mode: RefinerMode, scheduler: str
) -> None:
    """diffusers' documented recipes: the ensemble hands latents over at
    high_noise_frac; the refiner as img2img runs at strength 1 - high_noise_frac
    over the finished base image (30 steps at 0.8: int(5.999...) = 5 steps)."""
    steps = 30 if mode is RefinerMode.SEQUENTIAL else 10
    render = params(refiner=mode, num_inference_steps=steps, scheduler=scheduler)
    ours = tiny_engine.render(RenderBatch(params=render, tasks=tasks(5, 6)))
    if mode is RefinerMode.ENSEMBLE:
        base_stage, refiner_stage = {"denoising_end": 0.8}, {"denoising_start": 0.8}
    else:
        base_stage, refiner_stage = {}, {"strength": 1 - 0.8}
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in (5, 6)]
    common = {
        "prompt": ["a red fox in the snow"] * 2,
        "num_inference_steps": steps,
        "guidance_scale": 5.0,
        "generator": generators,
        "output_type": "latent",
    }
    base, refiner = tiny_engine.base, tiny_engine.refiner
    with torch.inference_mode():
        base.scheduler = make_scheduler(scheduler, tiny_engine._base_scheduler_config)
        latents = base(**common, width=64, height=64, **base_stage).images
        refiner.scheduler = make_scheduler(scheduler, tiny_engine._refiner_scheduler_config)
        with count_unet_calls(tiny_engine) as calls:
            latents = refiner(**common, image=latents, **refiner_stage).images
        stock = tiny_engine.latent_codec.decode(latents)
    assert calls["refiner"] == (5 if mode is RefinerMode.SEQUENTIAL else 2)
    for mine, theirs in zip(ours, stock, strict=True):
        assert np.abs(pixels(mine) - pixels(theirs)).max() <= 1


@pytest.mark.parametrize("mode", list(RefinerMode))
def test_each_refiner_mode_runs_its_stages(tiny_engine: Engine, mode: RefinerMode) -> None:
    stages: list[str] = []
    tiny_engine.stage_observer = lambda stage, seconds: stages.append(stage)
    try:
        with count_unet_calls(tiny_engine) as calls:
            images = tiny_engine.render(
                RenderBatch(params=params(refiner=mode, num_inference_steps=10), tasks=tasks(3))
            )
    finally:
        tiny_engine.stage_observer = None
    assert len(images) == 1
    # Classifier-free guidance runs each UNet once per step on a doubled batch.
    if mode is RefinerMode.NONE:
        assert stages == ["base", "decode"]
        assert calls == {"base": 10, "refiner": 0}
    elif mode is RefinerMode.ENSEMBLE:
        assert stages == ["base", "refiner", "decode"]
        assert calls == {"base": 8, "refiner": 2}
    else:
        # diffusers' int(10 * (1 - 0.8)) = int(1.999...) = 1 step.
        assert stages == ["base", "refiner", "decode"]
        assert calls == {"base": 10, "refiner": 1}


def test_refiner_modes_give_different_images(tiny_engine: Engine) -> None:
    rendered = {
        mode: pixels(
            tiny_engine.render(RenderBatch(params=params(refiner=mode), tasks=tasks(9)))[0]
        )
        for mode in RefinerMode
    }
    assert not np.array_equal(rendered[RefinerMode.ENSEMBLE], rendered[RefinerMode.NONE])
    assert not np.array_equal(rendered[RefinerMode.SEQUENTIAL], rendered[RefinerMode.NONE])
    assert not np.array_equal(rendered[RefinerMode.ENSEMBLE], rendered[RefinerMode.SEQUENTIAL])


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_each_scheduler_splits_the_steps_between_base_and_refiner(
    tiny_engine: Engine, scheduler: str
) -> None:
    with count_unet_calls(tiny_engine) as calls:
        images = tiny_engine.render(
            RenderBatch(
                params=params(scheduler=scheduler, num_inference_steps=10), tasks=tasks(4, 5)
            )
        )
    assert len(images) == 2
    assert calls["base"] > 0 and calls["refiner"] > 0
    # Each step once; Heun and DPM2 call the UNet twice a step (the first once), and
    # diffusers' refiner repeats the base's last call where the cut-off splits a step.
    split = ensemble_split(10, 0.8, scheduler, tiny_engine._base_scheduler_config)
    assert (calls["base"], calls["refiner"]) == split
    second_order = scheduler in ("heun", "dpm2", "dpm2_a")
    assert sum(split) in ((19, 20) if second_order else (10,))
    assert pixels(images[0]).std() > 0


def test_stage_observer_gets_seconds_per_stage(tiny_settings: Settings) -> None:
    timings: list[tuple[str, float]] = []
    engine = Engine.load(
        EngineConfig.of(tiny_settings), stage_observer=lambda s, t: timings.append((s, t))
    )
    engine.render(RenderBatch(params=params(), tasks=tasks(1)))
    assert [stage for stage, _ in timings] == ["base", "refiner", "decode"]
    assert all(seconds > 0 for _, seconds in timings)


# --- edits: img2img and inpainting --------------------------------------------


def test_edit_pipelines_share_every_module_with_base_and_refiner(tiny_engine: Engine) -> None:
    for derived, source in [
        (tiny_engine.base_img2img, tiny_engine.base),
        (tiny_engine.base_inpaint, tiny_engine.base),
        (tiny_engine.refiner_inpaint, tiny_engine.refiner),
    ]:
        for name, module in source.components.items():
            if name != "scheduler":
                assert getattr(derived, name) is module, name
        assert derived.config.requires_aesthetics_score == source.config.get(
            "requires_aesthetics_score", False
        )
        assert derived.watermark is None


@pytest.mark.parametrize("kind", [RenderKind.IMAGE_TO_IMAGE, RenderKind.INPAINT])
@pytest.mark.parametrize("mode", list(RefinerMode))
def test_edit_renders_one_image_per_task_at_the_render_size(
    tiny_engine: Engine, kind: RenderKind, mode: RefinerMode
) -> None:
    picture = noise_picture(1, 96, 64)
    mask = np.full((64, 96), 255, np.uint8).tobytes() if kind is RenderKind.INPAINT else None
    batch = RenderBatch(
        params=edit_params(kind, width=96, height=64, refiner=mode),
        tasks=edits(1, 2, picture=picture, mask=mask),
    )
    images = tiny_engine.render(batch)
    assert [(image.mode, image.size) for image in images] == [("RGB", (96, 64))] * 2
    assert np.abs(pixels(images[0]) - pixels(images[1])).mean() > 1.0


@pytest.mark.parametrize("kind", [RenderKind.IMAGE_TO_IMAGE, RenderKind.INPAINT])
def test_edit_seed_reproduces_identical_pixels(tiny_engine: Engine, kind: RenderKind) -> None:
    mask = LEFT_HALF if kind is RenderKind.INPAINT else None
    batch = RenderBatch(params=edit_params(kind), tasks=edits(42, mask=mask))
    first, second = tiny_engine.render(batch)[0], tiny_engine.render(batch)[0]
    assert np.array_equal(pixels(first), pixels(second))


def test_edits_of_different_pictures_batch_like_each_alone(tiny_engine: Engine) -> None:
    """Compatible edits of different requests share a call; each keeps its own picture."""
    tasks = [*edits(5, picture=noise_picture(1)), *edits(6, picture=noise_picture(2))]
    batched = tiny_engine.render(RenderBatch(params=edit_params(), tasks=tasks))
    for task, image in zip(tasks, batched, strict=True):
        alone = tiny_engine.render(RenderBatch(params=edit_params(), tasks=[task]))[0]
        assert np.allclose(pixels(image), pixels(alone), atol=2)
    assert np.abs(pixels(batched[0]) - pixels(batched[1])).mean() > 1.0


def test_edit_starts_from_the_picture_and_strength_sets_how_far_it_moves(
    tiny_engine: Engine,
) -> None:
    # In latent space: the random tiny VAE does not give a picture back in pixels.
    with torch.inference_mode():
        picture = encoded(tiny_engine, noise_picture(0), edit_params(), 3)[0]
        distance = {}
        for strength in (0.2, 0.5, 1.0):
            batch = RenderBatch(params=edit_params(strength=strength), tasks=edits(3))
            distance[strength] = (tiny_engine._denoise(batch)[0] - picture).abs().mean().item()
        other = encoded(tiny_engine, noise_picture(9), edit_params(), 3)[0]
        other_edit = tiny_engine._denoise(
            RenderBatch(params=edit_params(strength=0.2), tasks=edits(3, picture=noise_picture(9)))
        )[0]
    assert distance[0.2] < distance[0.5] < distance[1.0]
    assert (other_edit - other).abs().mean() < (other_edit - picture).abs().mean()


@pytest.mark.parametrize("mode", list(RefinerMode))
@pytest.mark.parametrize("strength", [0.15, 0.75, 1.0])
def test_inpainting_keeps_the_latents_outside_the_mask(
    tiny_engine: Engine, mode: RefinerMode, strength: float
) -> None:
    """diffusers' guarantee for 4-channel UNets: outside the mask the result is the picture."""
    edit = edit_params(RenderKind.INPAINT, refiner=mode, strength=strength)
    with torch.inference_mode():
        # Each image's own sample of the picture's posterior.
        picture = encoded(tiny_engine, noise_picture(0), edit, 1, 2)
        latents = tiny_engine._denoise(RenderBatch(params=edit, tasks=edits(1, 2, mask=LEFT_HALF)))
    kept, repainted = slice(4, 8), slice(0, 4)  # latent columns (8 px each)
    assert torch.equal(latents[..., kept], picture[..., kept])
    assert (latents[0, ..., repainted] - latents[1, ..., repainted]).abs().mean() > 0.01


@pytest.mark.parametrize(
    ("mode", "strength", "expected"),
    [
        # 10 steps, strength 0.75: the last 7 of the schedule; 5 above 0.8's cut-off.
        (RefinerMode.ENSEMBLE, 0.75, {"base": 5, "refiner": 2}),
        (RefinerMode.SEQUENTIAL, 0.75, {"base": 7, "refiner": 1}),
        (RefinerMode.NONE, 0.75, {"base": 7, "refiner": 0}),
        # All of a light edit lies below the hand-over: the refiner makes it alone.
        (RefinerMode.ENSEMBLE, 0.15, {"base": 0, "refiner": 1}),
        # The sequential refiner re-noises no more than the edit did.
        (RefinerMode.SEQUENTIAL, 0.15, {"base": 1, "refiner": 1}),
    ],
)
@pytest.mark.parametrize("kind", [RenderKind.IMAGE_TO_IMAGE, RenderKind.INPAINT])
def test_edit_splits_its_steps_between_base_and_refiner(
    tiny_engine: Engine,
    kind: RenderKind,
    mode: RefinerMode,
    strength: float,
    expected: dict[str, int],
) -> None:
    mask = LEFT_HALF if kind is RenderKind.INPAINT else None
    batch = RenderBatch(
        params=edit_params(kind, refiner=mode, strength=strength), tasks=edits(1, mask=mask)
    )
    with count_unet_calls(tiny_engine) as calls:
        tiny_engine.render(batch)
    assert calls == expected


def test_a_light_ensemble_edit_at_30_steps_is_the_refiners_alone(tiny_engine: Engine) -> None:
    # strength 0.21 > 1 - 0.8, yet its first step (t=166 of 30 leading steps) is
    # below the cut-off at t=200: the base would add noise and hand over a step early.
    batch = RenderBatch(params=edit_params(num_inference_steps=30, strength=0.21), tasks=edits(1))
    with count_unet_calls(tiny_engine) as calls:
        tiny_engine.render(batch)
    assert calls == {"base": 0, "refiner": int(30 * 0.21)}


def test_edit_reports_its_vae_encode_stage(tiny_engine: Engine) -> None:
    stages: list[str] = []
    tiny_engine.stage_observer = lambda stage, seconds: stages.append(stage)
    try:
        tiny_engine.render(RenderBatch(params=edit_params(), tasks=edits(1)))
    finally:
        tiny_engine.stage_observer = None
    assert stages == ["vae_encode", "base", "refiner", "decode"]


def test_the_n_images_of_a_request_encode_their_picture_once(tiny_engine: Engine) -> None:
    encodes = []
    hook = tiny_engine.vae.encoder.register_forward_hook(lambda *_: encodes.append(1))
    try:
        tiny_engine.render(RenderBatch(params=edit_params(), tasks=edits(1, 2, 3)))
    finally:
        hook.remove()
    assert len(encodes) == 1


def test_edit_leaves_the_vae_in_its_own_dtype(tiny_settings_factory) -> None:
    """diffusers' own encode would cast the shared VAE to the UNet dtype after upcasting."""
    engine = Engine.load(EngineConfig.of(tiny_settings_factory(vae_dtype="bf16")))
    for kind, mask in [(RenderKind.IMAGE_TO_IMAGE, None), (RenderKind.INPAINT, LEFT_HALF)]:
        engine.render(
            RenderBatch(params=edit_params(kind, num_inference_steps=4), tasks=edits(1, mask=mask))
        )
        assert engine.vae.dtype == torch.bfloat16
        assert engine.base.unet.dtype == torch.float32


# --- cancellation and out of memory ------------------------------------------


def test_should_stop_cancels_the_render_within_a_step(tiny_engine: Engine) -> None:
    polls = []

    def stop_on_third_poll() -> bool:
        polls.append(1)
        return len(polls) >= 3

    batch = RenderBatch(
        params=params(num_inference_steps=20), tasks=tasks(1), should_stop=stop_on_third_poll
    )
    with count_unet_calls(tiny_engine) as calls, pytest.raises(RenderCancelled):
        tiny_engine.render(batch)
    # Polled before the base, then after each step: stopped after step 2 of 20.
    assert len(polls) == 3
    assert calls == {"base": 2, "refiner": 0}


def test_should_stop_is_checked_between_stages(tiny_engine: Engine) -> None:
    base_steps = 8  # of 10 at high_noise_frac 0.8
    polls = []

    def stop_once_the_base_is_done() -> bool:
        polls.append(1)
        # Poll 1 precedes the base, polls 2..9 follow its steps; 10 is the hand-over.
        return len(polls) == 1 + base_steps + 1

    batch = RenderBatch(
        params=params(num_inference_steps=10),
        tasks=tasks(1),
        should_stop=stop_once_the_base_is_done,
    )
    with count_unet_calls(tiny_engine) as calls, pytest.raises(RenderCancelled):
        tiny_engine.render(batch)
    assert calls == {"base": base_steps, "refiner": 0}


def test_a_cancelled_batch_stops_decoding_between_images(tiny_engine: Engine) -> None:
    polls = []
    # 4 steps at 0.8: polls 1-7 cover the stages (3 base + 1 refiner steps); 8 comes
    # after the first image is decoded.
    batch = RenderBatch(
        params=params(),
        tasks=tasks(1, 2, 3),
        should_stop=lambda: polls.append(1) or len(polls) >= 8,
    )
    decodes = []
    hook = tiny_engine.vae.decoder.register_forward_hook(lambda *_: decodes.append(1))
    try:
        with pytest.raises(RenderCancelled):
            tiny_engine.render(batch)
    finally:
        hook.remove()
    assert len(decodes) == 1


def test_out_of_memory_is_reported_and_the_engine_keeps_working(
    tiny_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(tiny_engine.base.unet, "forward", exhausted)
    with pytest.raises(OutOfMemory) as raised:
        tiny_engine.render(RenderBatch(params=params(), tasks=tasks(1, 2)))
    message = str(raised.value)
    assert "out of memory" in message
    assert "2 image(s) at 64x64" in message
    assert "Tried to allocate 20.00 GiB" in message

    monkeypatch.undo()
    assert len(tiny_engine.render(RenderBatch(params=params(), tasks=tasks(1)))) == 1


# --- optimisations -----------------------------------------------------------


def test_channels_last_and_fused_qkv_render_the_same_image(
    tiny_engine: Engine, tiny_settings_factory
) -> None:
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    optimised = Engine.load(
        EngineConfig.of(tiny_settings_factory(channels_last=True, fuse_qkv=True))
    )
    assert optimised.optimisations["channels_last"] is True
    assert optimised.optimisations["fuse_qkv"] is True
    conv = optimised.base.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    for unet in (optimised.base.unet, optimised.refiner.unet):
        processors = set(map(type, unet.attn_processors.values()))
        assert processors == {FusedAttnProcessor2_0}

    for mode in (RefinerMode.ENSEMBLE, RefinerMode.SEQUENTIAL):
        batch = RenderBatch(params=params(refiner=mode), tasks=tasks(21, 22))
        plain_images = tiny_engine.render(batch)
        optimised_images = optimised.render(batch)
        for plain, fast in zip(plain_images, optimised_images, strict=True):
            assert np.allclose(pixels(plain), pixels(fast), atol=2)


def test_eager_attention_renders_the_same_image(tiny_engine: Engine, tiny_settings_factory) -> None:
    from diffusers.models.attention_processor import AttnProcessor

    eager = Engine.load(EngineConfig.of(tiny_settings_factory(attention="eager")))
    assert set(map(type, eager.base.unet.attn_processors.values())) == {AttnProcessor}
    batch = RenderBatch(params=params(), tasks=tasks(31))
    assert np.allclose(pixels(tiny_engine.render(batch)[0]), pixels(eager.render(batch)[0]), atol=2)


def test_bf16_vae_decode_is_close_to_float32(tiny_engine: Engine, tiny_settings_factory) -> None:
    bf16_vae = Engine.load(EngineConfig.of(tiny_settings_factory(vae_dtype="bf16")))
    assert bf16_vae.vae.dtype == torch.bfloat16
    assert bf16_vae.base.unet.dtype == torch.float32
    batch = RenderBatch(params=params(), tasks=tasks(41))
    difference = np.abs(pixels(tiny_engine.render(batch)[0]) - pixels(bf16_vae.render(batch)[0]))
    assert difference.mean() < 3


def test_compile_is_skipped_off_cuda_unless_forced(tiny_settings_factory) -> None:
    engine = Engine.load(EngineConfig.of(tiny_settings_factory(compile=True)))
    assert engine.optimisations["compile"] is False


def test_unknown_attention_is_refused(tiny_settings_factory) -> None:
    with pytest.raises(ValueError, match="attention"):
        Engine.load(EngineConfig.of(tiny_settings_factory(attention="flash9")))


# --- resolution of auto settings ---------------------------------------------


def test_auto_preset_is_sdxl_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_preset(EngineConfig.of(Settings(preset=Preset.AUTO))) is Preset.SDXL


def test_auto_preset_falls_back_to_tiny_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger=devices.__name__):
        assert resolve_preset(EngineConfig.of(Settings(preset=Preset.AUTO))) is Preset.TINY
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and "TINY" in warnings[0].getMessage()


def test_explicit_preset_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_preset(EngineConfig.of(Settings(preset=Preset.SDXL))) is Preset.SDXL
    assert resolve_preset(EngineConfig.of(Settings(preset=Preset.TINY))) is Preset.TINY


@pytest.mark.parametrize(
    ("cuda", "mps", "expected"),
    [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")],
)
def test_auto_device_prefers_cuda_then_mps(
    monkeypatch: pytest.MonkeyPatch, cuda: bool, mps: bool, expected: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert resolve_device(EngineConfig.of(Settings(device="auto"))) == expected
    assert resolve_device(EngineConfig.of(Settings(device="cuda:1"))) == "cuda:1"


def test_dtype_resolution() -> None:
    assert resolve_dtype(EngineConfig.of(Settings(dtype="auto")), "cuda") == torch.float16
    assert resolve_dtype(EngineConfig.of(Settings(dtype="auto")), "cuda:0") == torch.float16
    assert resolve_dtype(EngineConfig.of(Settings(dtype="auto")), "mps") == torch.float32
    auto = EngineConfig.of(Settings(dtype="auto"))
    assert resolve_dtype(auto, "cpu", Preset.TINY) == torch.float32
    cpu_sdxl = torch.bfloat16 if devices.cpu_has_bf16() else torch.float32
    assert resolve_dtype(auto, "cpu", Preset.SDXL) == cpu_sdxl


def test_sdxl_on_a_cpu_without_bf16_runs_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: False)
    auto = EngineConfig.of(Settings(dtype="auto"))
    assert resolve_dtype(auto, "cpu", Preset.SDXL) == torch.float32
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: True)
    assert resolve_dtype(auto, "cpu", Preset.SDXL) == torch.bfloat16


@pytest.mark.parametrize(
    ("cpuinfo", "has"),
    [
        ("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw\n", False),
        ("flags\t\t: fpu avx512f avx512_bf16 avx512_vnni\n", True),
        ("flags\t\t: fpu avx512f amx_bf16 amx_tile\n", True),
        ("Features\t: fp asimd sve bf16 i8mm\n", True),  # Arm (Graviton 3)
        ("Features\t: fp asimd\n", False),
        ("", False),
    ],
)
def test_bf16_instructions_are_read_from_the_cpu_flags(cpuinfo: str, has: bool) -> None:
    assert devices.cpu_has_bf16(cpuinfo) is has
    for name, dtype in [
        ("float16", torch.float16),
        ("fp16", torch.float16),
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("float32", torch.float32),
        ("FP32", torch.float32),
    ]:
        assert resolve_dtype(EngineConfig.of(Settings(dtype=name)), "cpu") == dtype
    with pytest.raises(ValueError, match="float16"):
        resolve_dtype(EngineConfig.of(Settings(dtype="int8")), "cuda")


def test_vae_decodes_in_float32_when_fp16_would_overflow(tiny_engine: Engine) -> None:
    vae = tiny_engine.vae  # force_upcast: true, like SDXL's

    def vae_dtype(setting: str, dtype: torch.dtype) -> torch.dtype:
        return resolve_vae_dtype(EngineConfig.of(Settings(vae_dtype=setting)), dtype, vae)

    assert vae_dtype("auto", torch.float16) == torch.float32
    assert vae_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert vae_dtype("bf16", torch.float16) == torch.bfloat16
    assert vae_dtype("fp16", torch.float16) == torch.float16


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_engine_renders_close_to_float32(
    tiny_engine: Engine, tiny_settings_factory, dtype: str
) -> None:
    """The GPU's dtypes, exercised where the CPU allows: UNets and text encoders
    in half precision, the VAE kept where it does not overflow."""
    engine = Engine.load(EngineConfig.of(tiny_settings_factory(dtype=dtype)))
    assert engine.base.unet.dtype == engine.refiner.unet.dtype == getattr(torch, dtype)
    for mode in RefinerMode:
        batch = RenderBatch(params=params(refiner=mode), tasks=tasks(5))
        half, full = engine.render(batch)[0], tiny_engine.render(batch)[0]
        difference = np.abs(pixels(half) - pixels(full)).mean()
        assert difference < 3, f"{dtype} {mode}: mean pixel difference {difference:.1f}"
    edit = engine.render(RenderBatch(params=edit_params(num_inference_steps=4), tasks=edits(1)))[0]
    assert edit.mode == "RGB"


@pytest.mark.parametrize(
    ("scheduler", "stock_scheduler", "options"),
    [
        ("euler_trailing", "EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
        ("lcm", "LCMScheduler", {}),
        ("tcd", "TCDScheduler", {}),
    ],
)
def test_few_step_samplers_match_their_model_cards_recipes(
    tiny_engine: Engine, scheduler: str, stock_scheduler: str, options: dict
) -> None:
    """SDXL-Lightning / Hyper-SD (Euler, trailing), LCM-LoRA and TCD-LoRA as their model
    cards run them: 4 steps, guidance 0, the scheduler built from the model's config."""
    import diffusers

    render = params(
        refiner=RefinerMode.NONE, num_inference_steps=4, guidance_scale=0.0, scheduler=scheduler
    )
    ours = tiny_engine.render(RenderBatch(params=render, tasks=tasks(5, 6)))
    base = tiny_engine.base
    scheduler_class = getattr(diffusers, stock_scheduler)
    with torch.inference_mode():
        base.scheduler = scheduler_class.from_config(tiny_engine._base_scheduler_config, **options)
        latents = base(
            prompt=["a red fox in the snow"] * 2,
            num_inference_steps=4,
            guidance_scale=0.0,
            width=64,
            height=64,
            generator=[torch.Generator("cpu").manual_seed(seed) for seed in (5, 6)],
            output_type="latent",
        ).images
        stock = tiny_engine.latent_codec.decode(latents)
    for mine, theirs in zip(ours, stock, strict=True):
        assert np.abs(pixels(mine) - pixels(theirs)).max() <= 1
    # The refiner takes over from them too (the ensemble split needs first-order steps).
    ensemble = params(
        refiner=RefinerMode.ENSEMBLE, num_inference_steps=4, guidance_scale=1.0, scheduler=scheduler
    )
    [image] = tiny_engine.render(RenderBatch(params=ensemble, tasks=tasks(7)))
    assert image.size == (64, 64)


def test_clip_skip_2_is_diffusers_clip_skip_1_in_both_pipelines(tiny_engine: Engine) -> None:
    """AUTOMATIC1111 counts from 1 (SDXL's penultimate layer); diffusers from None."""
    render = params(refiner=RefinerMode.ENSEMBLE, num_inference_steps=10, clip_skip=2)
    ours = tiny_engine.render(RenderBatch(params=render, tasks=tasks(5)))
    default = tiny_engine.render(RenderBatch(params=params(num_inference_steps=10), tasks=tasks(5)))
    common = {
        "prompt": "a red fox in the snow",
        "num_inference_steps": 10,
        "guidance_scale": 5.0,
        "generator": torch.Generator("cpu").manual_seed(5),
        "output_type": "latent",
        "clip_skip": 1,
    }
    base, refiner = tiny_engine.base, tiny_engine.refiner
    with torch.inference_mode():
        base.scheduler = make_scheduler("euler", tiny_engine._base_scheduler_config)
        latents = base(**common, width=64, height=64, denoising_end=0.8).images
        refiner.scheduler = make_scheduler("euler", tiny_engine._refiner_scheduler_config)
        common["generator"] = torch.Generator("cpu").manual_seed(5)
        latents = refiner(**common, image=latents, denoising_start=0.8).images
        stock = tiny_engine.latent_codec.decode(latents)
    assert np.abs(pixels(ours[0]) - pixels(stock[0])).max() <= 1
    assert np.abs(pixels(ours[0]) - pixels(default[0])).max() > 10


# AUTOMATIC1111's samplers as diffusers' scheduler overview maps them: the stock class and options.
A1111_STOCK = {
    "dpmpp_2m_sde_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "dpmpp_3m_sde": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
    ),
    "dpmpp_sde_karras": ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": True}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
}


@pytest.mark.parametrize("scheduler", sorted(A1111_STOCK))
def test_automatic1111s_samplers_match_stock_diffusers(tiny_engine: Engine, scheduler: str) -> None:
    """The ensemble, both stages on the stock scheduler built as diffusers' docs say."""
    import diffusers

    class_name, options = A1111_STOCK[scheduler]
    scheduler_class = getattr(diffusers, class_name)
    ours = tiny_engine.render(
        RenderBatch(params=params(num_inference_steps=8, scheduler=scheduler), tasks=tasks(5, 6))
    )
    common = {
        "prompt": ["a red fox in the snow"] * 2,
        "num_inference_steps": 8,
        "guidance_scale": 5.0,
        "generator": [torch.Generator("cpu").manual_seed(seed) for seed in (5, 6)],
        "output_type": "latent",
    }
    base, refiner = tiny_engine.base, tiny_engine.refiner
    with torch.inference_mode():
        base.scheduler = scheduler_class.from_config(tiny_engine._base_scheduler_config, **options)
        latents = base(**common, width=64, height=64, denoising_end=0.8).images
        refiner.scheduler = scheduler_class.from_config(
            tiny_engine._refiner_scheduler_config, **options
        )
        latents = refiner(**common, image=latents, denoising_start=0.8).images
        stock = tiny_engine.latent_codec.decode(latents)
    for mine, theirs in zip(ours, stock, strict=True):
        assert np.abs(pixels(mine) - pixels(theirs)).max() <= 1


@pytest.mark.parametrize("scheduler", ["dpmpp_2m_sde", "dpmpp_3m_sde", "euler_a_karras"])
def test_a_stochastic_sampler_reproduces_with_the_seed(tiny_engine: Engine, scheduler: str) -> None:
    render = params(scheduler=scheduler)
    first = tiny_engine.render(RenderBatch(params=render, tasks=tasks(42)))[0]
    again = tiny_engine.render(RenderBatch(params=render, tasks=tasks(42)))[0]
    other = tiny_engine.render(RenderBatch(params=render, tasks=tasks(43)))[0]
    assert np.array_equal(pixels(first), pixels(again))
    assert np.abs(pixels(first) - pixels(other)).mean() > 1.0


@pytest.mark.parametrize(
    ("named", "sampler", "schedule_type"),
    [("dpmpp_2m_sde_karras", "dpmpp_2m_sde", "karras"), ("euler_a_karras", "euler_a", "karras")],
)
def test_a_sampler_and_schedule_type_render_the_scheduler_that_names_both(
    tiny_engine: Engine, named: str, sampler: str, schedule_type: str
) -> None:
    """What the infotext writes (Sampler, Schedule type) renders the image it was written for."""
    one = tiny_engine.render(RenderBatch(params=params(scheduler=named), tasks=tasks(3)))[0]
    split = params(scheduler=sampler, schedule_type=schedule_type)
    other = tiny_engine.render(RenderBatch(params=split, tasks=tasks(3)))[0]
    assert np.array_equal(pixels(one), pixels(other))
    plain = tiny_engine.render(RenderBatch(params=params(scheduler=sampler), tasks=tasks(3)))[0]
    assert not np.array_equal(pixels(one), pixels(plain))
