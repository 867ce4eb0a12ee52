"""Models of SDXL_MODELS_DIR in the engine: loaded on first use, shared where equal, the least
recently used unloaded with its memory, a broken one refused with nothing left loaded."""

from __future__ import annotations

import gc
import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from sdxl_service.choices import RenderKind
from sdxl_service.contract.render_request import LoraWeight
from sdxl_service.engine import Engine
from sdxl_service.engine.config import EngineConfig
from sdxl_service.engine.render_batch import ImageTask, InvalidModel, RenderBatch
from sdxl_service.metrics import ServiceMetrics
from tests.jobs import make_params
from tests.lora_files import save_diffusers, text_encoder_2_layers, unet_layers
from tests.single_files import pipeline_to_original, save_checkpoint


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory, tiny_pair: tuple[Path, Path]) -> Path:
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    folder = tmp_path_factory.mktemp("models")
    base_dir = tiny_pair[0]
    shutil.copytree(base_dir, folder / "same")
    pipeline = StableDiffusionXLPipeline.from_pretrained(base_dir, use_safetensors=True)
    save_checkpoint(pipeline_to_original(pipeline, refiner=False), folder / "file.safetensors")
    # Another UNet (a fine-tune of the UNet alone): its text encoders and VAE are the default's.
    shutil.copytree(base_dir, folder / "other")
    unet = UNet2DConditionModel.from_pretrained(base_dir / "unet")
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        for parameter in unet.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    unet.save_pretrained(folder / "other" / "unet")
    # SDXL's prefixes, tensors of no architecture: the catalog lists it, the loader refuses it.
    from safetensors.numpy import save_file

    w = np.zeros((2, 2), dtype=np.float32)
    prefixes = ("model.diffusion_model.", "conditioner.embedders.0.transformer.")
    save_file(
        {f"{p}w": w for p in (*prefixes, "conditioner.embedders.1.model.")},
        str(folder / "broken.safetensors"),
    )
    return folder


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory, tiny_pair: tuple[Path, Path]) -> Path:
    folder = tmp_path_factory.mktemp("loras")
    save_diffusers(
        folder,
        "both",
        unet_lora_layers=unet_layers(tiny_pair[0], 1),
        text_encoder_2_lora_layers=text_encoder_2_layers(tiny_pair[0], 2),
    )
    return folder


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def engine(tiny_settings_factory, models_dir: Path, lora_dir: Path, registry) -> Engine:
    settings = tiny_settings_factory(models_dir=models_dir, lora_dir=lora_dir, model_cache=1)
    return Engine.load(EngineConfig.of(settings), metrics=ServiceMetrics(registry))


def render(engine: Engine, model: str | None = None, **params: object) -> np.ndarray:
    batch = RenderBatch(
        params=make_params(model=model, **params),
        tasks=[ImageTask(prompt="a fox", negative_prompt="blur", seed=7)],
    )
    return np.asarray(engine.render(batch)[0], dtype=np.int16)


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def test_a_model_of_the_same_weights_renders_the_default_pixels(engine: Engine, registry) -> None:
    default = render(engine)
    assert np.array_equal(render(engine, "same"), default)
    assert engine.models.resident() == ["same"]
    loaded = engine.models._resident["same"]
    # Only the UNet is its own: the text encoders and the VAE are the default's modules.
    assert set(loaded.shared) == {"text_encoder", "text_encoder_2", "vae"}
    assert loaded.base.text_encoder_2 is engine.models.default.base.text_encoder_2
    assert loaded.base.unet is not engine.models.default.base.unet
    assert metric(registry, "sdxl_model_loads_total", outcome="ok") == 1
    assert metric(registry, "sdxl_models_resident", worker="1") == 1
    assert engine.describe()["models_loaded"] == ["same"]
    # Used again: no second load.
    render(engine, "same")
    assert metric(registry, "sdxl_model_loads_total", outcome="ok") == 1
    assert np.array_equal(render(engine), default)


def test_a_single_file_of_the_same_weights_renders_the_default_pixels(engine: Engine) -> None:
    default = render(engine)
    from_file = render(engine, "file")
    # Equal weights at other offsets in memory: the CPU kernels may round one level apart
    # (test_single_file.py's `realigned` says why).
    assert np.abs(from_file - default).max() <= 1
    assert set(engine.models._resident["file"].shared) == {"text_encoder", "text_encoder_2", "vae"}


def test_another_unet_renders_other_pixels(engine: Engine) -> None:
    assert not np.array_equal(render(engine, "other"), render(engine))


def test_the_least_recently_used_model_is_unloaded_with_its_memory(engine: Engine) -> None:
    render(engine, "other")
    unet = weakref.ref(engine.models._resident["other"].base.unet)
    shared = engine.models._resident["other"].base.text_encoder
    render(engine, "same")  # capacity 1: "other" goes
    gc.collect()
    assert engine.models.resident() == ["same"]
    assert unet() is None
    # What it shared stays: it is the default's.
    assert shared is engine.models.default.base.text_encoder
    render(engine)  # the default still renders


def test_a_broken_model_is_refused_and_nothing_of_it_stays(engine: Engine, registry) -> None:
    render(engine, "same")
    with pytest.raises(InvalidModel, match="model 'broken'") as refused:
        render(engine, "broken")
    assert "/" not in str(refused.value)  # no server paths for the client
    assert engine.models.resident() == []  # "same" made room first; broken never stayed
    assert metric(registry, "sdxl_model_loads_total", outcome="failed") == 1
    # Not loaded again for every request while the file stays as it is.
    with pytest.raises(InvalidModel):
        render(engine, "broken")
    assert metric(registry, "sdxl_model_loads_total", outcome="failed") == 1
    with pytest.raises(InvalidModel, match="not in the models folder"):
        render(engine, "missing")
    render(engine)


def test_a_models_lora_leaves_the_default_untouched(engine: Engine) -> None:
    default = render(engine)
    plain = render(engine, "same")
    with_lora = render(engine, "same", loras=(LoraWeight(name="both", scale=1.0),))
    assert not np.array_equal(with_lora, plain)
    # The LoRA sits in text_encoder_2, which "same" shares with the default: off for it.
    assert np.array_equal(render(engine), default)
    assert np.array_equal(render(engine, "same"), plain)
    default_lora = render(engine, loras=(LoraWeight(name="both", scale=1.0),))
    assert np.array_equal(default_lora, with_lora)
    assert np.array_equal(render(engine, "same"), plain)


@pytest.mark.parametrize("kind", [RenderKind.IMAGE_TO_IMAGE, RenderKind.INPAINT])
def test_edits_run_on_the_model_picked(engine: Engine, kind: RenderKind) -> None:
    picture = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8).tobytes()
    mask = np.repeat([[255] * 32 + [0] * 32], 64, axis=0).astype(np.uint8).tobytes()

    def edit(model: str | None) -> np.ndarray:
        task = ImageTask(
            prompt="a fox",
            seed=3,
            init_image=picture,
            mask=mask if kind is RenderKind.INPAINT else None,
        )
        params = make_params(model=model, kind=kind, strength=0.75, num_inference_steps=8)
        return np.asarray(engine.render(RenderBatch(params=params, tasks=[task]))[0], np.int16)

    default = edit(None)
    assert np.array_equal(edit("same"), default)
    assert not np.array_equal(edit("other"), default)
    assert np.array_equal(edit(None), default)
