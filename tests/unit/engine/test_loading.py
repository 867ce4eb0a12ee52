"""Loading the pair: SDXL_VARIANT chosen by what a folder holds and the dtype wanted, and the
warm-up before /readyz."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sdxl_service.choices import Switch
from sdxl_service.engine import Engine
from sdxl_service.engine.config import EngineConfig
from sdxl_service.engine.loading import choose_variant, weight_files
from sdxl_service.engine.render_batch import ImageTask, RenderBatch
from tests.jobs import make_params

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
DEFAULT = [f"{c}/diffusion_pytorch_model.safetensors" for c in COMPONENTS]
FP16 = [f"{c}/diffusion_pytorch_model.fp16.safetensors" for c in COMPONENTS]


@pytest.mark.parametrize(
    ("files", "dtype", "chosen"),
    [
        # Both sets: half precision reads the half-size files, float32 the full ones.
        (DEFAULT + FP16, torch.bfloat16, "fp16"),
        (DEFAULT + FP16, torch.float16, "fp16"),
        (DEFAULT + FP16, torch.float32, None),
        # One set only: that one, whatever the dtype (and whatever the device).
        (FP16, torch.float32, "fp16"),
        (FP16, torch.bfloat16, "fp16"),
        (DEFAULT, torch.float16, None),
        # A model without the variant: the complete default set.
        (DEFAULT + FP16[1:], torch.float16, None),
        # The stock hub repos hold a single-file checkpoint at the root: not a model.
        (["sd_xl_base_1.0.safetensors", *DEFAULT, *FP16], torch.float16, "fp16"),
        # Files unknown (a hub id offline): the dtype decides.
        (None, torch.float16, "fp16"),
        (None, torch.float32, None),
    ],
)
def test_the_variant_follows_the_files_and_the_dtype(
    files: list[str] | None, dtype: torch.dtype, chosen: str | None
) -> None:
    assert choose_variant(files, "fp16", dtype) == chosen


def test_no_variant_asked_is_none() -> None:
    assert choose_variant(DEFAULT + FP16, None, torch.float16) is None


@pytest.fixture(scope="module")
def variant_only_pair(
    tmp_path_factory: pytest.TempPathFactory, tiny_pair: tuple[Path, Path]
) -> tuple[Path, Path]:
    """The tiny pair saved as fp16 variant files alone (as `save_pretrained(variant=...)` or a
    `*.fp16.*` download pattern leaves a folder); the weights stay float32, so the images of
    both folders are the same."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    root = tmp_path_factory.mktemp("variant-only")
    out = []
    for cls, source, name in (
        (StableDiffusionXLPipeline, tiny_pair[0], "base"),
        (StableDiffusionXLImg2ImgPipeline, tiny_pair[1], "refiner"),
    ):
        pipeline = cls.from_pretrained(source, use_safetensors=True)
        pipeline.save_pretrained(root / name, variant="fp16")
        out.append(root / name)
    return out[0], out[1]


def engine_of(tiny_settings_factory, pair: tuple[Path, Path]) -> Engine:
    settings = tiny_settings_factory(
        preset="sdxl", base_model=str(pair[0]), refiner_model=str(pair[1]), variant="fp16"
    )
    return Engine.load(EngineConfig.of(settings))


def test_a_folder_of_variant_files_alone_loads_in_float32_on_the_cpu(
    tiny_settings_factory, tiny_pair: tuple[Path, Path], variant_only_pair: tuple[Path, Path]
) -> None:
    files = weight_files(str(variant_only_pair[0]))
    assert files and all(".fp16." in name for name in files)
    batch = RenderBatch(params=make_params(), tasks=[ImageTask(prompt="a red fox", seed=3)])
    images = [
        np.asarray(engine_of(tiny_settings_factory, pair).render(batch)[0])
        for pair in (variant_only_pair, tiny_pair)
    ]
    assert np.array_equal(images[0], images[1])


