"""The named choices of the API and the settings: one list of each.

The HTTP process validates requests against these without importing torch or
diffusers; `schedulers.py` maps every `SchedulerName` to a diffusers class (a
unit test keeps the two in step), and settings take the same types, so a name
the API refuses is also refused as a default.
"""

from __future__ import annotations

from enum import StrEnum


class Preset(StrEnum):
    AUTO = "auto"  # sdxl with a CUDA GPU, tiny without (loudly)
    SDXL = "sdxl"
    TINY = "tiny"


class RefinerMode(StrEnum):
    ENSEMBLE = "ensemble"  # base denoises [0, frac), refiner [frac, 1] on latents
    SEQUENTIAL = "sequential"  # refiner img2img over the finished base image
    NONE = "none"  # base only


class RenderKind(StrEnum):
    TEXT_TO_IMAGE = "text_to_image"  # generations
    IMAGE_TO_IMAGE = "image_to_image"  # edits without a mask, variations
    INPAINT = "inpaint"  # edits with a mask: only the masked region is repainted


class SchedulerName(StrEnum):
    EULER = "euler"  # SDXL 1.0's own
    EULER_A = "euler_a"
    DPMPP_2M = "dpmpp_2m"
    DPMPP_2M_KARRAS = "dpmpp_2m_karras"
    DDIM = "ddim"
    UNIPC = "unipc"
    # Few-step generation: the samplers the distilled LoRAs and checkpoints were made for.
    EULER_TRAILING = "euler_trailing"  # SDXL-Lightning, Hyper-SD: Euler, trailing timesteps
    LCM = "lcm"  # Latent Consistency Models (LCM-LoRA)
    TCD = "tcd"  # Trajectory Consistency Distillation (TCD-LoRA)


class HiresUpscaler(StrEnum):
    """How the hires fix takes the first pass to the final size (AUTOMATIC1111's names)."""

    LATENT = "latent"  # the latents, bilinear: no decode and re-encode between the passes
    LANCZOS = "lanczos"  # the decoded image, Lanczos, then encoded again


class PromptSyntax(StrEnum):
    A1111 = "a1111"  # AUTOMATIC1111's emphasis: (word:1.3), (word), [word], BREAK
    NONE = "none"  # text taken literally (long prompts are still chunked)


class PreviewDecoder(StrEnum):
    APPROX = "approx"  # a fixed linear map from latents to RGB: no weights, blurry
    VAE = "vae"  # the full VAE: exact, a full decode per preview
    TAESD = "taesd"  # the tiny autoencoder (SDXL_PREVIEW_MODEL): close to the VAE, cheap


class Attention(StrEnum):
    SDPA = "sdpa"  # torch's scaled_dot_product_attention (flash / memory-efficient kernels)
    EAGER = "eager"  # diffusers' plain attention, for debugging


class Switch(StrEnum):
    """A speed or memory measure that is worth it in some cases: `auto` leaves the choice to the
    rule beside the setting that takes it (SDXL_WARMUP, SDXL_VAE_TILING)."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"


class DType(StrEnum):
    AUTO = "auto"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FLOAT32 = "float32"


# Spellings people use for the dtypes besides torch's own names: SDXL_DTYPE and
# SDXL_VAE_DTYPE accept them (settings.py); the one table of them.
DTYPE_ALIASES = {
    "fp16": DType.FLOAT16,
    "half": DType.FLOAT16,
    "bf16": DType.BFLOAT16,
    "fp32": DType.FLOAT32,
    "float": DType.FLOAT32,
}
