"""What the engine is told: the models, the device, the precision and the speed-ups.

The engine sees this and nothing else of the service's settings (no API keys, no S3, no
limits). `EngineConfig.of(settings)` takes the fields by name from anything that has them
(the render worker passes its `Settings`); the settings module keeps the defaults and the
checks of every SDXL_* variable, so none are repeated here.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from ..choices import Attention, DType, Preset, PreviewDecoder, PromptSyntax, Switch


class EngineConfig(BaseModel):
    model_config = ConfigDict(frozen=True, from_attributes=True)

    preset: Preset
    base_model: str
    refiner_model: str
    vae: str | None
    # `auto`, cpu, mps or cuda[:N]
    device: str
    dtype: DType
    variant: str | None
    # Where the tiny preset is built and hub downloads are kept.
    cache_dir: Path
    prompt_syntax: PromptSyntax
    preview_decoder: PreviewDecoder
    preview_model: str
    lora_folder: Path
    lora_cache: int
    # SDXL_MODELS_DIR (None: no models besides the default) and how many stay loaded.
    models_dir: Path | None = None
    model_cache: int = 1
    # SDXL_UPSCALER_DIR (None: no upscaler models) and the input tile through one.
    upscaler_dir: Path | None = None
    upscaler_tile: int = 512
    # SDXL_CONTROLNET_DIR (None: no ControlNets) and how many stay loaded.
    controlnet_dir: Path | None = None
    control_cache: int = 3
    # SDXL_SAFETY_CHECKER (None: off) and SDXL_SAFETY_LABELS (engine/safety.py).
    safety_checker: str | None = None
    safety_labels: tuple[str, ...] = ("nsfw",)
    # SDXL_EMBEDDINGS_DIR (None: no textual-inversion embeddings).
    embeddings_dir: Path | None = None
    attention: Attention
    channels_last: bool
    fuse_qkv: bool
    compile: bool
    vae_dtype: DType
    warmup: Switch
    vae_tiling: Switch

    @classmethod
    def of(cls, settings: object) -> EngineConfig:
        return cls.model_validate(settings)
