"""The tests' tiny inpainting checkpoint: the tiny base with a UNet of 9 input channels.

Built as diffusers builds SDXL inpainting 0.1 (the base's components, its UNet taking the
latents, the mask and the masked picture's latents), with random weights of a fixed seed,
saved as a diffusers folder (StableDiffusionXLInpaintPipeline's model_index.json, as the
published repo) and as one checkpoint in the original layout (tests/single_files.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdxl_service.engine.tiny import base_inpaint_unet_config
from tests.single_files import pipeline_to_original, save_checkpoint

INPAINT_SEED = 90


def write_inpainting_model(base_dir: Path, folder: Path, file: Path | None = None) -> Path:
    """The tiny base of `base_dir` with a random 9-channel UNet, as the folder `folder` (and
    the checkpoint `file`, when given)."""
    from diffusers import StableDiffusionXLInpaintPipeline, UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INPAINT_SEED)
        unet = UNet2DConditionModel.from_config(base_inpaint_unet_config())
    pipeline = StableDiffusionXLInpaintPipeline.from_pretrained(
        base_dir, unet=unet, use_safetensors=True
    )
    pipeline.save_pretrained(folder)
    if file is not None:
        save_checkpoint(pipeline_to_original(pipeline, refiner=False), file)
    return folder
