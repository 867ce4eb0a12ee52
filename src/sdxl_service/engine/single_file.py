"""Single-file SDXL checkpoints and VAEs, loaded offline with diffusers' `from_single_file`.

The configs and tokenizers come with the package (sdxl_configs/, for SDXL 1.0's
architecture) or from the tiny preset's folders, never from a hub: `config=` is always a
local folder and `local_files_only=True`. Only `.safetensors` files are read; a pickle
(`.ckpt`) is refused by the settings before anything gets here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import chain
from pathlib import Path
from typing import Any

import torch

from .checkpoint_layout import (
    BIGG_OF_BASE,
    SDXL_CONFIGS,
    CheckpointError,
    Kind,
    read_checkpoint_layout,
    read_vae_architecture,
)
from .clip_tokenizer import load_clip_tokenizer
from .devices import cast_module

logger = logging.getLogger(__name__)

INCOMPLETE = "an incomplete or pruned checkpoint"
VARIABLES: dict[Kind, str] = {"base": "SDXL_BASE_MODEL", "refiner": "SDXL_REFINER_MODEL"}


def is_single_file(source: str) -> bool:
    """A model source that is one file (not a folder or a hub id)."""
    return Path(source).is_file()


def config_folder(
    architecture: str, kind: Kind, cache_dir: Path, *, inpainting: bool = False
) -> Path:
    """The diffusers folder whose configs and tokenizers load a checkpoint of `architecture`
    (`inpainting`: a base whose UNet takes 9 channels, SDXL inpainting 0.1's config)."""
    if architecture == "sdxl":
        return SDXL_CONFIGS / ("inpaint" if inpainting else kind)
    from .tiny import ensure_tiny_pair, tiny_inpaint_configs

    if inpainting:
        return tiny_inpaint_configs(cache_dir)
    base, refiner = ensure_tiny_pair(cache_dir)
    return base if kind == "base" else refiner


class _NoneKeptInFloat32(logging.Filter):
    """diffusers 0.42's `ModelMixin.to(dtype)` warns of "modules ... that should be kept in
    float32: []" for a model that declares none; from_single_file calls it on each UNet and
    VAE it loads, whose tensors are in that dtype already (a cast that changes nothing)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


@contextmanager
def _quiet_dtype_casts() -> Iterator[None]:
    diffusers_models = logging.getLogger("diffusers.models.modeling_utils")
    quiet = _NoneKeptInFloat32()
    diffusers_models.addFilter(quiet)
    try:
        yield
    finally:
        diffusers_models.removeFilter(quiet)


def _missing_tensors(module: Any) -> list[str]:
    # diffusers builds the modules on the meta device and fills in what the file has: a
    # tensor the file lacks stays meta (and would fail at the first render, not here).
    return [
        name
        for name, tensor in chain(module.named_parameters(), module.named_buffers())
        if tensor.is_meta
    ]


def _complete_in(dtype: torch.dtype, modules: dict[str, Any], named: str) -> None:
    """Each loaded module known to hold every weight, then in `dtype`.

    diffusers was given the dtype and cast each tensor as it read it (one copy of a module
    in memory, never the file's dtype and the one asked side by side); the cast here only
    catches what it leaves in another dtype (a module it keeps in float32 for float16).
    """
    for component, module in modules.items():
        if isinstance(module, torch.nn.Module):
            missing = _missing_tensors(module)
            if missing:
                raise CheckpointError(
                    f"{named} lacks {len(missing)} tensors of its {component} "
                    f"(the first: {missing[0]}): {INCOMPLETE}"
                )
            cast_module(module, dtype)


def _open_clip_of_base(path: Path, config: Path, dtype: torch.dtype) -> Any:
    """The base's OpenCLIP bigG text encoder (conditioner.embedders.1).

    diffusers tells CLIP ViT-L from OpenCLIP bigG by width alone and takes embedders.0 for
    any text encoder as wide as ViT-L: right for SDXL (768 vs 1280), wrong where the two are
    equally wide (the tiny pair). Handed only embedders.1's tensors, its converter has one
    choice.
    """
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from safetensors import safe_open
    from transformers import CLIPTextModelWithProjection

    with safe_open(str(path), framework="pt") as file:
        weights = {key: file.get_tensor(key) for key in file.keys() if key.startswith(BIGG_OF_BASE)}  # noqa: SIM118
    return create_diffusers_clip_model_from_ldm(
        CLIPTextModelWithProjection,
        weights,
        subfolder="text_encoder_2",
        config=str(config),
        torch_dtype=dtype,
        local_files_only=True,
    )


def load_single_file_pipeline(
    pipeline_class: Any,
    path: Path,
    *,
    kind: Kind,
    cache_dir: Path,
    dtype: torch.dtype,
    **components: Any,
) -> Any:
    """A base (StableDiffusionXLPipeline) or refiner (…Img2ImgPipeline) from one checkpoint.

    `components` are modules already loaded (the refiner gets the base's text_encoder_2 and
    VAE, the base SDXL_VAE's): those parts of the file are not loaded.
    """
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    variable = VARIABLES[kind]
    named = f"{variable}={str(path)!r}"
    layout = read_checkpoint_layout(path, variable, kind=kind)
    if not layout.has_vae and "vae" not in components:
        raise CheckpointError(f"{named} has no VAE (first_stage_model.*): give one as SDXL_VAE")
    config = config_folder(layout.architecture, kind, cache_dir, inpainting=layout.inpainting)
    logger.info(
        "loading %s as a single-file SDXL %s%s checkpoint (%d tensors, %s configs)",
        path,
        "inpainting " if layout.inpainting else "",
        kind,
        layout.tensors,
        layout.architecture,
    )
    tokenizers = {
        name: load_clip_tokenizer(config / name)
        for name in ("tokenizer", "tokenizer_2")
        if (config / name).is_dir()
    }
    shared = dict(components)
    try:
        with _quiet_dtype_casts():
            if kind == "base" and "text_encoder_2" not in components:
                components["text_encoder_2"] = _open_clip_of_base(path, config, dtype)
            pipeline = pipeline_class.from_single_file(
                str(path),
                config=str(config),
                # Each tensor cast as it is read: no module is ever whole in the file's dtype
                # (or float32, diffusers' default) beside its copy in `dtype`.
                dtype=dtype,
                local_files_only=True,
                # As for folders (loading._from_pretrained): images are decoded by the engine.
                add_watermarker=False,
                **tokenizers,
                **components,
            )
    except NotImplementedError as error:
        # accelerate's dispatch moves a UNet or VAE with a weight still on the meta device.
        raise CheckpointError(f"{named} lacks weights of its UNet or VAE: {INCOMPLETE}") from error
    except (SingleFileComponentError, ValueError, OSError, RuntimeError, KeyError) as error:
        raise CheckpointError(f"{named} cannot be loaded: {error}") from error
    loaded = {name: module for name, module in pipeline.components.items() if name not in shared}
    _complete_in(dtype, loaded, named)
    return pipeline


def load_single_file_vae(path: Path, *, cache_dir: Path, dtype: torch.dtype) -> Any:
    """SDXL_VAE as one file, in diffusers' key layout or the original one.

    The file carries no config: the SDXL VAE's is used, `force_upcast` included, so an
    fp16-safe VAE given as a file still decodes in float32 under SDXL_VAE_DTYPE=auto (its
    folder, whose config.json says otherwise, does not).
    """
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    named = f"SDXL_VAE={str(path)!r}"
    architecture, original = read_vae_architecture(path)
    config = config_folder(architecture, "base", cache_dir)
    logger.info(
        "loading %s as a single-file VAE (%s layout, %s config)",
        path,
        "original" if original else "diffusers",
        architecture,
    )
    try:
        with _quiet_dtype_casts():
            vae = AutoencoderKL.from_single_file(
                str(path), config=str(config), subfolder="vae", dtype=dtype, local_files_only=True
            )
    except NotImplementedError as error:
        raise CheckpointError(f"{named} lacks weights of the VAE: {INCOMPLETE}") from error
    except (SingleFileComponentError, ValueError, OSError, RuntimeError, KeyError) as error:
        raise CheckpointError(f"{named} cannot be loaded: {error}") from error
    _complete_in(dtype, {"vae": vae}, named)
    return vae