@pytest.mark.parametrize(
    ("mode", "on_gpu", "sides"),
    [
        # auto: at native size on a GPU; skipped on a CPU, where it made nothing faster
        # and cost 15.5 s of the full-size start (issue 19).
        (Switch.AUTO, True, [(1024, 1024)]),
        (Switch.AUTO, False, []),
        # on: a CPU renders small (at 1024x1024 the CPU warm-up took minutes).
        (Switch.ON, False, [(64, 64)]),
        (Switch.ON, True, [(1024, 1024)]),
        (Switch.OFF, True, []),
        (Switch.OFF, False, []),
    ],
)
def test_the_warm_up_follows_sdxl_warmup_and_the_device(
    tiny_engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
    mode: Switch,
    on_gpu: bool,
    sides: list[tuple[int, int]],
) -> None:
    seen: list[tuple[int, int]] = []
    monkeypatch.setattr(
        tiny_engine, "config", tiny_engine.config.model_copy(update={"warmup": mode})
    )
    monkeypatch.setattr(tiny_engine, "native_resolution", 1024)
    monkeypatch.setattr(tiny_engine, "_on_gpu", lambda: on_gpu)
    monkeypatch.setattr(
        tiny_engine, "render", lambda batch: seen.append((batch.params.width, batch.params.height))
    )
    assert tiny_engine.warmup() is bool(sides)
    assert seen == sides


def test_the_warm_up_renders_the_whole_path_on_the_tiny_pair(
    tiny_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        tiny_engine, "config", tiny_engine.config.model_copy(update={"warmup": Switch.ON})
    )
    assert tiny_engine.warmup() is True


@pytest.fixture(scope="module")
def other_vae(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A VAE of the tiny layout with other weights, in a folder of its own."""
    from diffusers import AutoencoderKL

    from sdxl_service.engine.tiny import vae_config

    torch.manual_seed(1234)
    folder = tmp_path_factory.mktemp("other-vae")
    AutoencoderKL.from_config(vae_config()).save_pretrained(folder)
    return folder


def test_sdxl_vae_replaces_the_vae_of_base_and_refiner(
    tiny_settings_factory, tiny_engine: Engine, other_vae: Path
) -> None:
    engine = Engine.load(EngineConfig.of(tiny_settings_factory(vae=str(other_vae))))
    assert engine.base.vae is engine.refiner.vae is engine.latent_codec.vae
    theirs = tiny_engine.base.vae.state_dict()
    ours = engine.base.vae.state_dict()
    assert any(not torch.equal(ours[k], theirs[k]) for k in theirs)
    assert engine.describe()["vae"] == str(other_vae)
    batch = RenderBatch(params=make_params(), tasks=[ImageTask(prompt="a red fox", seed=3)])
    changed = np.asarray(engine.render(batch)[0], dtype=int)
    before = np.asarray(tiny_engine.render(batch)[0], dtype=int)
    assert np.abs(changed - before).mean() > 1


def test_an_sdxl_vae_that_is_no_vae_fails_naming_the_variable(
    tiny_settings_factory, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=r"SDXL_VAE=.+cannot be loaded as an AutoencoderKL"):
        Engine.load(EngineConfig.of(tiny_settings_factory(vae=str(tmp_path))))


def test_an_fp16_safe_vae_decodes_in_fp16_without_the_upcast(other_vae: Path) -> None:
    """madebyollin/sdxl-vae-fp16-fix declares force_upcast: false; the stock VAE true."""
    from types import SimpleNamespace

    from sdxl_service.engine.devices import resolve_vae_dtype
    from sdxl_service.settings import Settings

    auto = EngineConfig.of(Settings(vae_dtype="auto"))
    safe = SimpleNamespace(config=SimpleNamespace(force_upcast=False))
    stock = SimpleNamespace(config=SimpleNamespace(force_upcast=True))
    assert resolve_vae_dtype(auto, torch.float16, safe) == torch.float16
    assert resolve_vae_dtype(auto, torch.float16, stock) == torch.float32
