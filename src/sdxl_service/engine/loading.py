"""The base + refiner pair loaded from hub ids, folders or single files, and the edit pipelines
over it."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from .checkpoint_layout import Kind
from .single_file import is_single_file, load_single_file_pipeline, load_single_file_vae

logger = logging.getLogger(__name__)


def weight_files(source: str) -> list[str] | None:
    """The safetensors files of a diffusers folder or hub repo, relative to its root; None when
    they cannot be listed (a hub id while offline)."""
    folder = Path(source)
    if folder.is_dir():
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.safetensors"))
    try:
        from huggingface_hub import list_repo_files

        return [name for name in list_repo_files(source) if name.endswith(".safetensors")]
    except Exception as error:  # offline, unknown repo, no permission: decided by dtype
        logger.info("cannot list the files of %s (%s)", source, error)
        return None


def choose_variant(files: list[str] | None, variant: str | None, dtype: torch.dtype) -> str | None:
    """The weights variant to load, from what the folder or repo holds and the dtype wanted.

    Half-precision runs (fp16, bf16) take the variant files when every model has them: half
    the bytes to read or download, cast once to the dtype. A float32 run takes the default
    (full-precision) files when every model has them. Either falls back to the other set when
    it is the only complete one, so a folder of fp16 files alone loads in any dtype on any
    device. With the files unknown, the dtype decides (and diffusers falls back if need be).
    """
    if not variant:
        return None
    half = dtype in (torch.float16, torch.bfloat16)
    if files is None:
        return variant if half else None
    tag = f".{variant}."
    models: dict[str, set[bool]] = {}
    for name in files:
        model, _, file_name = name.rpartition("/")
        # Files at the root are single-file checkpoints beside the diffusers layout (the
        # stock hub repos hold one): not what from_pretrained loads.
        if model and "/" not in model:
            models.setdefault(model, set()).add(tag in file_name)
    has_variant = bool(models) and all(True in kinds for kinds in models.values())
    has_default = bool(models) and all(False in kinds for kinds in models.values())
    if half:
        return variant if has_variant or not has_default else None
    return None if has_default or not has_variant else variant


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
    variant = choose_variant(weight_files(source), variant, dtype)
    if variant:
        logger.info("loading the %r weights variant of %s", variant, source)
        try:
            return pipeline_class.from_pretrained(source, variant=variant, **options)
        except (ValueError, OSError) as error:
            if "variant" not in str(error):
                raise
            logger.info(
                "%s has no %r weights variant; loading the default weights", source, variant
            )
    return pipeline_class.from_pretrained(source, **options)


def load_vae(
    source: str, *, dtype: torch.dtype, variant: str | None, cache_dir: Path | None = None
) -> Any:
    """SDXL_VAE: an AutoencoderKL from a hub id, its own folder, a pipeline folder's vae/, or
    one .safetensors file."""
    from diffusers import AutoencoderKL

    if is_single_file(source):
        return load_single_file_vae(Path(source), cache_dir=_cache(cache_dir), dtype=dtype)

    options: dict[str, Any] = {"dtype": dtype, "use_safetensors": True}
    folder = Path(source)
    if (folder / "vae" / "config.json").is_file():
        options["subfolder"] = "vae"
        files = weight_files(source)
    else:
        # A VAE's own folder or repo holds its weights at the root: one model.
        listed = weight_files(source)
        files = None if listed is None else [f"vae/{name}" for name in listed if "/" not in name]
    chosen = choose_variant(files, variant, dtype)
    try:
        return AutoencoderKL.from_pretrained(source, variant=chosen, **options)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"SDXL_VAE={source!r} cannot be loaded as an AutoencoderKL: {error}"
        ) from error


def _cache(cache_dir: Path | None) -> Path:
    # Only the tiny architecture's configs are built there (engine.tiny).
    return cache_dir if cache_dir is not None else Path.home() / ".cache" / "sdxl-service"


def _load(
    pipeline_class: Any,
    source: str,
    *,
    kind: Kind,
    dtype: torch.dtype,
    variant: str | None,
    cache_dir: Path | None,
    **components: Any,
) -> Any:
    if is_single_file(source):
        return load_single_file_pipeline(
            pipeline_class,
            Path(source),
            kind=kind,
            cache_dir=_cache(cache_dir),
            dtype=dtype,
            **components,
        )
    return _from_pretrained(pipeline_class, source, dtype=dtype, variant=variant, **components)


def load_pipelines(
    base_source: str,
    refiner_source: str,
    *,
    dtype: torch.dtype,
    variant: str | None,
    vae_source: str | None = None,
    cache_dir: Path | None = None,
) -> tuple[Any, Any]:
    """Base and refiner from hub ids, diffusers folders or single files, sharing
    text_encoder_2 and the VAE (the base's own, or SDXL_VAE's)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    vae = (
        {}
        if vae_source is None
        else {"vae": load_vae(vae_source, dtype=dtype, variant=variant, cache_dir=cache_dir)}
    )
    base = _load(
        StableDiffusionXLPipeline,
        base_source,
        kind="base",
        dtype=dtype,
        variant=variant,
        cache_dir=cache_dir,
        **vae,
    )
    refiner = _load(
        StableDiffusionXLImg2ImgPipeline,
        refiner_source,
        kind="refiner",
        dtype=dtype,
        variant=variant,
        cache_dir=cache_dir,
        text_encoder_2=base.text_encoder_2,
        vae=base.vae,
    )
    return base, refiner


