"""All configuration of the service, read from `SDXL_*` environment variables.

Every variable here is documented in docs/CONFIGURATION.md. Each is
typed (enums, bounds, patterns) and checked when the service starts:
`load_settings` turns a bad value into one message naming the variable and
what it accepts, before any model loads.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import os
import re
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Self

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .choices import (
    DTYPE_ALIASES,
    Attention,
    DType,
    Preset,
    PreviewDecoder,
    PromptSyntax,
    Switch,
)
from .generation_params import settings_fields
from .safety_layout import folder_layout, is_hub_id

SERVICE_ID = "stable-diffusion-xl-with-refiner"
DEFAULT_PORT = 9225
ENV_PREFIX = "SDXL_"
# Files torch.load would unpickle: model variables refuse them.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")


def _default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "sdxl-service"


if TYPE_CHECKING:
    # mypy sees no generated field; code reads them through generation_params.server_defaults.
    _SettingsBase = BaseSettings
else:
    _SettingsBase = settings_fields(BaseSettings)


class Settings(_SettingsBase):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    # --- models -------------------------------------------------------------
    preset: Preset = Preset.AUTO
    base_model: str = "stabilityai/stable-diffusion-xl-base-1.0"
    refiner_model: str = "stabilityai/stable-diffusion-xl-refiner-1.0"
    # Each a hub id, a diffusers folder or one .safetensors checkpoint (original layout).
    # A VAE for base and refiner instead of the base's own: a hub id, a folder (say
    # madebyollin/sdxl-vae-fp16-fix, which decodes in fp16 without the float32 upcast) or a file.
    vae: str | None = None
    # "auto": cuda > mps > cpu.
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")
    # "auto": float16 on CUDA; bfloat16 for SDXL on a CPU with bf16 instructions, else float32.
    dtype: DType = DType.AUTO
    # Weights variant asked of the hub ("fp16" halves the download); folders
    # without it fall back to the default weights.
    variant: str | None = "fp16"
    cache_dir: Path = Field(default_factory=_default_cache_dir)

    # --- generation defaults ------------------------------------------------
    # SDXL_STEPS, SDXL_GUIDANCE_SCALE, SDXL_HIGH_NOISE_FRAC, SDXL_SCHEDULER, SDXL_CLIP_SKIP and
    # SDXL_REFINER: one field each, declared (type, bounds, default) in generation_params.py.

    # Sizes well below the model's native resolution are rendered at native
    # scale and downscaled; off renders exactly the requested size.
    render_native: bool = True
    min_side: int = Field(64, ge=8)
    max_side: int = Field(2048, ge=8)
    # 1536² keeps one image well inside a 24 GiB card (2048² may not fit).
    max_pixels: int = Field(1536 * 1536, ge=64)
    max_n: int = Field(10, ge=1)
    max_prompt_chars: int = Field(4000, ge=1)
    prompt_syntax: PromptSyntax = PromptSyntax.A1111
    # How partial images are decoded from the predicted clean latents. approx:
    # the fastest decoder, and the only one within 10 % (partial_images=3) on
    # the CPU bench (docs/PERFORMANCE.md, "Live previews"); taesd is expected
    # to be the better choice on a GPU, not yet measured there.
    preview_decoder: PreviewDecoder = PreviewDecoder.APPROX
    # The tiny autoencoder of SDXL_PREVIEW_DECODER=taesd: a hub id or a folder.
    preview_model: str = "madebyollin/taesdxl"

    # --- models picked per request ---------------------------------------------
    # Each diffusers folder (model_index.json) or `.safetensors` checkpoint here is a model,
    # named by its file or folder name; read at every listing and miss: no restart needed.
    models_dir: Path | None = None
    # Models of SDXL_MODELS_DIR kept loaded besides the default pair (least recently used
    # unloaded). 1: an SDXL base in fp16 is ~5 GiB of UNet (~7 GiB with its own text
    # encoders), and the default pair (~11.4 GiB) plus one more fits a 24 GiB card with
    # room for a batch; two more would not.
    model_cache: int = Field(1, ge=1, le=16)

    # --- upscaler models ------------------------------------------------------
    # ESRGAN-family upscalers (`.safetensors`, or `.pth` read with spandrel's restricted
    # unpickler), named by file name; `hires.upscaler` and the upscale endpoint's `upscaler`
    # pick one. Read again when the folder changes: no restart needed.
    upscaler_dir: Path | None = None
    # Input pixels per side of one tile through an upscaler model (halved on out of memory).
    upscaler_tile: int = Field(512, ge=64, le=4096)

    # --- ControlNet ---------------------------------------------------------------
    # SDXL ControlNets (Union ones too): diffusers folders (config.json and weights) or single
    # diffusers-layout `.safetensors` files, named by folder or file name; a request's
    # `controlnets` picks them. Read again when the folder changes: no restart needed.
    controlnet_dir: Path | None = None
    # ControlNet units one request may give.
    max_controlnets: int = Field(3, ge=1, le=16)
    # How many ControlNet models, and how many IP-Adapters, a render worker keeps loaded (each
    # kind its own least-recently-used list). A request's ControlNets must fit at once.
    control_cache: int = Field(3, ge=1, le=16)
    # --- the opt-in safety checker --------------------------------------------
    # A classifier every rendered image goes through; a flagged one is never returned
    # (content_policy_violation). A folder or a hub id: diffusers' StableDiffusionSafetyChecker
    # or a transformers image-classification model. Empty: off.
    safety_checker: str | None = None
    # An image-classification model's labels that flag an image (its top label); diffusers'
    # checker has its own verdict and ignores these.
    safety_labels: Annotated[list[str], NoDecode] = ["nsfw"]

    # --- textual-inversion embeddings --------------------------------------------
    # SDXL embeddings (`<name>.safetensors` holding clip_l and clip_g), used by writing their
    # name in a prompt. Read again when the folder changes: no restart needed.
    embeddings_dir: Path | None = None

    # --- LoRA adapters --------------------------------------------------------
    # `<name>.safetensors` or `<name>/pytorch_lora_weights.safetensors`; default
    # <SDXL_CACHE_DIR>/loras. Read at every request: new files need no restart.
    lora_dir: Path | None = None
    max_loras: int = Field(4, ge=0, le=16)
    # Adapters kept loaded (most recently used); past it the oldest is unloaded.
    lora_cache: int = Field(8, ge=1)

    # --- serving ------------------------------------------------------------
    # GPUs the render workers use: "all" visible ones, a count (the first N),
    # or a comma-separated list of indices.
    gpus: str = Field("all", pattern=r"^\s*(all|\d+|\d+(\s*,\s*\d+)*)\s*$")
    # Render workers (processes, each with both pipelines); default one per
    # GPU of SDXL_GPUS, and 1 without a GPU.
    workers: int | None = Field(None, ge=1, le=64)
    # Seconds BentoML lets one request run; above request_timeout, so that our
    # own 504 (with the work cancelled) answers first.
    traffic_timeout: int = Field(900, ge=1)
    # Seconds a generation may take from arrival to its images, queue included.
    request_timeout: float = Field(600.0, gt=0)
    max_batch_images: int = Field(8, ge=1)
    batch_wait_ms: int = Field(50, ge=0)
    max_queue_images: int = Field(64, ge=1)
    max_body_bytes: int = Field(50 * 1024 * 1024, ge=1024)
    # Request bodies held at once by the HTTP process (uploads, mostly); past
    # it new ones get 429 before they are read.
    max_body_bytes_in_flight: int = Field(256 * 1024 * 1024, ge=1024)
    # The page at `GET /` to try prompts in a browser.
    playground: bool = True
    # How each image was made (prompt, seed, settings) inside the file, as AUTOMATIC1111
    # writes it: a PNG `parameters` chunk, EXIF UserComment in JPEG and WebP.
    image_metadata: bool = True

    # --- files served for response_format=url -------------------------------
    url_ttl: int = Field(3600, ge=1)
    public_url: str | None = None
    files_dir: Path = Field(
        default_factory=lambda: Path(tempfile.gettempdir()) / "sdxl-service-files"
    )
    # s3://bucket/prefix to share files between replicas; empty = files_dir.
    files_url: str | None = Field(None, pattern=r"^(s3://[^/]+(/.*)?)?$")
    s3_endpoint_url: str | None = None

    # --- who may call it -----------------------------------------------------
    # Comma-separated bearer keys; with none (and no file) any key or none is
    # accepted, as the registry's example sends "random-string".
    api_keys: Annotated[list[SecretStr], NoDecode] = []
    # One key a line ('#' comments), re-read when the file changes.
    api_keys_file: Path | None = None
    # /metrics without a key even when keys are required.
    metrics_public: bool = False
    # Comma-separated origins allowed to call the API from a browser ("*": any).
    cors_origins: Annotated[list[str], NoDecode] = []

    # --- image jobs and webhooks (POST /v1/images/jobs) -----------------------
    # Where job records live: empty = SQLite at <SDXL_CACHE_DIR>/jobs.sqlite3;
    # sqlite:///<path>, or postgresql://user:pass@host:port/db (shared by replicas).
    jobs_database_url: SecretStr | None = None
    # Runs of one job (the first included) before a job the service kept dying
    # under is failed; a render that fails is not retried.
    job_attempts: int = Field(3, ge=1, le=100)
    # Seconds a finished job (and the files of its result) stays readable.
    job_ttl: int = Field(24 * 3600, ge=1)
    # whsec_<base64>: the Standard Webhooks signing secret; without it no job may
    # ask for a webhook.
    webhook_secret: SecretStr | None = None
    # Hosts webhooks may reach: names, addresses or networks (10.0.0.0/8), and
    # `public` for any public address. Empty: public addresses only.
    webhook_hosts: Annotated[list[str], NoDecode] = []
    webhook_attempts: int = Field(5, ge=1, le=20)
    # Seconds per delivery attempt, and before the first retry (doubling after).
    webhook_timeout: float = Field(10.0, gt=0)
    webhook_retry_seconds: float = Field(5.0, gt=0)

    @field_validator("jobs_database_url")
    @classmethod
    def _database_url(cls, value: SecretStr | None) -> SecretStr | None:
        schemes = ("sqlite:///", "postgresql://", "postgres://")
        if value is not None and not value.get_secret_value().startswith(schemes):
            raise ValueError("expected sqlite:///<path> or postgresql://user:password@host/db")
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return value
        body = value.get_secret_value().removeprefix("whsec_")
        try:
            # As the Standard Webhooks libraries read it: padding optional.
            key = base64.b64decode(body + "==")
        except ValueError:
            key = b""
        if not value.get_secret_value().startswith("whsec_") or not 24 <= len(key) <= 64:
            raise ValueError("expected whsec_ and 24 to 64 random bytes in base64")
        return value

    @field_validator("webhook_hosts")
    @classmethod
    def _webhook_hosts(cls, hosts: list[str]) -> list[str]:
        for host in hosts:
            with contextlib.suppress(ValueError):
                ipaddress.ip_network(host, strict=False)
                continue
            if host != "public" and not re.fullmatch(
                r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", host
            ):
                raise ValueError(f"{host!r} is no host name, address, network or 'public'")
        return [host.lower() for host in hosts]

    # --- GPU optimisations (each switchable) --------------------------------
    attention: Attention = Attention.SDPA
    channels_last: bool = True
    fuse_qkv: bool = False
    compile: bool = False
    # dtype of the VAE decode: the stock SDXL VAE overflows in fp16, bf16 works.
    vae_dtype: DType = DType.AUTO
    # A short render before /readyz says yes (engine.Engine.warmup says when it pays).
    warmup: Switch = Switch.AUTO
    # The VAE decodes and encodes in tiles (latents.LatentCodec says above what size).
    vae_tiling: Switch = Switch.AUTO

    @property
    def lora_folder(self) -> Path:
        return self.lora_dir if self.lora_dir is not None else self.cache_dir / "loras"

    @field_validator("dtype", "vae_dtype", mode="before")
    @classmethod
    def _dtype_alias(cls, value: Any) -> Any:
        if isinstance(value, str):
            name = value.strip().lower()
            return DTYPE_ALIASES.get(name, name)
        return value

    @field_validator("base_model", "refiner_model", "vae")
    @classmethod
    def _safetensors_only(cls, value: str | None) -> str | None:
        # A hub id or a folder passes; a file must be a .safetensors one.
        if value is None:
            return value
        path = Path(value)
        suffix = path.suffix.lower()
        if suffix in PICKLE_SUFFIXES or (path.is_file() and suffix != ".safetensors"):
            raise ValueError(
                f"{path.name} is not a .safetensors file; pickled checkpoints (.ckpt, .pt, "
                ".bin) are refused because loading one runs the code inside it: convert it to "
                ".safetensors"
            )
        if suffix == ".safetensors" and not path.is_file():
            raise ValueError(f"no such file: {value}")
        return value

    @field_validator("safety_checker")
    @classmethod
    def _safety_checker(cls, value: str | None) -> str | None:
        # A folder is read now (its files, its labels); a hub id when the render worker loads.
        if value is None:
            return value
        folder = Path(value).expanduser()
        if folder.is_dir():
            folder_layout(folder)
            return str(folder)
        if folder.exists() or not is_hub_id(value):
            raise ValueError("expected a classifier's folder or a hub id (owner/name)")
        return value

    @field_validator("api_keys", "cors_origins", "webhook_hosts", "safety_labels", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("api_keys_file")
    @classmethod
    def _readable_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value} is not a readable file")
        return value

    @field_validator(
        "files_url",
        "public_url",
        "s3_endpoint_url",
        "jobs_database_url",
        "webhook_secret",
        "safety_checker",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.min_side > self.max_side:
            raise ValueError(f"SDXL_MIN_SIDE ({self.min_side}) exceeds SDXL_MAX_SIDE")
        if self.max_body_bytes_in_flight < self.max_body_bytes:
            raise ValueError("SDXL_MAX_BODY_BYTES_IN_FLIGHT must be at least SDXL_MAX_BODY_BYTES")
        if self.control_cache < self.max_controlnets:
            raise ValueError(
                f"SDXL_CONTROL_CACHE ({self.control_cache}) must be at least "
                f"SDXL_MAX_CONTROLNETS ({self.max_controlnets}): a request's ControlNets must "
                "fit in the cache at once"
            )
        if self.safety_checker is not None and Path(self.safety_checker).is_dir():
            problem = folder_layout(Path(self.safety_checker)).label_problem(self.safety_labels)
            if problem is not None:
                raise ValueError(f"SDXL_SAFETY_LABELS does not fit SDXL_SAFETY_CHECKER: {problem}")
        if self.traffic_timeout <= self.request_timeout:
            raise ValueError(
                f"SDXL_TRAFFIC_TIMEOUT ({self.traffic_timeout}) must exceed "
                f"SDXL_REQUEST_TIMEOUT ({self.request_timeout})"
            )
        return self


class SettingsError(SystemExit):
    """A bad `SDXL_*` value: ends the process with a message that says which and why.

    A SystemExit, so `bentoml serve` stops at once with this message rather
    than a traceback, before any model loads.
    """


# Values never quoted back in an error: they are secrets, or URLs that carry one.
SECRET_FIELDS = frozenset({"api_keys", "webhook_secret", "jobs_database_url"})


def describe_errors(error: ValidationError) -> str:
    """One line per bad variable: its name, the value given and what is accepted."""
    lines = []
    for item in error.errors():
        field = str(item["loc"][0]) if item.get("loc") else ""
        name = f"{ENV_PREFIX}{field.upper()}" if field else "settings"
        shown = field and field not in SECRET_FIELDS and isinstance(item.get("input"), str)
        given = f"={item['input']!r}" if shown else ""
        expected = (item.get("ctx") or {}).get("expected")
        detail = f"expected {expected}" if expected else item["msg"].removeprefix("Value error, ")
        lines.append(f"  {name}{given}: {detail}")
    return "invalid settings:\n" + "\n".join(lines)


def load_settings() -> Settings:
    """The settings from the environment; SettingsError for any bad value."""
    try:
        return Settings()
    except ValidationError as error:
        raise SettingsError(describe_errors(error)) from None


@lru_cache
def get_settings() -> Settings:
    return load_settings()
