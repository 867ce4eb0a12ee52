"""ControlNet and IP-Adapter in one render give, seed for seed, what stock diffusers' ControlNet
pipeline gives with `load_ip_adapter` and `ip_adapter_image=` (tiny random models: the tests'
ControlNets and IP-Adapters). The two features were built apart; this holds them together,
including a batch of two images (each image must take one row of the adapter's embeddings,
not the whole batch's: the ControlNet pipeline, too, tiles `ip_adapter_image_embeds` per
image unless told not to).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

from sdxl_service.choices import RefinerMode, RenderKind
from sdxl_service.contract.render_request import ControlNetParams, IpAdapterWeight
from sdxl_service.engine import Engine
from sdxl_service.engine.config import EngineConfig
from sdxl_service.engine.render_batch import ImageTask
from sdxl_service.engine.schedulers import make_scheduler
from tests.controlnet_files import save_controlnets
from tests.ip_adapter_files import build_folder

from .test_controlnet_parity import SEEDS, SIZE, control_picture, ours_latents, params, rgb
from .test_ip_adapters_engine import picture, pil

PROMPT = "a red fox in the snow"


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, tiny_pair: tuple[Path, Path]) -> dict:
    return {
        "controlnet_dir": save_controlnets(tmp_path_factory.mktemp("cn"), tiny_pair[0]),
        "ip_adapter_dir": build_folder(tmp_path_factory.mktemp("ip")),
    }


@pytest.fixture(scope="module")
def engine(tiny_settings_factory: Any, folders: dict) -> Engine:
    return Engine.load(EngineConfig.of(tiny_settings_factory(**folders)))


EDGES = ControlNetParams(name="edges", scale=0.9, start=0.1, end=0.9)
PLAIN = IpAdapterWeight(name="ip-adapter_sdxl", scale=0.6)


def test_a_controlnet_and_an_ip_adapter_together_are_stock_diffusers(
    engine: Engine, folders: dict, tiny_pair: tuple[Path, Path]
) -> None:
    p = params(RenderKind.TEXT_TO_IMAGE, RefinerMode.NONE, EDGES).model_copy(
        update={"ip_adapters": (PLAIN,)}
    )
    style = (picture(3),)
    batch = [
        ImageTask(
            prompt=PROMPT,
            seed=seed,
            control_images=(control_picture(seed),),
            ip_adapter_images=(style,),
        )
        for seed in SEEDS
    ]
    with torch.inference_mode():
        ours = ours_latents(engine, p, batch)
    # Stock: the tiny base loaded again (load_ip_adapter changes its UNet, not the engine's).
    stock = StableDiffusionXLControlNetPipeline.from_pretrained(
        tiny_pair[0],
        controlnet=ControlNetModel.from_pretrained(folders["controlnet_dir"] / "edges"),
        torch_dtype=torch.float32,
    )
    stock.load_ip_adapter(
        str(folders["ip_adapter_dir"]),
        subfolder="sdxl_models",
        weight_name="ip-adapter_sdxl.safetensors",
    )
    stock.set_ip_adapter_scale(0.6)
    stock.set_progress_bar_config(disable=True)
    stock.scheduler = make_scheduler(p.scheduler, engine._base_scheduler_config)
    with torch.inference_mode():
        theirs = stock(
            prompt=[PROMPT] * len(SEEDS),
            image=[rgb(task.control_images[0]) for task in batch],
            ip_adapter_image=[[pil(one) for one in style]],
            controlnet_conditioning_scale=0.9,
            control_guidance_start=0.1,
            control_guidance_end=0.9,
            width=SIZE,
            height=SIZE,
            num_inference_steps=p.num_inference_steps,
            guidance_scale=p.guidance_scale,
            generator=[torch.Generator("cpu").manual_seed(seed) for seed in SEEDS],
            output_type="latent",
        ).images
    assert torch.equal(ours, theirs)
    # And the adapter counts: without it the same ControlNet render differs.
    without = p.model_copy(update={"ip_adapters": ()})
    plain_batch = [
        ImageTask(prompt=PROMPT, seed=task.seed, control_images=task.control_images)
        for task in batch
    ]
    with torch.inference_mode():
        assert not torch.equal(ours_latents(engine, without, plain_batch), ours)
