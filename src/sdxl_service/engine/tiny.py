"""The tiny preset: an SDXL base + refiner pair with random weights, built offline.

Same classes, same folder layout and the same conditioning shapes as
stabilityai/stable-diffusion-xl-{base,refiner}-1.0, only narrow, so that the
real loading and rendering code runs on a CPU in a fraction of a second. The
builders are `engine.components`', which the GPU bench uses for the
full-size pair from the published configs. Beside the pair, a narrow
AutoencoderTiny stands in for madebyollin/taesdxl (the taesd preview decoder).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .components import (
    BOS_TOKEN,
    CLIP_MAX_LENGTH,
    EOS_TOKEN,
    assemble_pipelines,
    build_modules,
    build_taesd,
    clip_vocab,
)

# Bump when any config below changes: the folder name is the cache key.
TINY_VERSION = "tiny-v3"
TINY_SEED = 20230726  # SDXL 1.0's release date; any fixed value works

# 32-wide text encoders: base cross-attention sees both concatenated (32 + 32),
# as SDXL concatenates 768 + 1280 into 2048.
TEXT_HIDDEN = 32
TEXT_PROJECTION = 32
TIME_EMBED_DIM = 8
BASE_TIME_IDS = 6  # original size, crop top-left, target size
REFINER_TIME_IDS = 5  # original size, crop top-left, aesthetic score

# Latents, mask, masked picture's latents: an inpainting checkpoint's UNet input.
INPAINT_IN_CHANNELS = 9

# Latent side 8 -> native 64 px: the tiny preset never renders above what a
# request asks for, which keeps CPU tests fast.
TINY_SAMPLE_SIZE = 8


def write_clip_tokenizer_files(folder: Path, pad_token: str = EOS_TOKEN) -> None:
    """A tokenizer folder as the SDXL repos ship it: vocab.json + merges.txt, no tokenizer.json."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in ("tokenizer.json", "special_tokens_map.json"):
        (folder / stale).unlink(missing_ok=True)
    (folder / "vocab.json").write_text(json.dumps(clip_vocab(), ensure_ascii=False))
    # No merges: every word is spelled byte by byte, which is all random weights need.
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer_config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": CLIP_MAX_LENGTH,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": pad_token,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def _text_config(*, hidden_act: str) -> dict[str, Any]:
    vocab = clip_vocab()
    return {
        "vocab_size": len(vocab),
        "hidden_size": TEXT_HIDDEN,
        "intermediate_size": 2 * TEXT_HIDDEN,
        "projection_dim": TEXT_PROJECTION,
        # Two layers at least: SDXL conditions on the penultimate hidden state.
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": CLIP_MAX_LENGTH,
        "hidden_act": hidden_act,
        "bos_token_id": vocab[BOS_TOKEN],
        "eos_token_id": vocab[EOS_TOKEN],
        "pad_token_id": vocab[EOS_TOKEN],
    }


def text_encoder_config() -> dict[str, Any]:
    # CLIP ViT-L's activation; SDXL's first text encoder.
    return _text_config(hidden_act="quick_gelu")


def text_encoder_2_config() -> dict[str, Any]:
    # OpenCLIP bigG's activation; SDXL's second (shared) text encoder.
    return _text_config(hidden_act="gelu")


# Both UNets put their attention two levels down (1/4 and 1/8 of the latent
# side) where SDXL's start at 1/2: attention over a 1024 px image's 64x64
# latent tokens would dominate a CPU step. A 1024 px, 30-step image then takes
# seconds, not half a minute, and a step (the cancellation grain) stays short.
_ATTENTION_DEEP_DOWN = [
    "DownBlock2D",
    "DownBlock2D",
    "CrossAttnDownBlock2D",
    "CrossAttnDownBlock2D",
]
_ATTENTION_DEEP_UP = ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"]


def _unet_config(**differences: Any) -> dict[str, Any]:
    """What the tiny base and refiner UNets share; each passes what SDXL's differ in."""
    return {
        "sample_size": TINY_SAMPLE_SIZE,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 1,
        "block_out_channels": [16, 32, 64, 64],
        "down_block_types": _ATTENTION_DEEP_DOWN,
        "up_block_types": _ATTENTION_DEEP_UP,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "attention_head_dim": [2, 2, 4, 4],
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": TIME_EMBED_DIM,
        "norm_num_groups": 16,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        **differences,
    }


def base_unet_config() -> dict[str, Any]:
    return _unet_config(
        # Deeper transformer stacks further down, as SDXL's [1, 2, 10].
        transformer_layers_per_block=[1, 1, 1, 2],
        # Both text encoders, concatenated.
        cross_attention_dim=2 * TEXT_HIDDEN,
        projection_class_embeddings_input_dim=TEXT_PROJECTION + BASE_TIME_IDS * TIME_EMBED_DIM,
    )


def base_inpaint_unet_config() -> dict[str, Any]:
    """The base's UNet as an inpainting checkpoint has it: 4 more input channels for the
    masked picture's latents and 1 for the mask (diffusers' SDXL inpainting 0.1)."""
    return base_unet_config() | {"in_channels": INPAINT_IN_CHANNELS}


