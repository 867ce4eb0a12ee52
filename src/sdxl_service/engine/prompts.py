"""The base's text conditioning: prompt embeddings, image by image as SDXL base expects them."""

from __future__ import annotations

from typing import Any

import torch


def base_prompt_embeddings(
    base: Any, prompts: list[str], negative_prompts: list[str], guidance_scale: float
) -> dict[str, Any]:
    """Text embeddings for the `base` pipeline, with empty negatives zeroed image by image.

    diffusers zeroes the negative embeddings (force_zeros_for_empty_prompt,
    how SDXL base was tuned) only when no negative prompt is passed at all;
    done per image here so an image with no negative prompt is the same
    whether or not its batch neighbours have one.
    """
    do_guidance = guidance_scale > 1 and base.unet.config.time_cond_proj_dim is None
    embeds, negative_embeds, pooled, negative_pooled = base.encode_prompt(
        prompt=prompts,
        device=base._execution_device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=do_guidance,
        negative_prompt=negative_prompts if do_guidance else None,
    )
    if do_guidance and base.config.force_zeros_for_empty_prompt:
        empty = torch.tensor([not text for text in negative_prompts], device=embeds.device)
        negative_embeds = torch.where(empty[:, None, None], 0, negative_embeds)
        negative_pooled = torch.where(empty[:, None], 0, negative_pooled)
    return {
        "prompt_embeds": embeds,
        "negative_prompt_embeds": negative_embeds,
        "pooled_prompt_embeds": pooled,
        "negative_pooled_prompt_embeds": negative_pooled,
    }
