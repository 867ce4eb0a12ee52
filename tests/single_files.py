"""The tests' own conversion of diffusers pipelines into single-file checkpoints.

The inverse of diffusers' SDXL single-file key mapping (diffusers/loaders/single_file_utils.py:
convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint,
convert_open_clip_checkpoint), for any UNet depth and width, so that the tiny pair can be
written in the original (AUTOMATIC1111 / Civitai / sd_xl_base_1.0.safetensors) layout:
UNet `model.diffusion_model.*`, VAE `first_stage_model.*`, CLIP ViT-L
`conditioner.embedders.0.transformer.*`, OpenCLIP bigG `conditioner.embedders.1.model.*`
(the refiner's `conditioner.embedders.0.model.*`) with its attention's q, k and v fused.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

Tensors = dict[str, torch.Tensor]

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _resnet_part(rest: str) -> str:
    name, _, tail = rest.partition(".")
    return f"{_RESNET.get(name, name)}.{tail}"


def unet_to_original(state: Tensors, config: dict[str, Any]) -> Tensors:
    per_block = int(config["layers_per_block"])
    blocks = len(config["block_out_channels"])
    has_attention_up = ["CrossAttn" in kind for kind in config["up_block_types"]]
    out: Tensors = {}
    for key, tensor in state.items():
        module, _, param = key.rpartition(".")
        if module in _UNET_TOP:
            new = f"{_UNET_TOP[module]}.{param}"
        elif match := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            block, part, layer, rest = match.groups()
            index = 1 + int(block) * (per_block + 1) + int(layer)
            new = (
                f"input_blocks.{index}.0.{_resnet_part(rest)}"
                if part == "resnets"
                else f"input_blocks.{index}.1.{rest}"
            )
        elif match := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            block, rest = match.groups()
            new = f"input_blocks.{1 + int(block) * (per_block + 1) + per_block}.0.op.{rest}"
        elif match := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
            part, layer, rest = match.groups()
            if part == "resnets":
                new = f"middle_block.{2 * int(layer)}.{_resnet_part(rest)}"
            else:
                new = f"middle_block.1.{rest}"
        elif match := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            block, part, layer, rest = match.groups()
            index = int(block) * (per_block + 1) + int(layer)
            new = (
                f"output_blocks.{index}.0.{_resnet_part(rest)}"
                if part == "resnets"
                else f"output_blocks.{index}.1.{rest}"
            )
        elif match := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            block, rest = match.groups()
            index = int(block) * (per_block + 1) + per_block
            slot = 2 if has_attention_up[int(block)] else 1
            new = f"output_blocks.{index}.{slot}.conv.{rest}"
        else:
            raise KeyError(f"no original name for the UNet's {key}")
        out[f"model.diffusion_model.{new}"] = tensor
    assert blocks == len(config["up_block_types"])
    return out


_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
_VAE_TOP = {
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_norm_out": "decoder.norm_out",
}


def vae_to_original(state: Tensors, config: dict[str, Any], prefix: str = "") -> Tensors:
    """A VAE in the original layout; `prefix` "first_stage_model." inside a checkpoint, ""
    for a VAE file of its own (as VAEs on Civitai come)."""
    up_blocks = len(config["up_block_types"])
    out: Tensors = {}
    for key, tensor in state.items():
        new = key
        if match := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(\w+)$", key):
            side, module, param = match.groups()
            new = f"{side}.mid.attn_1.{_VAE_ATTENTION[module]}.{param}"
            if tensor.dim() == 2:  # the original's 1x1 convolutions
                tensor = tensor[:, :, None, None]
        elif match := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            side, layer, rest = match.groups()
            new = f"{side}.mid.block_{int(layer) + 1}.{rest}"
        elif match := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = "encoder.down.{}.block.{}.{}".format(*match.groups())
        elif match := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
            new = "encoder.down.{}.downsample.{}".format(*match.groups())
        elif match := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            block, layer, rest = match.groups()
            new = f"decoder.up.{up_blocks - 1 - int(block)}.block.{layer}.{rest}"
        elif match := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
            block, rest = match.groups()
            new = f"decoder.up.{up_blocks - 1 - int(block)}.upsample.{rest}"
        else:
            module, _, param = key.rpartition(".")
            new = f"{_VAE_TOP.get(module, module)}.{param}"
        out[prefix + new.replace("conv_shortcut", "nin_shortcut")] = tensor
    return out


def clip_to_original(state: Tensors) -> Tensors:
    """CLIP ViT-L (transformers' CLIPTextModel) as conditioner.embedders.0.transformer."""
    return {
        f"conditioner.embedders.0.transformer.text_model.{key.removeprefix('text_model.')}": value
        for key, value in state.items()
    }


_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def open_clip_to_original(state: Tensors, prefix: str) -> Tensors:
    """OpenCLIP bigG (CLIPTextModelWithProjection) under `prefix`, q/k/v fused into in_proj."""
    out: Tensors = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        key = key.removeprefix("text_model.")
        if key == "embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = tensor
        elif key == "embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = tensor
        elif key.startswith("final_layer_norm."):
            out[prefix + key.replace("final_layer_norm", "ln_final")] = tensor
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = tensor.T.contiguous()
        elif match := re.match(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(\w+)", key):
            layer, which, param = match.groups()
            fused.setdefault(f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{param}", {})[
                which
            ] = tensor
        elif match := re.match(r"encoder\.layers\.(\d+)\.(.+)\.(\w+)$", key):
            layer, module, param = match.groups()
            name = _OPEN_CLIP_LAYER[module]
            out[f"{prefix}transformer.resblocks.{layer}.{name}.{param}"] = tensor
        else:
            raise KeyError(f"no original name for the OpenCLIP encoder's {key}")
    for name, parts in fused.items():
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def pipeline_to_original(pipeline: Any, *, refiner: bool) -> Tensors:
    """A base or refiner pipeline's modules as one original-layout state dict."""
    tensors = unet_to_original(pipeline.unet.state_dict(), dict(pipeline.unet.config))
    tensors |= vae_to_original(
        pipeline.vae.state_dict(), dict(pipeline.vae.config), prefix="first_stage_model."
    )
    if refiner:
        tensors |= open_clip_to_original(
            pipeline.text_encoder_2.state_dict(), "conditioner.embedders.0.model."
        )
    else:
        tensors |= clip_to_original(pipeline.text_encoder.state_dict())
        tensors |= open_clip_to_original(
            pipeline.text_encoder_2.state_dict(), "conditioner.embedders.1.model."
        )
    return tensors


def save_checkpoint(tensors: Tensors, path: Path) -> Path:
    # safetensors refuses shared storage; the converted tensors may be views of the modules'.
    save_file({key: value.detach().clone().contiguous() for key, value in tensors.items()}, path)
    return path


def write_single_files(base_dir: Path, refiner_dir: Path, out: Path) -> tuple[Path, Path]:
    """The pair of diffusers folders `base_dir`, `refiner_dir` as two checkpoint files."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    base = StableDiffusionXLPipeline.from_pretrained(base_dir, use_safetensors=True)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_dir, use_safetensors=True)
    out.mkdir(parents=True, exist_ok=True)
    return (
        save_checkpoint(pipeline_to_original(base, refiner=False), out / "base.safetensors"),
        save_checkpoint(pipeline_to_original(refiner, refiner=True), out / "refiner.safetensors"),
    )
