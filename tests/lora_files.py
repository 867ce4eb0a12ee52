"""LoRA files for the tests, made by PEFT on the tiny SDXL base: diffusers and kohya format.

Built on copies of the base's modules read from its folder; a loaded engine's
modules are never touched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def peft_layers(model: Any, targets: list[str], seed: int) -> dict[str, torch.Tensor]:
    """A rank-4 LoRA of `model` with random (non-zero) up and down weights."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False)
    model.add_adapter(config)
    layers: dict[str, torch.Tensor] = get_peft_model_state_dict(model)
    # Big enough that the tiny models' images move by more than a few levels.
    return {key: value * 3 for key, value in layers.items()}


def unet_layers(base_dir: Path, seed: int) -> dict[str, torch.Tensor]:
    from diffusers import UNet2DConditionModel

    return peft_layers(UNet2DConditionModel.from_pretrained(base_dir / "unet"), UNET_TARGETS, seed)


def text_encoder_2_layers(base_dir: Path, seed: int) -> dict[str, torch.Tensor]:
    from transformers import CLIPTextModelWithProjection

    encoder = CLIPTextModelWithProjection.from_pretrained(base_dir / "text_encoder_2")
    return peft_layers(encoder, TEXT_TARGETS, seed)


def sd15_shaped_layers(base_dir: Path, seed: int) -> dict[str, torch.Tensor]:
    """An SD 1.5 LoRA's cross-attention reads 768-wide text states: shapes SDXL has not."""
    return {
        key: torch.randn(4, 768) if "attn2.to_k.lora_A" in key else value
        for key, value in unet_layers(base_dir, seed).items()
    }


def save_diffusers(folder: Path, name: str, **layers: dict[str, torch.Tensor]) -> Path:
    """`<folder>/<name>/pytorch_lora_weights.safetensors`, as `save_lora_weights` writes it."""
    from diffusers import StableDiffusionXLPipeline

    StableDiffusionXLPipeline.save_lora_weights(folder / name, **layers)
    return folder / name / "pytorch_lora_weights.safetensors"


def save_kohya(folder: Path, name: str, unet: dict[str, torch.Tensor]) -> Path:
    """`<folder>/<name>.safetensors` in kohya's format (lora_unet_…, lora_down/up, alpha)."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    kohya = convert_state_dict_to_kohya({f"unet.{key}": value for key, value in unet.items()})
    assert all(key.startswith("lora_unet_") for key in kohya)
    path = folder / f"{name}.safetensors"
    save_file({key: value.contiguous() for key, value in kohya.items()}, path)
    return path
