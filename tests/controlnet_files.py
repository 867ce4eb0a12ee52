"""Tiny ControlNets for the tests, made from the tiny base's UNet: a diffusers folder, single
.safetensors files (a plain one and a Union one), one whose weights fit no base, and an
SD 1.5-shaped folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import ControlNetModel, ControlNetUnionModel, UNet2DConditionModel
from safetensors.torch import save_file

# What diffusers initialises to zero (so a fresh ControlNet adds nothing, and its control
# image changes nothing), and a Union model's task embedding.
ZERO_INITIALISED = (
    "controlnet_down_blocks",
    "controlnet_mid_block",
    "controlnet_cond_embedding",
    "spatial_ch_projs",
    "task_embedding",
)


def randomized(model: Any, seed: int) -> Any:
    """`model` with random weights where diffusers puts zeros: at zero they would add nothing,
    and a test of them (or of their control image) could not fail."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.startswith(ZERO_INITIALISED):
                # The control image's way in, all of it: with diffusers' own small weights
                # there, different control images changed the tiny latents by thousandths.
                scale = 1.0 if name.startswith("controlnet_cond_embedding") else 0.3
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return model


def union_from(unet: Any) -> Any:
    """A ControlNetUnionModel for `unet` (the Union transformer's width is the first block's:
    SDXL's 320, the tiny UNet's 16), 8 control types as ProMax."""
    sizes = {"num_trans_channel": 16, "num_proj_channel": 16, "num_control_type": 8}
    config = ControlNetUnionModel.from_unet(unet).config
    union = ControlNetUnionModel.from_config(
        {**{k: v for k, v in config.items() if not k.startswith("_")}, **sizes}
    )
    union.load_state_dict(ControlNetModel.from_unet(unet).state_dict(), strict=False)
    return union


def save_controlnets(folder: Path, base_dir: Path) -> Path:
    """`edges/` (a diffusers folder), `depth.safetensors`, `union.safetensors`,
    `broken.safetensors` (a tensor missing) and `sd15/` (an SD 1.5 config) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    unet = UNet2DConditionModel.from_pretrained(base_dir / "unet")
    randomized(ControlNetModel.from_unet(unet), 1).save_pretrained(folder / "edges")
    single = randomized(ControlNetModel.from_unet(unet), 2)
    save_file(single.state_dict(), folder / "depth.safetensors")
    save_file(randomized(union_from(unet), 3).state_dict(), folder / "union.safetensors")
    state = single.state_dict()
    state.pop("controlnet_mid_block.weight")
    save_file(state, folder / "broken.safetensors")
    (folder / "sd15").mkdir()
    sd15 = {"_class_name": "ControlNetModel", "cross_attention_dim": 768}
    (folder / "sd15" / "config.json").write_text(json.dumps(sd15))
    (folder / "sd15" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    return folder
