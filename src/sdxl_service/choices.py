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
    # The k-diffusion samplers AUTOMATIC1111 offers (diffusers' own mapping: engine/schedulers.py).
    DPMPP_2M_SDE = "dpmpp_2m_sde"
    DPMPP_2M_SDE_KARRAS = "dpmpp_2m_sde_karras"
    DPMPP_SDE = "dpmpp_sde"
    DPMPP_SDE_KARRAS = "dpmpp_sde_karras"
    DPMPP_3M_SDE = "dpmpp_3m_sde"
    EULER_A_KARRAS = "euler_a_karras"
    HEUN = "heun"
    LMS = "lms"
    DPM2 = "dpm2"
    DPM2_A = "dpm2_a"


class ScheduleType(StrEnum):
    """AUTOMATIC1111's "Schedule type": the noise levels a sampler steps through."""

    AUTOMATIC = "automatic"  # the scheduler's own (for `dpmpp_2m_karras`, Karras)
    KARRAS = "karras"
    EXPONENTIAL = "exponential"
    SGM_UNIFORM = "sgm_uniform"


# AUTOMATIC1111's names: its "Schedule type" labels, and each scheduler's sampler name with the
# schedule type that is its own (None: the sampler's default). The infotext writes these; the
# request's `scheduler` and `schedule_type` also take them (scheduler_of, schedule_type_of).
SCHEDULE_TYPE_LABELS = {
    ScheduleType.AUTOMATIC: "Automatic",
    ScheduleType.KARRAS: "Karras",
    ScheduleType.EXPONENTIAL: "Exponential",
    ScheduleType.SGM_UNIFORM: "SGM Uniform",
}
SAMPLERS: dict[SchedulerName, tuple[str, ScheduleType | None]] = {
    SchedulerName.EULER: ("Euler", None),
    SchedulerName.EULER_A: ("Euler a", None),
    SchedulerName.DPMPP_2M: ("DPM++ 2M", None),
    SchedulerName.DPMPP_2M_KARRAS: ("DPM++ 2M", ScheduleType.KARRAS),
    SchedulerName.DDIM: ("DDIM", None),
    SchedulerName.UNIPC: ("UniPC", None),
    SchedulerName.EULER_TRAILING: ("Euler", ScheduleType.SGM_UNIFORM),
    SchedulerName.LCM: ("LCM", None),
    SchedulerName.TCD: ("TCD", None),
    SchedulerName.DPMPP_2M_SDE: ("DPM++ 2M SDE", None),
    SchedulerName.DPMPP_2M_SDE_KARRAS: ("DPM++ 2M SDE", ScheduleType.KARRAS),
    SchedulerName.DPMPP_SDE: ("DPM++ SDE", None),
    SchedulerName.DPMPP_SDE_KARRAS: ("DPM++ SDE", ScheduleType.KARRAS),
    SchedulerName.DPMPP_3M_SDE: ("DPM++ 3M SDE", None),
    SchedulerName.EULER_A_KARRAS: ("Euler a", ScheduleType.KARRAS),
    SchedulerName.HEUN: ("Heun", None),
    SchedulerName.LMS: ("LMS", None),
    SchedulerName.DPM2: ("DPM2", None),
    SchedulerName.DPM2_A: ("DPM2 a", None),
}
# The schedule types a scheduler can step through besides its own: diffusers' sigma options
# (use_karras_sigmas, use_exponential_sigmas, timestep_spacing) where its class has them.
_SIGMA_SCHEDULES = frozenset(
    {ScheduleType.KARRAS, ScheduleType.EXPONENTIAL, ScheduleType.SGM_UNIFORM}
)
SCHEDULE_TYPES: dict[SchedulerName, frozenset[ScheduleType]] = {
    name: _SIGMA_SCHEDULES for name in SchedulerName
} | {
    SchedulerName.DDIM: frozenset({ScheduleType.SGM_UNIFORM}),
    # diffusers' singlestep solver spaces its timesteps its own way (no timestep_spacing).
    SchedulerName.DPMPP_SDE: frozenset({ScheduleType.KARRAS, ScheduleType.EXPONENTIAL}),
    SchedulerName.DPMPP_SDE_KARRAS: frozenset({ScheduleType.KARRAS, ScheduleType.EXPONENTIAL}),
    SchedulerName.LCM: frozenset(),
    SchedulerName.TCD: frozenset(),
}


def _folded(name: str) -> str:
    return " ".join(name.casefold().replace("_", " ").split())


# A1111's sampler names, alone ("DPM++ 2M") and as its older combined names ("DPM++ 2M Karras").
_SCHEDULER_OF_A1111 = {
    _folded(sampler if schedule is None else f"{sampler} {SCHEDULE_TYPE_LABELS[schedule]}"): name
    for name, (sampler, schedule) in SAMPLERS.items()
}
_SCHEDULE_TYPE_OF_A1111 = {_folded(label): kind for kind, label in SCHEDULE_TYPE_LABELS.items()}


def scheduler_of(value: object) -> object:
    """`value` as a SchedulerName where it is one of AUTOMATIC1111's sampler names (any case);
    anything else unchanged, for the enum to accept or refuse."""
    if isinstance(value, str) and value not in SchedulerName._value2member_map_:
        return _SCHEDULER_OF_A1111.get(_folded(value), value)
    return value


def schedule_type_of(value: object) -> object:
    """`value` as a ScheduleType where it is one of AUTOMATIC1111's labels (any case)."""
    if isinstance(value, str) and value not in ScheduleType._value2member_map_:
        return _SCHEDULE_TYPE_OF_A1111.get(_folded(value), value)
    return value


def sampler_names(scheduler: SchedulerName, schedule_type: ScheduleType) -> tuple[str, str | None]:
    """AUTOMATIC1111's (Sampler, Schedule type) of a scheduler stepping through `schedule_type`
    (AUTOMATIC: its own); the schedule type None where it is the sampler's default."""
    sampler, own = SAMPLERS[scheduler]
    schedule = own if schedule_type is ScheduleType.AUTOMATIC else schedule_type
    return sampler, None if schedule is None else SCHEDULE_TYPE_LABELS[schedule]


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
