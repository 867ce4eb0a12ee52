"""All configuration of the service, read from `SDXL_*` environment variables.

Every variable here is documented in the README's configuration table.
"""

from __future__ import annotations

import os
import tempfile
from enum import StrEnum
from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

SERVICE_ID = "stable-diffusion-xl-with-refiner"
DEFAULT_PORT = 9225


class Preset(StrEnum):
    AUTO = "auto"
    SDXL = "sdxl"
    TINY = "tiny"


def _default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "sdxl-service"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SDXL_", extra="ignore")

    # --- models -------------------------------------------------------------
    preset: Preset = Preset.AUTO
    base_model: str = "stabilityai/stable-diffusion-xl-base-1.0"
    refiner_model: str = "stabilityai/stable-diffusion-xl-refiner-1.0"
    # "auto": cuda > mps > cpu.
    device: str = "auto"
    # "auto": float16 on CUDA, float32 elsewhere.
    dtype: str = "auto"
    # Weights variant asked of the hub ("fp16" halves the download); folders
    # without it fall back to the default weights.
    variant: str | None = "fp16"
    cache_dir: Path = Field(default_factory=_default_cache_dir)

    # --- generation defaults ------------------------------------------------
    steps: int = Field(30, ge=1, le=150)
    guidance_scale: float = Field(5.0, ge=0.0, le=30.0)
    high_noise_frac: float = Field(0.8, gt=0.0, lt=1.0)
    scheduler: str = "euler"
    refiner: str = "ensemble"
    # Sizes well below the model's native resolution are rendered at native
    # scale and downscaled; off renders exactly the requested size.
    render_native: bool = True
    min_side: int = 64
    max_side: int = 2048
    # 1536² keeps one image well inside a 24 GiB card (2048² may not fit).
    max_pixels: int = 1536 * 1536
    max_n: int = 10
    max_prompt_chars: int = 4000

    # --- serving ------------------------------------------------------------
    # Seconds BentoML lets one request run (10 SDXL images take minutes on a GPU).
    traffic_timeout: int = 900
    request_timeout: float = 600.0
    max_batch_images: int = Field(8, ge=1)
    batch_wait_ms: int = Field(10, ge=0)
    max_queue_images: int = Field(64, ge=1)
    max_body_bytes: int = 50 * 1024 * 1024

    # --- files served for response_format=url -------------------------------
    url_ttl: int = 3600
    public_url: str | None = None
    files_dir: Path = Field(
        default_factory=lambda: Path(tempfile.gettempdir()) / "sdxl-service-files"
    )
    # s3://bucket/prefix to share files between replicas; empty = files_dir.
    files_url: str | None = None
    s3_endpoint_url: str | None = None

    # --- GPU optimisations (each switchable) --------------------------------
    attention: str = "sdpa"
    channels_last: bool = True
    fuse_qkv: bool = False
    compile: bool = False
    # dtype of the VAE decode: the stock SDXL VAE overflows in fp16, bf16 works.
    vae_dtype: str = "auto"


@lru_cache
def get_settings() -> Settings:
    return Settings()
