"""LoRA adapters in the engine, on the tiny pair, with LoRAs made here by PEFT.

The module has an engine of its own (adapters change its modules) and the
images its pipelines gave before any LoRA was loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from sdxl_service.choices import RefinerMode
from sdxl_service.contract.render_request import LoraWeight, RenderParams
from sdxl_service.engine import Engine
from sdxl_service.engine.config import EngineConfig
from sdxl_service.engine.loras import adapter_name
from sdxl_service.engine.render_batch import ImageTask, InvalidLora, RenderBatch
from sdxl_service.engine.schedulers import make_scheduler
from sdxl_service.metrics import ServiceMetrics
from tests.jobs import make_params
from tests.lora_files import (
    save_diffusers,
    save_kohya,
    sd15_shaped_layers,
    text_encoder_2_layers,
    unet_layers,
)

PROMPT = "a red fox in the snow"


def params(*loras: tuple[str, float], **overrides: Any) -> RenderParams:
    weights = tuple(LoraWeight(name=n, scale=s) for n, s in sorted(loras))
    return make_params(**{"num_inference_steps": 5, "loras": weights, **overrides})


def render(
    engine: Engine, *loras: tuple[str, float], seed: int = 3, **overrides: Any
) -> np.ndarray:
    batch = RenderBatch(
        params=params(*loras, **overrides), tasks=[ImageTask(prompt=PROMPT, seed=seed)]
    )
    return np.asarray(engine.render(batch)[0], dtype=np.int16)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory, tiny_pair: tuple[Path, Path]) -> Path:
    folder = tmp_path_factory.mktemp("loras")
    base_dir = tiny_pair[0]
    style = unet_layers(base_dir, seed=1)
    save_diffusers(folder, "style", unet_lora_layers=style)
    save_kohya(folder, "style-kohya", style)
    save_diffusers(folder, "other.v2", unet_lora_layers=unet_layers(base_dir, seed=2))
    save_diffusers(folder, "third", unet_lora_layers=unet_layers(base_dir, seed=3))
    save_diffusers(
        folder, "words", text_encoder_2_lora_layers=text_encoder_2_layers(base_dir, seed=4)
    )
    save_diffusers(folder, "sd15", unet_lora_layers=sd15_shaped_layers(base_dir, seed=5))
    whole = (folder / "style" / "pytorch_lora_weights.safetensors").read_bytes()
    (folder / "cut.safetensors").write_bytes(whole[: len(whole) - 100])
    return folder


@pytest.fixture(scope="module")
def metrics() -> ServiceMetrics:
    return ServiceMetrics(CollectorRegistry())


@pytest.fixture(scope="module")
def engine(tiny_settings_factory, lora_dir: Path, metrics: ServiceMetrics) -> Engine:
    return Engine.load(EngineConfig.of(tiny_settings_factory(lora_dir=lora_dir)), metrics=metrics)


@pytest.fixture(scope="module")
def before_any_lora(engine: Engine) -> dict[RefinerMode, np.ndarray]:
    """The engine's images before any LoRA was loaded, one per refiner mode."""
    assert engine.loras.loaded() == []
    return {mode: render(engine, refiner=mode) for mode in RefinerMode}


def lora_layers_of(engine: Engine, adapter: str) -> int:
    from peft.tuners.lora import LoraLayer

    modules = [engine.base.unet, engine.base.text_encoder, engine.base.text_encoder_2]
    return sum(
        1
        for module in modules
        for layer in module.modules()
        if isinstance(layer, LoraLayer) and adapter in layer.lora_A
    )


# --- applying LoRAs ---------------------------------------------------------------


def test_scale_zero_is_the_image_without_lora_and_scale_one_is_not(
    engine: Engine, before_any_lora: dict[RefinerMode, np.ndarray]
) -> None:
    without = before_any_lora[RefinerMode.ENSEMBLE]
    assert np.array_equal(render(engine, ("style", 0.0)), without)
    with_lora = render(engine, ("style", 1.0))
    assert np.abs(with_lora - without).max() > 10
    assert "style" in engine.loras.loaded()


def test_without_lora_every_mode_gives_the_image_from_before_any_lora(
    engine: Engine, before_any_lora: dict[RefinerMode, np.ndarray]
) -> None:
    render(engine, ("style", 1.0), ("words", 1.0))
    for mode, image in before_any_lora.items():
        # At most one level of 255 apart: on some CPUs the base-only image moved by 1 in one
        # pixel once adapters were injected (disabled, the UNet's output stays bit-equal; the
        # rounding of one value near .5 is not). A LoRA left on moves pixels by tens.
        assert np.abs(render(engine, refiner=mode) - image).max() <= 1, mode


