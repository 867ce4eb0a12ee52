"""bench/gpu_controls.py on a CPU machine: the ControlNet it measures, built and served."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from bench import gpu_bench, gpu_controls
from sdxl_service.controlnet_catalog import ControlNetCatalog
from sdxl_service.engine.tiny import base_unet_config


def test_full_size_controlnet_has_sdxls_published_size() -> None:
    configs = gpu_bench.load_configs()
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["base_unet"])
        model = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    assert gpu_controls.parameters(model) == gpu_controls.FULL_SIZE_PARAMETERS


def test_controlnet_shares_the_unets_weights_and_has_none_at_zero(tmp_path: Path) -> None:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**base_unet_config())
    model = gpu_controls.build_controlnet(unet, device="cpu", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    # Where diffusers starts at zero (a unit would add nothing), small random weights.
    for name, parameter in model.named_parameters():
        if name.startswith(gpu_controls.ZERO_INITIALISED) and name.endswith("weight"):
            assert parameter.any(), name
    assert torch.equal(model.conv_in.weight, unet.conv_in.weight.to(torch.bfloat16))

    gpu_controls.save_controlnet(model, tmp_path)
    # What SDXL_CONTROLNET_DIR lists: the folder as a diffusers model named after it.
    entry = ControlNetCatalog(tmp_path).find(gpu_controls.CONTROLNET)
    assert entry is not None and entry.problem is None
    assert entry.format == "diffusers"
    assert not entry.union


def test_control_pictures_are_rgb_at_the_size_and_differ_per_unit() -> None:
    first, second = (gpu_controls.control_picture(1024, seed) for seed in (0, 1))
    assert len(first) == len(second) == 3 * 1024 * 1024
    assert first != second
    assert len(gpu_controls.control_picture(64, 0)) == 3 * 64 * 64
