"""Tiny IP-Adapters with random weights, in h94/IP-Adapter's layout (SDXL_IP_ADAPTER_DIR).

`sdxl_models/<name>.safetensors` beside `sdxl_models/image_encoder/` (a tiny
`CLIPVisionModelWithProjection` standing for ViT-bigG), `models/image_encoder/` (another, for
the `vit-h` adapters) and an SD 1.5-shaped adapter in `models/`. The adapters' state dicts are
the original IP-Adapter files' (`image_proj.*`, `ip_adapter.<n>.to_k_ip.weight`), shaped for the
tiny base UNet: what diffusers' `load_ip_adapter` reads.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from sdxl_service.engine.tiny import base_unet_config

# bigG stands-in: width 48 (hidden) and 40 (projection); ViT-H ones: 24 and 16.
BIG_G = {"hidden_size": 48, "projection_dim": 40}
VIT_H = {"hidden_size": 24, "projection_dim": 16}
PLUS_TOKENS = 6


def _cross_attention_layers(cross_attention_dim: int) -> list[tuple[int, int]]:
    """(key id, hidden size) of each cross-attention layer, in diffusers' order."""
    unet = UNet2DConditionModel(**base_unet_config())
    blocks = unet.config.block_out_channels
    layers, key_id = [], 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = blocks[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(blocks))[int(name[len("up_blocks.")])]
        else:
            hidden = blocks[int(name[len("down_blocks.")])]
        layers.append((key_id, hidden))
        key_id += 2
    return layers


def tiny_cross_attention_dim() -> int:
    return int(base_unet_config()["cross_attention_dim"])


def save_encoder(folder: Path, widths: dict[str, int], seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        image_size=32,
        patch_size=8,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        **widths,
    )
    CLIPVisionModelWithProjection(config).save_pretrained(folder, safe_serialization=True)
    return folder


def adapter_weights(
    kind: str, encoder: dict[str, int], seed: int, cross_attention_dim: int | None = None
) -> dict[str, torch.Tensor]:
    """An adapter's state dict as the original files hold it: `ip-adapter` (the pooled
    embedding through a linear projection) or `plus` (a resampler over hidden states)."""
    generator = torch.Generator().manual_seed(seed)
    dim = cross_attention_dim or tiny_cross_attention_dim()

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.2

    weights: dict[str, torch.Tensor] = {}
    if kind == "ip-adapter":
        weights |= {
            "image_proj.proj.weight": rand(4 * dim, encoder["projection_dim"]),
            "image_proj.proj.bias": rand(4 * dim),
            "image_proj.norm.weight": 1 + rand(dim),
            "image_proj.norm.bias": rand(dim),
        }
    else:
        # The Resampler of IP-Adapter Plus: width 64 (one head of 64), 4 layers, ff x4.
        width, inner = 64, 64
        weights |= {
            "image_proj.latents": rand(1, PLUS_TOKENS, width),
            "image_proj.proj_in.weight": rand(width, encoder["hidden_size"]),
            "image_proj.proj_in.bias": rand(width),
            "image_proj.proj_out.weight": rand(dim, width),
            "image_proj.proj_out.bias": rand(dim),
            "image_proj.norm_out.weight": 1 + rand(dim),
            "image_proj.norm_out.bias": rand(dim),
        }
        for i in range(4):
            layer = f"image_proj.layers.{i}"
            weights |= {
                f"{layer}.0.norm1.weight": 1 + rand(width),
                f"{layer}.0.norm1.bias": rand(width),
                f"{layer}.0.norm2.weight": 1 + rand(width),
                f"{layer}.0.norm2.bias": rand(width),
                f"{layer}.0.to_q.weight": rand(inner, width),
                f"{layer}.0.to_kv.weight": rand(2 * inner, width),
                f"{layer}.0.to_out.weight": rand(width, inner),
                f"{layer}.1.0.weight": 1 + rand(width),
                f"{layer}.1.0.bias": rand(width),
                f"{layer}.1.1.weight": rand(4 * width, width),
                f"{layer}.1.3.weight": rand(width, 4 * width),
            }
    for key_id, hidden in _cross_attention_layers(dim):
        weights[f"ip_adapter.{key_id}.to_k_ip.weight"] = rand(hidden, dim)
        weights[f"ip_adapter.{key_id}.to_v_ip.weight"] = rand(hidden, dim)
    return weights


def save_adapter(path: Path, weights: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in weights.items()}, path)
    return path


def build_folder(root: Path) -> Path:
    """h94's layout with tiny models: in `sdxl_models/`, `ip-adapter_sdxl` (plain, bigG),
    `ip-adapter-plus_sdxl` (plus, bigG), `ip-adapter-plus_sdxl_vit-h` (plus, ViT-H) and
    `ip-adapter_sdxl_vit-h` (plain, ViT-H); in `models/`, the ViT-H encoder and
    `ip-adapter_sd15` (SD 1.5's 768-wide cross-attention)."""
    sdxl, sd15 = root / "sdxl_models", root / "models"
    save_encoder(sdxl / "image_encoder", BIG_G, seed=1)
    save_encoder(sd15 / "image_encoder", VIT_H, seed=2)
    save_adapter(sdxl / "ip-adapter_sdxl.safetensors", adapter_weights("ip-adapter", BIG_G, 3))
    save_adapter(sdxl / "ip-adapter-plus_sdxl.safetensors", adapter_weights("plus", BIG_G, 4))
    save_adapter(sdxl / "ip-adapter-plus_sdxl_vit-h.safetensors", adapter_weights("plus", VIT_H, 5))
    save_adapter(
        sdxl / "ip-adapter_sdxl_vit-h.safetensors", adapter_weights("ip-adapter", VIT_H, 6)
    )
    sd15_weights = {
        "image_proj.proj.weight": torch.zeros(4 * 768, 16),
        "ip_adapter.1.to_k_ip.weight": torch.zeros(320, 768),
        "ip_adapter.1.to_v_ip.weight": torch.zeros(320, 768),
    }
    save_adapter(sd15 / "ip-adapter_sd15.safetensors", sd15_weights)
    return root