def stock_render(
    tiny_pair: tuple[Path, Path],
    engine: Engine,
    path: Path,
    scale: float,
    mode: RefinerMode,
    *,
    steps: int = 5,
    guidance_scale: float = 5.0,
    scheduler: str = "euler",
) -> np.ndarray:
    """diffusers' own recipe: load_lora_weights + set_adapters on a fresh base pipeline,
    the refiner from its own folder (its own text_encoder_2, without LoRA)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from safetensors.torch import load_file

    base = StableDiffusionXLPipeline.from_pretrained(tiny_pair[0], add_watermarker=False)
    base.set_progress_bar_config(disable=True)
    base.load_lora_weights(load_file(path), adapter_name="stock")
    base.set_adapters(["stock"], adapter_weights=[scale])
    common: dict[str, Any] = {
        "prompt": [PROMPT],
        "num_inference_steps": steps,
        "guidance_scale": guidance_scale,
        "generator": [torch.Generator("cpu").manual_seed(3)],
        "output_type": "latent",
    }
    with torch.inference_mode():
        base.scheduler = make_scheduler(scheduler, engine._base_scheduler_config)
        if mode is RefinerMode.NONE:
            latents = base(**common, width=64, height=64).images
        else:
            latents = base(**common, width=64, height=64, denoising_end=0.8).images
            refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
                tiny_pair[1], vae=base.vae, add_watermarker=False
            )
            refiner.set_progress_bar_config(disable=True)
            refiner.scheduler = make_scheduler(scheduler, engine._refiner_scheduler_config)
            latents = refiner(**common, image=latents, denoising_start=0.8).images
        image = engine.latent_codec.decode(latents)[0]
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize(
    ("name", "scale", "mode"),
    [
        ("style", 0.7, RefinerMode.ENSEMBLE),
        ("style", 1.0, RefinerMode.NONE),
        # The text-encoder LoRA reaches the base; the stock refiner has its own
        # text_encoder_2, without it: equal images prove ours runs without it too.
        ("words", 1.0, RefinerMode.ENSEMBLE),
    ],
)
def test_lora_image_matches_stock_diffusers(
    engine: Engine,
    tiny_pair: tuple[Path, Path],
    lora_dir: Path,
    before_any_lora: dict[RefinerMode, np.ndarray],
    name: str,
    scale: float,
    mode: RefinerMode,
) -> None:
    ours = render(engine, (name, scale), refiner=mode)
    path = lora_dir / name / "pytorch_lora_weights.safetensors"
    stock = stock_render(tiny_pair, engine, path, scale, mode)
    assert np.abs(ours - stock).max() <= 1
    assert np.abs(ours - before_any_lora[mode]).max() > 10


def test_a_lightning_style_lora_renders_in_4_steps_as_its_model_card_says(
    engine: Engine, tiny_pair: tuple[Path, Path], lora_dir: Path
) -> None:
    """SDXL-Lightning's recipe: the LoRA, Euler with trailing timesteps, 4 steps, guidance 0,
    no refiner; the stock side builds its scheduler as the model card does."""
    from diffusers import EulerDiscreteScheduler

    ours = render(
        engine,
        ("style", 1.0),
        refiner=RefinerMode.NONE,
        num_inference_steps=4,
        guidance_scale=0.0,
        scheduler="euler_trailing",
    )
    path = lora_dir / "style" / "pytorch_lora_weights.safetensors"
    stock = stock_render(
        tiny_pair,
        engine,
        path,
        1.0,
        RefinerMode.NONE,
        steps=4,
        guidance_scale=0.0,
        scheduler="euler_trailing",
    )
    assert np.abs(ours - stock).max() <= 1
    card = EulerDiscreteScheduler.from_config(
        engine._base_scheduler_config, timestep_spacing="trailing"
    )
    card.set_timesteps(4)
    assert card.timesteps.tolist() == [999, 749, 499, 249]
    leading = render(
        engine, ("style", 1.0), refiner=RefinerMode.NONE, num_inference_steps=4, guidance_scale=0.0
    )
    assert np.abs(ours - leading).max() > 10  # the spacing is what makes it Lightning's


def test_kohya_and_diffusers_files_of_the_same_weights_give_the_same_image(
    engine: Engine,
) -> None:
    assert np.array_equal(render(engine, ("style-kohya", 0.8)), render(engine, ("style", 0.8)))


def test_batches_with_different_loras_each_give_their_own_image(engine: Engine) -> None:
    alone = {name: render(engine, (name, 1.0)) for name in ("style", "other.v2")}
    both = render(engine, ("style", 1.0), ("other.v2", 1.0))
    for name in ("other.v2", "style", "other.v2"):
        assert np.array_equal(render(engine, (name, 1.0)), alone[name]), name
    assert not np.array_equal(both, alone["style"])
    assert not np.array_equal(both, alone["other.v2"])
    assert np.array_equal(render(engine, ("style", 1.0), ("other.v2", 1.0)), both)


def test_text_encoder_lora_is_off_while_the_refiner_runs(engine: Engine) -> None:
    from peft.tuners.lora import LoraLayer

    encoder_layers = [m for m in engine.base.text_encoder_2.modules() if isinstance(m, LoraLayer)]
    seen: dict[str, list[bool]] = {"base": [], "refiner": []}

    def record(stage: str):
        def hook(*_: Any) -> None:
            seen[stage].append(any(not layer.disable_adapters for layer in encoder_layers))

        return hook

    hooks = [
        engine.base.unet.register_forward_pre_hook(record("base")),
        engine.refiner.unet.register_forward_pre_hook(record("refiner")),
    ]
    try:
        render(engine, ("words", 1.0))
    finally:
        for hook in hooks:
            hook.remove()
    assert encoder_layers and set(seen["base"]) == {True}
    assert seen["refiner"] and set(seen["refiner"]) == {False}


# --- LoRAs that cannot be applied ---------------------------------------------------


@pytest.mark.parametrize("name", ["sd15", "cut"])
def test_an_invalid_lora_is_refused_and_leaves_nothing_behind(
    engine: Engine,
    lora_dir: Path,
    before_any_lora: dict[RefinerMode, np.ndarray],
    metrics: ServiceMetrics,
    name: str,
) -> None:
    failed = metrics.registry.get_sample_value("sdxl_lora_loads_total", {"outcome": "failed"})
    with pytest.raises(InvalidLora, match=f"LoRA '{name}'") as refused:
        render(engine, ("style", 1.0), (name, 1.0))
    assert str(lora_dir) not in str(refused.value)
    assert name not in engine.loras.loaded()
    assert lora_layers_of(engine, adapter_name(name)) == 0
    after = metrics.registry.get_sample_value("sdxl_lora_loads_total", {"outcome": "failed"})
    assert (after or 0) == (failed or 0) + 1
    assert np.array_equal(render(engine), before_any_lora[RefinerMode.ENSEMBLE])


def test_a_lora_removed_from_the_folder_is_refused(engine: Engine) -> None:
    with pytest.raises(InvalidLora, match="'gone'"):
        render(engine, ("gone", 1.0))


# --- the cache ---------------------------------------------------------------------


def test_least_recently_used_lora_is_unloaded_past_lora_cache(
    engine: Engine, before_any_lora: dict[RefinerMode, np.ndarray], metrics: ServiceMetrics
) -> None:
    engine.loras.capacity = 2
    try:
        render(engine, ("style", 1.0))
        hits = metrics.registry.get_sample_value("sdxl_lora_cache_hits_total") or 0
        first_other = render(engine, ("other.v2", 1.0))
        render(engine, ("style", 1.0))
        assert metrics.registry.get_sample_value("sdxl_lora_cache_hits_total") == hits + 1
        render(engine, ("third", 1.0))
        assert engine.loras.loaded() == ["style", "third"]
        assert lora_layers_of(engine, adapter_name("other.v2")) == 0
        assert lora_layers_of(engine, adapter_name("style")) > 0
        assert engine.describe()["loras_loaded"] == ["style", "third"]
        # Loaded again, it gives the image it gave the first time.
        assert np.array_equal(render(engine, ("other.v2", 1.0)), first_other)
        assert "style" not in engine.loras.loaded()
    finally:
        engine.loras.capacity = 8
    assert np.array_equal(render(engine), before_any_lora[RefinerMode.ENSEMBLE])
    loads = metrics.registry.get_sample_value("sdxl_lora_loads_total", {"outcome": "ok"})
    assert loads and loads >= 5
    assert metrics.registry.get_sample_value("sdxl_lora_load_seconds_count") == loads
