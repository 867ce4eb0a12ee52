"""What a single-file checkpoint holds, read from its safetensors header before any weight.

A `.safetensors` checkpoint in the original (AUTOMATIC1111 / ComfyUI / Civitai) layout names
its parts by prefix: the UNet `model.diffusion_model.*`, the VAE `first_stage_model.*`, and
the text encoders under `conditioner.embedders.*`. Its tensors, not its file name, say what
it is: an SDXL base has CLIP ViT-L (`embedders.0.transformer`) and OpenCLIP bigG
(`embedders.1.model`), a refiner bigG alone (`embedders.0.model`). The widths of a few
tensors then say whose configs load it: SDXL 1.0's (shipped in sdxl_configs/) or the tiny
preset's. Anything else (an SD 1.5 file, a LoRA, a VAE, a truncated file) is refused here,
with the variable that named it and what was found, before anything is loaded.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

# The prefixes of the original layout, named once where the HTTP process reads them too
# (it lists single files in SDXL_MODELS_DIR without torch).
from ..model_catalog import BIGG_OF_BASE, BIGG_OF_REFINER, CLIP_L, UNET

VAE = "first_stage_model."

SDXL_CONFIGS = Path(__file__).parent / "sdxl_configs"

Kind = Literal["base", "refiner"]
Shapes = dict[str, tuple[int, ...]]


class CheckpointError(ValueError):
    """A file named by SDXL_BASE_MODEL, SDXL_REFINER_MODEL or SDXL_VAE that cannot be loaded."""


@dataclass(frozen=True)
class CheckpointLayout:
    kind: Kind
    # "sdxl" (SDXL 1.0's configs) or "tiny" (the tiny preset's)
    architecture: str
    has_vae: bool
    tensors: int
    # A base whose UNet takes the mask and the masked picture's latents too (9 channels).
    inpainting: bool = False


@dataclass(frozen=True)
class Architecture:
    """One set of configs a checkpoint may be loaded with, as plain dicts."""

    name: str
    unet: dict[str, dict[str, Any]]  # by kind
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    text_encoder_2: dict[str, Any]


def read_shapes(path: Path, variable: str) -> Shapes:
    """Every tensor's shape, from the header; a damaged or truncated file is refused."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            return {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}  # noqa: SIM118
    except Exception as error:  # safetensors raises its own SafetensorError, OSError, ...
        raise CheckpointError(
            f"{variable}={str(path)!r} is not a readable safetensors file (damaged or "
            f"truncated?): {error}"
        ) from error


def _packaged(name: str) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((SDXL_CONFIGS / name).read_text())
    return config


def sdxl_architecture() -> Architecture:
    return Architecture(
        name="sdxl",
        unet={
            "base": _packaged("base/unet/config.json"),
            "refiner": _packaged("refiner/unet/config.json"),
        },
        vae=_packaged("base/vae/config.json"),
        text_encoder=_packaged("base/text_encoder/config.json"),
        text_encoder_2=_packaged("base/text_encoder_2/config.json"),
    )


def tiny_architecture() -> Architecture:
    from . import tiny

    return Architecture(
        name="tiny",
        unet={"base": tiny.base_unet_config(), "refiner": tiny.refiner_unet_config()},
        vae=tiny.vae_config(),
        text_encoder=tiny.text_encoder_config(),
        text_encoder_2=tiny.text_encoder_2_config(),
    )


def architectures() -> list[Architecture]:
    return [sdxl_architecture(), tiny_architecture()]


def vae_signature(vae: dict[str, Any], prefix: str = "") -> Shapes:
    return {
        f"{prefix}encoder.conv_in.weight": (vae["block_out_channels"][0], vae["in_channels"], 3, 3),
        f"{prefix}encoder.conv_out.weight": (
            2 * vae["latent_channels"],
            vae["block_out_channels"][-1],
            3,
            3,
        ),
    }


def signature(architecture: Architecture, kind: Kind, *, inpainting: bool = False) -> Shapes:
    """The shapes of a few tensors that tell the architectures apart: widths of the UNet, its
    added conditioning (text embeddings + time ids: 2816 for the base, 2560 for the
    refiner) and the text encoders. `inpainting`: the base's UNet with the 5 more input
    channels of an inpainting checkpoint (the mask and the masked picture's latents)."""
    unet = architecture.unet[kind]
    width = unet["block_out_channels"][0]
    in_channels = inpainting_channels(unet) if inpainting else unet["in_channels"]
    shapes: Shapes = {
        f"{UNET}input_blocks.0.0.weight": (width, in_channels, 3, 3),
        f"{UNET}label_emb.0.0.weight": (4 * width, unet["projection_class_embeddings_input_dim"]),
        f"{UNET}out.2.weight": (unet["out_channels"], width, 3, 3),
    }
    big_g = architecture.text_encoder_2
    bigg_prefix = BIGG_OF_BASE if kind == "base" else BIGG_OF_REFINER
    shapes[f"{bigg_prefix}positional_embedding"] = (
        big_g["max_position_embeddings"],
        big_g["hidden_size"],
    )
    if kind == "base":
        clip_l = architecture.text_encoder
        shapes[f"{CLIP_L}text_model.embeddings.position_embedding.weight"] = (
            clip_l["max_position_embeddings"],
            clip_l["hidden_size"],
        )
    return shapes


def inpainting_channels(unet: dict[str, Any]) -> int:
    """An inpainting UNet's input channels: latents, mask (1), masked picture's latents."""
    return 2 * int(unet["in_channels"]) + 1


def is_inpainting(shapes: Shapes) -> bool:
    """Whether a checkpoint's UNet takes the inpainting input (9 channels on SDXL's 4)."""
    first = shapes.get(f"{UNET}input_blocks.0.0.weight")
    out = shapes.get(f"{UNET}out.2.weight")
    return first is not None and out is not None and first[1] == 2 * out[0] + 1