def refiner_unet_config() -> dict[str, Any]:
    return _unet_config(
        transformer_layers_per_block=1,
        # text_encoder_2 only; aesthetic score instead of the target size.
        cross_attention_dim=TEXT_HIDDEN,
        projection_class_embeddings_input_dim=TEXT_PROJECTION + REFINER_TIME_IDS * TIME_EMBED_DIM,
    )


def vae_config() -> dict[str, Any]:
    # Four blocks, as SDXL's VAE: three downsamplings, scale factor 8. Narrow,
    # because the decoder's last block runs at full pixel resolution.
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": [8, 8, 16, 16],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "sample_size": TINY_SAMPLE_SIZE * 8,
        "scaling_factor": 0.13025,
        "force_upcast": True,
    }


def taesd_config() -> dict[str, Any]:
    """madebyollin/taesdxl's architecture (AutoencoderTiny's defaults), only narrow and shallow.

    Same latent API as the real one: SDXL's 4 latent channels, three x2
    upsamplings (x8, as the VAE), and scaling_factor 1.0: taesd decodes the
    UNet's latents as they are, where the SDXL VAE first divides them by 0.13025.
    """
    return {
        "in_channels": 3,
        "out_channels": 3,
        "encoder_block_out_channels": [8, 8, 8, 8],
        "decoder_block_out_channels": [8, 8, 8, 8],
        "num_encoder_blocks": [1, 1, 1, 1],
        "num_decoder_blocks": [1, 1, 1, 1],
        "latent_channels": 4,
        "upsampling_scaling_factor": 2,
        "scaling_factor": 1.0,
    }


def tiny_configs() -> dict[str, dict[str, Any]]:
    """The tiny pair's component configs, keyed like the GPU bench's bench/configs/*.json."""
    return {
        "base_unet": base_unet_config(),
        "refiner_unet": refiner_unet_config(),
        "vae": vae_config(),
        "text_encoder": text_encoder_config(),
        "text_encoder_2": text_encoder_2_config(),
    }


def build_tiny_pipelines() -> tuple[Any, Any]:
    """Random-weight base and refiner pipelines, identical on every call."""
    import torch

    # fork_rng: seeding must not leak into the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        modules = build_modules(tiny_configs())
    return assemble_pipelines(modules)


def build_tiny_taesd() -> Any:
    """The random-weight tiny AutoencoderTiny, identical on every call."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED + 1)
        return build_taesd(taesd_config())


def tiny_pair_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / TINY_VERSION


def tiny_taesd_dir(cache_dir: Path) -> Path:
    """The tiny preset's SDXL_PREVIEW_MODEL, written by `ensure_tiny_pair`."""
    return tiny_pair_dir(cache_dir) / "taesd"


def tiny_inpaint_configs(cache_dir: Path) -> Path:
    """The configs a tiny inpainting checkpoint file loads with: the tiny base folder's, its
    UNet's `in_channels` 9, without weights (from_single_file reads configs and tokenizers).

    Written once beside the pair, through a temporary folder renamed into place, as the pair.
    """
    base_dir, _ = ensure_tiny_pair(cache_dir)
    final = tiny_pair_dir(cache_dir) / "inpaint-configs"
    if (final / "model_index.json").is_file():
        return final
    staging = Path(tempfile.mkdtemp(prefix=".inpaint-configs-", dir=final.parent))
    try:
        shutil.copytree(
            base_dir, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors")
        )
        (staging / "unet" / "config.json").write_text(
            json.dumps(
                json.loads((base_dir / "unet" / "config.json").read_text())
                | {"in_channels": INPAINT_IN_CHANNELS},
                indent=2,
            )
            + "\n"
        )
        try:
            os.rename(staging, final)
        except OSError:
            if not (final / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def ensure_tiny_pair(cache_dir: Path) -> tuple[Path, Path]:
    """Build the tiny pair under `cache_dir` unless already there; return (base, refiner) folders.

    The tiny taesd is saved beside them (`tiny_taesd_dir`).

    Safe when several processes start at once: each builds in its own temporary
    folder and renames it into place; the first rename wins, the others discard
    their copy (the weights are identical anyway).
    """
    final = tiny_pair_dir(cache_dir)
    base_dir, refiner_dir = final / "base", final / "refiner"
    if (final / "COMPLETE").is_file():
        return base_dir, refiner_dir

    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{TINY_VERSION}-", dir=final.parent))
    try:
        base, refiner = build_tiny_pipelines()
        base.save_pretrained(staging / "base")
        refiner.save_pretrained(staging / "refiner")
        build_tiny_taesd().save_pretrained(staging / "taesd")
        write_clip_tokenizer_files(staging / "base" / "tokenizer")
        write_clip_tokenizer_files(staging / "base" / "tokenizer_2", pad_token="!")
        write_clip_tokenizer_files(staging / "refiner" / "tokenizer_2", pad_token="!")
        (staging / "COMPLETE").write_text(json.dumps({"version": TINY_VERSION}) + "\n")
        try:
            os.rename(staging, final)
        except OSError:
            # Another process renamed its identical copy into place first.
            if not (final / "COMPLETE").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return base_dir, refiner_dir
