"""The base + refiner pair loaded from hub ids or folders, and the edit pipelines over it."""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)


def _from_pretrained(
    pipeline_class: Any, source: str, *, dtype: torch.dtype, variant: str | None, **components: Any
) -> Any:
    options: dict[str, Any] = {
        # `dtype`, not the `torch_dtype` diffusers 0.42 deprecates.
        "dtype": dtype,
        "use_safetensors": True,
        # Images are decoded here, not by the pipelines, so their watermarker would
        # never run; off explicitly so it does not depend on what is installed.
        "add_watermarker": False,
        **components,
    }
    if variant:
        try:
            return pipeline_class.from_pretrained(source, variant=variant, **options)
        except (ValueError, OSError) as error:
            if "variant" not in str(error):
                raise
            logger.info(
                "%s has no %r weights variant; loading the default weights", source, variant
            )
    return pipeline_class.from_pretrained(source, **options)


def load_pipelines(
    base_source: str, refiner_source: str, *, dtype: torch.dtype, variant: str | None
) -> tuple[Any, Any]:
    """Base and refiner from hub ids or diffusers folders, sharing text_encoder_2 and the VAE."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    base = _from_pretrained(StableDiffusionXLPipeline, base_source, dtype=dtype, variant=variant)
    refiner = _from_pretrained(
        StableDiffusionXLImg2ImgPipeline,
        refiner_source,
        dtype=dtype,
        variant=variant,
        text_encoder_2=base.text_encoder_2,
        vae=base.vae,
    )
    return base, refiner


def edit_pipelines(base: Any, refiner: Any) -> tuple[Any, Any, Any]:
    """Base img2img, base inpaint and refiner inpaint pipelines over the loaded modules.

    Built with the constructors, not `from_pipe`: from_pipe ends with
    `pipeline.to(dtype)` (float32 unless told), which would cast the shared
    UNets and the VAE kept in its own dtype. The config flags are passed on by
    hand because `components` holds modules only.
    """
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from .inpainting import InpaintPipeline

    def flags(pipeline: Any) -> dict[str, Any]:
        return {
            "requires_aesthetics_score": pipeline.config.get("requires_aesthetics_score", False),
            "force_zeros_for_empty_prompt": pipeline.config.force_zeros_for_empty_prompt,
            "add_watermarker": False,
        }

    pipelines: tuple[Any, Any, Any] = (
        StableDiffusionXLImg2ImgPipeline(**base.components, **flags(base)),
        InpaintPipeline(**base.components, **flags(base)),
        InpaintPipeline(**refiner.components, **flags(refiner)),
    )
    for pipeline in pipelines:
        pipeline.set_progress_bar_config(disable=True)
    return pipelines
