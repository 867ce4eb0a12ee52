"""IP-Adapters in the engine give, seed for seed, what stock diffusers gives with
`load_ip_adapter`, `set_ip_adapter_scale` and `ip_adapter_image=` for the same folder (tiny
random adapters and image encoders, tests/ip_adapter_files.py); a batch without them renders
what it rendered before any adapter was loaded.

The module has an engine of its own (adapters change its UNet while a batch renders) and the
images it gave before any adapter was loaded. The stock pipelines are diffusers' own classes
over copies of the tiny base's folder, so that `load_ip_adapter` changes their UNet, not the
engine's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image
from prometheus_client import CollectorRegistry
from safetensors.torch import load_file

from sdxl_service.choices import HiresUpscaler, RefinerMode, RenderKind
from sdxl_service.contract.render_request import (
    HiresParams,
    IpAdapterWeight,
    LoraWeight,
    RenderParams,
    RgbPicture,
)
from sdxl_service.engine import Engine
from sdxl_service.engine.config import EngineConfig
from sdxl_service.engine.render_batch import ImageTask, InvalidIpAdapter, RenderBatch
from sdxl_service.engine.schedulers import make_scheduler
from sdxl_service.metrics import ServiceMetrics
from tests.ip_adapter_files import BIG_G, adapter_weights, build_folder, save_adapter
from tests.jobs import make_params
from tests.lora_files import save_diffusers, unet_layers

from .test_engine import LEFT_HALF, noise_picture, pixels

PROMPT = "a lighthouse at dusk"
SEEDS = (5, 6)
SIZE = 64
HIGH_NOISE_FRAC = 0.8


def picture(seed: int, width: int = 40, height: int = 56) -> RgbPicture:
    return RgbPicture(width=width, height=height, rgb=noise_picture(seed, width, height))


def pil(one: RgbPicture) -> Image.Image:
    return Image.frombytes("RGB", (one.width, one.height), one.rgb)


@pytest.fixture(scope="module")
def ip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_folder(tmp_path_factory.mktemp("ip-adapters"))


@pytest.fixture(scope="module")
def metrics() -> ServiceMetrics:
    return ServiceMetrics(CollectorRegistry())


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory, tiny_pair: tuple[Path, Path]) -> Path:
    folder = tmp_path_factory.mktemp("loras")
    save_diffusers(folder, "style", unet_lora_layers=unet_layers(tiny_pair[0], seed=1))
    return folder


@pytest.fixture(scope="module")
def engine(tiny_settings_factory, ip_dir: Path, metrics: ServiceMetrics) -> Engine:
    settings = tiny_settings_factory(ip_adapter_dir=ip_dir, control_cache=2, max_controlnets=2)
    return Engine.load(EngineConfig.of(settings), metrics=metrics)


@pytest.fixture(scope="module")
def engine_with_lora(tiny_settings_factory, ip_dir: Path, lora_dir: Path) -> Engine:
    """An engine of its own: once PEFT's layers are in a UNet (switched off between LoRA
    batches), its renders match stock diffusers within the LoRA tests' 1 in 255
    (test_loras_engine.py), no longer to the bit."""
    settings = tiny_settings_factory(ip_adapter_dir=ip_dir, lora_dir=lora_dir)
    return Engine.load(EngineConfig.of(settings))


def params(*adapters: IpAdapterWeight, **overrides: Any) -> RenderParams:
    values: dict[str, Any] = {
        "num_inference_steps": 6,
        "high_noise_frac": HIGH_NOISE_FRAC,
        "ip_adapters": adapters,
    }
    return make_params(**{**values, **overrides})


def ours(
    engine: Engine,
    p: RenderParams,
    images: tuple[tuple[RgbPicture, ...], ...],
    *,
    init: bytes | None = None,
    mask: bytes | None = None,
    seeds: tuple[int, ...] = SEEDS,
) -> list[np.ndarray]:
    tasks = [
        ImageTask(prompt=PROMPT, seed=seed, init_image=init, mask=mask, ip_adapter_images=images)
        for seed in seeds
    ]
    return [pixels(image) for image in engine.render(RenderBatch(params=p, tasks=tasks))]


@pytest.fixture(scope="module")
def before_any_adapter(engine: Engine) -> list[np.ndarray]:
    return ours(engine, params(), ())


def stock_pipeline(cls: Any, engine: Engine, tiny_pair: tuple[Path, Path]) -> Any:
    """diffusers' `cls` over the tiny base loaded again (its own UNet to load adapters into),
    sharing nothing that an adapter changes with the engine."""
    return cls.from_pretrained(tiny_pair[0], torch_dtype=torch.float32).to("cpu")


def stock(
    engine: Engine,
    pipeline: Any,
    ip_dir: Path,
    adapters: list[tuple[str, str, float]],
    images: list[list[Image.Image]],
    arguments: dict[str, Any],
    *,
    refiner: bool,
) -> list[np.ndarray]:
    """The adapters as diffusers documents them: load_ip_adapter (subfolder, weight name),
    set_ip_adapter_scale, ip_adapter_image; then the refiner's share from the base's latents."""
    if adapters:
        pipeline.load_ip_adapter(
            str(ip_dir),
            subfolder=[subfolder for subfolder, _, _ in adapters],
            weight_name=[f"{name}.safetensors" for _, name, _ in adapters],
        )
        pipeline.set_ip_adapter_scale([scale for _, _, scale in adapters])
    pipeline.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in SEEDS]
    common = {
        "num_inference_steps": 6,
        "guidance_scale": 5.0,
        "generator": generators,
        "output_type": "latent",
    }
    with torch.inference_mode():
        pipeline.scheduler = make_scheduler("euler", engine._base_scheduler_config)
        pictures = {"ip_adapter_image": images} if adapters else {}
        latents = pipeline(
            prompt=[PROMPT] * len(SEEDS),
            **pictures,
            denoising_end=HIGH_NOISE_FRAC if refiner else None,
            **arguments,
            **common,
        ).images
        if refiner:
            engine.refiner.scheduler = make_scheduler("euler", engine._refiner_scheduler_config)
            latents = engine.refiner(
                prompt=[PROMPT] * len(SEEDS),
                image=latents,
                denoising_start=HIGH_NOISE_FRAC,
                **common,
            ).images
        return [pixels(image) for image in engine.latent_codec.decode(latents)]


def assert_same(ours: list[np.ndarray], theirs: list[np.ndarray]) -> None:
    differences = [int(np.abs(a - b).max()) for a, b in zip(ours, theirs, strict=True)]
    assert max(differences) == 0, f"max pixel differences per image: {differences}"


PLAIN = IpAdapterWeight(name="ip-adapter_sdxl", scale=0.6)


@pytest.mark.parametrize("refiner", [RefinerMode.NONE, RefinerMode.ENSEMBLE])
def test_text_to_image_matches_stock_diffusers(
    engine: Engine, ip_dir: Path, tiny_pair: tuple[Path, Path], refiner: RefinerMode
) -> None:
    images = (picture(1),)
    got = ours(engine, params(PLAIN, refiner=refiner), (images,))
    pipeline = stock_pipeline(StableDiffusionXLPipeline, engine, tiny_pair)
    expected = stock(
        engine,
        pipeline,
        ip_dir,
        [("sdxl_models", "ip-adapter_sdxl", 0.6)],
        [[pil(one) for one in images]],
        {"width": SIZE, "height": SIZE},
        refiner=refiner is RefinerMode.ENSEMBLE,
    )
    assert_same(got, expected)


def test_plus_adapters_with_several_images_match_stock_diffusers(
    engine: Engine, ip_dir: Path, tiny_pair: tuple[Path, Path]
) -> None:
    """Two adapters at once (a plus one reads hidden states), three pictures for one."""
    adapters = (
        IpAdapterWeight(name="ip-adapter-plus_sdxl", scale=0.9, images=3),
        IpAdapterWeight(name="ip-adapter_sdxl", scale=0.4),
    )
    images = ((picture(2), picture(3, 64, 64), picture(4, 80, 24)), (picture(5),))
    got = ours(engine, params(*adapters, refiner=RefinerMode.NONE), images)
    pipeline = stock_pipeline(StableDiffusionXLPipeline, engine, tiny_pair)
    expected = stock(
        engine,
        pipeline,
        ip_dir,
        [("sdxl_models", "ip-adapter-plus_sdxl", 0.9), ("sdxl_models", "ip-adapter_sdxl", 0.4)],
        [[pil(one) for one in group] for group in images],
        {"width": SIZE, "height": SIZE},
        refiner=False,
    )
    assert_same(got, expected)


@pytest.mark.parametrize("kind", [RenderKind.IMAGE_TO_IMAGE, RenderKind.INPAINT])
def test_edits_match_stock_diffusers(
    engine: Engine, ip_dir: Path, tiny_pair: tuple[Path, Path], kind: RenderKind
) -> None:
    init = noise_picture(9)
    mask = LEFT_HALF if kind is RenderKind.INPAINT else None
    images = (picture(7),)
    p = params(PLAIN, kind=kind, strength=0.75, refiner=RefinerMode.NONE)
    got = ours(engine, p, (images,), init=init, mask=mask)
    cls = StableDiffusionXLInpaintPipeline if mask else StableDiffusionXLImg2ImgPipeline
    arguments: dict[str, Any] = {
        "image": [Image.frombytes("RGB", (SIZE, SIZE), init)] * len(SEEDS),
        "strength": 0.75,
    }
    if mask is not None:
        mask_image = Image.frombytes("L", (SIZE, SIZE), mask)
        arguments |= {"mask_image": [mask_image] * len(SEEDS), "width": SIZE, "height": SIZE}
    expected = stock(
        engine,
        stock_pipeline(cls, engine, tiny_pair),
        ip_dir,
        [("sdxl_models", "ip-adapter_sdxl", 0.6)],
        [[pil(one) for one in images]],
        arguments,
        refiner=False,
    )
    assert_same(got, expected)


def test_vit_h_adapter_takes_the_encoder_of_models(
    engine: Engine, ip_dir: Path, tiny_pair: tuple[Path, Path]
) -> None:
    adapter = IpAdapterWeight(name="ip-adapter-plus_sdxl_vit-h", scale=1.0)
    images = (picture(8),)
    got = ours(engine, params(adapter, refiner=RefinerMode.NONE), (images,))
    pipeline = stock_pipeline(StableDiffusionXLPipeline, engine, tiny_pair)
    pipeline.load_ip_adapter(
        str(ip_dir),
        subfolder="sdxl_models",
        weight_name="ip-adapter-plus_sdxl_vit-h.safetensors",
        image_encoder_folder="models/image_encoder",
    )
    expected = stock(
        engine,
        pipeline,
        ip_dir,
        [],
        [],
        {"width": SIZE, "height": SIZE, "ip_adapter_image": [pil(one) for one in images]},
        refiner=False,
    )
    assert_same(got, expected)


def test_each_image_of_a_batch_has_its_own_pictures(engine: Engine) -> None:
    """Two requests' images in one call give what each gives alone: diffusers' pipelines would
    tile per-image embeddings batch-size times (engine/ip_adapters.py, image_embeds)."""
    groups = [(picture(11),), (picture(12),)]
    p = params(PLAIN, refiner=RefinerMode.NONE)
    tasks = [
        ImageTask(prompt=PROMPT, seed=seed, ip_adapter_images=(group,))
        for seed, group in zip(SEEDS, groups, strict=True)
    ]
    together = [pixels(image) for image in engine.render(RenderBatch(params=p, tasks=tasks))]
    alone = [
        ours(engine, p, (group,), seeds=(seed,))[0]
        for seed, group in zip(SEEDS, groups, strict=True)
    ]
    # The engine's batch tolerance (test_engine.py): an image alone and in a batch.
    for image, single in zip(together, alone, strict=True):
        assert np.allclose(image, single, atol=2)
    swapped = ours(engine, p, (groups[1],), seeds=(SEEDS[0],))[0]
    assert np.abs(together[0] - swapped).mean() > 1.0


def test_without_adapters_the_pixels_are_those_before_any_was_loaded(
    engine: Engine, before_any_adapter: list[np.ndarray]
) -> None:
    processors = {name: type(p) for name, p in engine.base.unet.attn_processors.items()}
    with_adapter = ours(engine, params(PLAIN), ((picture(1),),))
    assert engine.ip_adapters.loaded()
    assert_same(ours(engine, params(), ()), before_any_adapter)
    assert {name: type(p) for name, p in engine.base.unet.attn_processors.items()} == processors
    assert engine.base.unet.encoder_hid_proj is None
    assert np.abs(with_adapter[0] - before_any_adapter[0]).mean() > 1.0


def test_scale_zero_renders_the_image_without_adapter(
    engine: Engine, before_any_adapter: list[np.ndarray]
) -> None:
    zero = IpAdapterWeight(name="ip-adapter_sdxl", scale=0.0)
    assert_same(ours(engine, params(zero), ((picture(1),),)), before_any_adapter)


def test_least_recently_used_adapter_is_unloaded(engine: Engine, metrics: ServiceMetrics) -> None:
    for name in ("ip-adapter_sdxl", "ip-adapter-plus_sdxl", "ip-adapter_sdxl_vit-h"):
        ours(
            engine,
            params(IpAdapterWeight(name=name, scale=0.5), refiner=RefinerMode.NONE),
            ((picture(1),),),
            seeds=(1,),
        )
    assert engine.ip_adapters.loaded() == ["ip-adapter-plus_sdxl", "ip-adapter_sdxl_vit-h"]
    resident = metrics.registry.get_sample_value("sdxl_ip_adapters_resident", {"worker": "1"})
    assert resident == 2
    # The bigG encoder stays for the plus adapter; the ViT-H one for the vit-h adapter.
    assert len(engine.ip_adapters._encoders) == 2


def test_unusable_adapters_fail_leaving_nothing_loaded(
    engine: Engine, ip_dir: Path, metrics: ServiceMetrics
) -> None:
    loaded = engine.ip_adapters.loaded()
    # Shaped for another UNet (cross-attention 96 wide): the catalog cannot tell, loading can.
    save_adapter(
        ip_dir / "sdxl_models" / "wrong-unet.safetensors",
        adapter_weights("ip-adapter", BIG_G, 20, cross_attention_dim=96),
    )
    failed = metrics.registry.get_sample_value("sdxl_ip_adapter_loads_total", {"outcome": "failed"})
    for name in ("wrong-unet", "ip-adapter_sd15", "missing"):
        with pytest.raises(InvalidIpAdapter, match=name):
            ours(engine, params(IpAdapterWeight(name=name, scale=0.5)), ((picture(1),),))
    assert engine.ip_adapters.loaded() == loaded
    assert engine.base.unet.encoder_hid_proj is None
    after = metrics.registry.get_sample_value("sdxl_ip_adapter_loads_total", {"outcome": "failed"})
    assert after == (failed or 0) + 1


def test_a_requests_pictures_are_encoded_once_for_all_its_images_and_passes(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """n images, and the hires fix's two passes, share one encoding of the request's pictures."""
    encodes: list[int] = []
    encode = engine.ip_adapters._encode

    def counted(loaded: Any, pictures: Any) -> Any:
        encodes.append(len(pictures))
        return encode(loaded, pictures)

    monkeypatch.setattr(engine.ip_adapters, "_encode", counted)
    hires = HiresParams(
        first_width=64,
        first_height=64,
        scale=2.0,
        steps=4,
        denoising_strength=0.5,
        upscaler=HiresUpscaler.LATENT,
    )
    adapter = IpAdapterWeight(name="ip-adapter_sdxl", scale=0.6, images=2)
    p = params(adapter, width=128, height=128, hires=hires, refiner=RefinerMode.NONE)
    images = ours(engine, p, ((picture(1), picture(2)),), seeds=(1, 2, 3))
    assert [image.shape for image in images] == [(128, 128, 3)] * 3
    assert encodes == [2]


def test_with_a_lora_matches_stock_diffusers(
    engine_with_lora: Engine, ip_dir: Path, lora_dir: Path, tiny_pair: tuple[Path, Path]
) -> None:
    """An IP-Adapter and a LoRA in one request: diffusers' load_lora_weights + set_adapters,
    then load_ip_adapter, on the same pipeline."""
    engine = engine_with_lora
    images = (picture(13),)
    p = params(PLAIN, loras=(LoraWeight(name="style", scale=0.8),), refiner=RefinerMode.NONE)
    got = ours(engine, p, (images,))
    pipeline = stock_pipeline(StableDiffusionXLPipeline, engine, tiny_pair)
    weights = load_file(lora_dir / "style" / "pytorch_lora_weights.safetensors")
    pipeline.load_lora_weights(weights, adapter_name="stock")
    pipeline.set_adapters(["stock"], adapter_weights=[0.8])
    expected = stock(
        engine,
        pipeline,
        ip_dir,
        [("sdxl_models", "ip-adapter_sdxl", 0.6)],
        [[pil(one) for one in images]],
        {"width": SIZE, "height": SIZE},
        refiner=False,
    )
    assert_same(got, expected)
    without_lora = ours(engine, params(PLAIN, refiner=RefinerMode.NONE), (images,))
    assert np.abs(got[0] - without_lora[0]).mean() > 1.0