def load_base_pipeline(
    source: str,
    *,
    dtype: torch.dtype,
    variant: str | None,
    cache_dir: Path | None = None,
    **components: Any,
) -> Any:
    """One more SDXL base (a model of SDXL_MODELS_DIR) from a folder or a single file, with
    `components` (modules already loaded) in place of its own."""
    from diffusers import StableDiffusionXLPipeline

    return _load(
        StableDiffusionXLPipeline,
        source,
        kind="base",
        dtype=dtype,
        variant=variant,
        cache_dir=cache_dir,
        **components,
    )


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


class PreviewModelError(RuntimeError):
    """SDXL_PREVIEW_MODEL names nothing an AutoencoderTiny loads from."""


def load_preview_model(source: str, *, cache_dir: Path, device: str, dtype: torch.dtype) -> Any:
    """The tiny autoencoder of SDXL_PREVIEW_DECODER=taesd, from a hub id or a diffusers folder.

    Downloaded into `cache_dir` (SDXL_CACHE_DIR) like the SDXL weights. Kept
    in the engine's dtype: taesd was trained to run in fp16 (unlike the SDXL
    VAE, which the engine upcasts).
    """
    from diffusers import AutoencoderTiny

    def refused(reason: str) -> PreviewModelError:
        return PreviewModelError(
            f"SDXL_PREVIEW_MODEL={source!r} cannot be loaded as the taesd preview decoder "
            "(SDXL_PREVIEW_DECODER=taesd): give a hub id such as madebyollin/taesdxl or a "
            "folder with config.json and diffusion_pytorch_model.safetensors, or choose "
            f"SDXL_PREVIEW_DECODER=approx or vae ({reason})"
        )

    config = Path(source, "config.json")
    if config.is_file():
        # Another model's folder would load as random weights (with a warning) or fail oddly.
        try:
            class_name = json.loads(config.read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError) as error:
            raise refused(f"unreadable {config}: {error}") from error
        if class_name != AutoencoderTiny.__name__:
            raise refused(f"{config} describes a {class_name}, not an AutoencoderTiny")
    try:
        taesd = AutoencoderTiny.from_pretrained(
            source, cache_dir=str(cache_dir), dtype=dtype, use_safetensors=True
        )
    except (OSError, ValueError, NotImplementedError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise refused(f"{type(error).__name__}: {first_line}") from error
    taesd.to(device)
    taesd.eval()
    return taesd
