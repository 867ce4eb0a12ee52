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


def test_ip_adapter_is_h94s_layout_and_loads_through_diffusers(tmp_path: Path) -> None:
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    from sdxl_service.ip_adapter_catalog import IpAdapterCatalog

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**base_unet_config())
    counts = gpu_controls.save_ip_adapter(
        unet, tmp_path, smoke=True, device="cpu", dtype=torch.float32
    )
    assert counts["adapter_parameters"] > 0 and counts["encoder_parameters"] > 0
    entry = IpAdapterCatalog(tmp_path).find(gpu_controls.IP_ADAPTER)
    assert entry is not None and entry.problem is None
    assert entry.encoder == tmp_path / "sdxl_models" / "image_encoder"

    # diffusers' loader, as engine/ip_adapters.py calls it: every shape checked against the UNet.
    weights = gpu_controls.ip_adapter_weights(unet, 40, device="cpu", dtype=torch.float32)
    parts: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in weights.items():
        part, _, rest = key.partition(".")
        parts[part][rest] = value
    processors = unet._convert_ip_adapter_attn_to_diffusers([parts], low_cpu_mem_usage=False)
    unet._convert_ip_adapter_image_proj_to_diffusers(parts["image_proj"], low_cpu_mem_usage=False)
    cross_attentions = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    adapters = [n for n, p in processors.items() if isinstance(p, IPAdapterAttnProcessor2_0)]
    assert adapters == cross_attentions