def _has(shapes: Shapes, prefix: str) -> bool:
    return any(key.startswith(prefix) for key in shapes)


def _looks_like_lora(shapes: Shapes) -> bool:
    return any(
        key.startswith(("lora_unet_", "lora_te")) or ".lora_down." in key or ".lora_A." in key
        for key in shapes
    )


def what_else(shapes: Shapes) -> str:
    """What a file that is no SDXL checkpoint seems to be, in words."""
    if not shapes:
        return "it holds no tensors"
    if _looks_like_lora(shapes):
        return "it is a LoRA (LoRA files go into SDXL_LORA_DIR)"
    if _has(shapes, "cond_stage_model."):
        return (
            "it is a Stable Diffusion 1.x/2.x checkpoint (one text encoder, "
            "cond_stage_model.*), not SDXL"
        )
    if not _has(shapes, UNET):
        if _has(shapes, "encoder.") and _has(shapes, "decoder."):
            return "it is a VAE alone (that is SDXL_VAE's)"
        if _has(shapes, "down_blocks.") or _has(shapes, "text_model."):
            return "it is one diffusers component (diffusers layout): give its pipeline folder"
        return f"it has no UNet ({UNET}*)"
    return (
        "it has a UNet but not SDXL's text encoders (conditioner.embedders.0 and .1 for a "
        "base, conditioner.embedders.0 alone for a refiner)"
    )


def _mismatches(shapes: Shapes, expected: Shapes) -> list[str]:
    return [
        f"{key} is {list(shapes[key]) if key in shapes else 'missing'}, expected {list(shape)}"
        for key, shape in expected.items()
        if shapes.get(key) != shape
    ]


def _closest(shapes: Shapes, expected: list[tuple[Architecture, Shapes]]) -> tuple[str, str]:
    """(architecture, first mismatch) of the candidate the file misses least."""
    scored = [(len(_mismatches(shapes, sig)), arch.name, sig) for arch, sig in expected]
    _, name, sig = min(scored, key=lambda item: item[0])
    return name, _mismatches(shapes, sig)[0]


def read_checkpoint_layout(
    path: Path,
    variable: str,
    *,
    kind: Kind,
    candidates: Callable[[], list[Architecture]] = architectures,
) -> CheckpointLayout:
    """The layout of an SDXL checkpoint file given as `variable`, or CheckpointError saying
    what the file is instead."""
    shapes = read_shapes(path, variable)
    named = f"{variable}={str(path)!r}"
    if _has(shapes, UNET) and _has(shapes, CLIP_L) and _has(shapes, BIGG_OF_BASE):
        found: Kind = "base"
    elif _has(shapes, UNET) and _has(shapes, BIGG_OF_REFINER) and not _has(shapes, BIGG_OF_BASE):
        found = "refiner"
    else:
        raise CheckpointError(f"{named} is not an SDXL checkpoint: {what_else(shapes)}")
    if found != kind:
        other = "SDXL_REFINER_MODEL" if found == "refiner" else "SDXL_BASE_MODEL"
        raise CheckpointError(
            f"{named} is an SDXL {found} checkpoint, not a {kind} (its text encoders: "
            f"{'OpenCLIP bigG alone' if found == 'refiner' else 'CLIP ViT-L and OpenCLIP bigG'}"
            f"): give it as {other}"
        )
    inpainting = kind == "base" and is_inpainting(shapes)
    expected = []
    for architecture in candidates():
        sig = signature(architecture, kind, inpainting=inpainting)
        if _has(shapes, VAE):
            sig |= vae_signature(architecture.vae, VAE)
        if not _mismatches(shapes, sig):
            return CheckpointLayout(
                kind=kind,
                architecture=architecture.name,
                has_vae=_has(shapes, VAE),
                tensors=len(shapes),
                inpainting=inpainting,
            )
        expected.append((architecture, sig))
    closest, mismatch = _closest(shapes, expected)
    raise CheckpointError(
        f"{named} is an SDXL {kind} checkpoint of another architecture than SDXL {kind} 1.0's "
        f"(nearest: the {closest} configs): {mismatch}"
    )


def read_vae_architecture(
    path: Path, candidates: Callable[[], list[Architecture]] = architectures
) -> tuple[str, bool]:
    """(architecture, original layout) of a VAE file given as SDXL_VAE, or CheckpointError.

    diffusers' layout (`encoder.down_blocks.*`, as madebyollin/sdxl-vae-fp16-fix ships
    diffusion_pytorch_model.safetensors) and the original one (`encoder.down.*`, as VAEs on
    Civitai come) have the same first and last encoder convolutions.
    """
    variable = "SDXL_VAE"
    shapes = read_shapes(path, variable)
    named = f"{variable}={str(path)!r}"
    if not (_has(shapes, "encoder.") and _has(shapes, "decoder.")):
        problem = (
            "it is a whole checkpoint; give its VAE as a file of its own, or leave SDXL_VAE "
            "unset to use the checkpoint's"
            if _has(shapes, UNET)
            else what_else(shapes)
        )
        raise CheckpointError(f"{named} is not a VAE file: {problem}")
    expected = [(architecture, vae_signature(architecture.vae)) for architecture in candidates()]
    for architecture, sig in expected:
        if not _mismatches(shapes, sig):
            return architecture.name, _has(shapes, "encoder.down.")
    closest, mismatch = _closest(shapes, expected)
    raise CheckpointError(
        f"{named} is a VAE of another architecture than SDXL's (nearest: the {closest} "
        f"config): {mismatch}"
    )
