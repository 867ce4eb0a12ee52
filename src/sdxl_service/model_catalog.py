"""The models in SDXL_MODELS_DIR: which there are, what each is, and their sidecar defaults.

Each diffusers pipeline folder (one with `model_index.json`) and each `.safetensors`
checkpoint in the original (AUTOMATIC1111 / Civitai) layout is a model, named by its
folder or file name without the extension. An optional `<name>.json` beside it holds the
model's defaults (steps, guidance, scheduler, refiner mode, clip skip, hand-over point),
which a request's own fields override.

Only JSON is read: `model_index.json`, the sidecars and a checkpoint's safetensors header
(eight bytes of length, then the JSON table of its tensors), so the HTTP process lists
and checks models without torch; the render worker loads the weights. As LoRAs are
(lora_catalog.py), the folder is read again whenever it changes, so a file added while
the service runs is found without a restart.
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .folder_catalog import FolderCatalog, is_valid_name
from .settings import PICKLE_SUFFIXES
from .sidecars import ModelDefaults, read_defaults

logger = logging.getLogger(__name__)

Layout = Literal["base", "refiner"]
Format = Literal["diffusers", "single_file"]

# The prefixes of the original (single-file) layout, for this catalog and for the engine's
# loader (engine/checkpoint_layout.py): the UNet, and the text encoders that tell a base
# from a refiner.
UNET = "model.diffusion_model."
CLIP_L = "conditioner.embedders.0.transformer."
BIGG_OF_BASE = "conditioner.embedders.1.model."
BIGG_OF_REFINER = "conditioner.embedders.0.model."
# safetensors' own bound on a header; a larger length is a damaged file.
MAX_HEADER_BYTES = 100_000_000
# The pipeline classes of an SDXL folder's model_index.json, by layout.
PIPELINE_LAYOUTS: dict[str, Layout] = {
    "StableDiffusionXLPipeline": "base",
    "StableDiffusionXLImg2ImgPipeline": "refiner",
    # diffusers/stable-diffusion-xl-1.0-inpainting-0.1 and its fine-tunes: a base whose UNet
    # takes 9 channels (inpainting_unet says so from the UNet itself, whatever the class).
    "StableDiffusionXLInpaintPipeline": "base",
}
# The first and last convolutions of the UNet (original layout): an inpainting UNet takes
# the latents, the mask and the masked picture's latents, 2 * latent channels + 1.
UNET_IN = f"{UNET}input_blocks.0.0.weight"
UNET_OUT = f"{UNET}out.2.weight"
# What a base model renders, as GET /v1/models says (`kind`).
INPAINTING = "inpainting"
TEXT_TO_IMAGE = "text_to_image"


@dataclass(frozen=True, kw_only=True)
class ModelEntry:
    name: str
    path: Path  # the folder, or the .safetensors file
    format: Format
    layout: Layout | None  # None: not an SDXL checkpoint at all (`problem` says what)
    size_bytes: int
    defaults: ModelDefaults = field(default_factory=ModelDefaults)
    # Why it cannot render, for the client: names, never file-system paths.
    problem: str | None = None
    # An inpainting checkpoint: its UNet takes the mask and the masked picture too (9
    # channels); it edits pictures and renders nothing from text alone.
    inpainting: bool = False

    @property
    def kind(self) -> str | None:
        """What a base renders: `inpainting` or `text_to_image`; None for anything else."""
        if self.layout != "base":
            return None
        return INPAINTING if self.inpainting else TEXT_TO_IMAGE

    @property
    def pairs_with_refiner(self) -> bool:
        """A base hands its latents to the service's refiner; a refiner renders nothing alone."""
        return self.layout == "base"

    @property
    def stamp(self) -> tuple[int, int]:
        """What says the file was replaced: its mtime and size (the folder's, for one)."""
        try:
            stat = self.path.stat()
        except OSError:
            return 0, 0
        return stat.st_mtime_ns, self.size_bytes

    def describe(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "layout": self.layout,
            "kind": self.kind,
            "size_bytes": self.size_bytes,
            "pairs_with_refiner": self.pairs_with_refiner,
            "defaults": self.defaults.describe(),
        }


def read_header(path: Path) -> dict[str, Any]:
    """The tensor table of a safetensors file; ValueError for a damaged or truncated one."""
    size = path.stat().st_size
    with path.open("rb") as file:
        head = file.read(8)
        if len(head) < 8:
            raise ValueError("it is too short to be a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise ValueError("it is not a readable safetensors file (damaged or truncated)")
        try:
            header: dict[str, Any] = json.loads(file.read(length))
        except ValueError:
            raise ValueError("its safetensors header is not JSON (damaged?)") from None
    tensors = {key: value for key, value in header.items() if key != "__metadata__"}
    ends = [int(entry["data_offsets"][1]) for entry in tensors.values()]
    if 8 + length + max(ends, default=0) > size:
        raise ValueError("it is truncated: its header names more data than the file holds")
    return tensors


def checkpoint_layout(keys: list[str]) -> Layout:
    """Base or refiner, from a checkpoint's tensor names; ValueError saying what it is else."""

    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in keys)

    if has(UNET) and has(CLIP_L) and has(BIGG_OF_BASE):
        return "base"
    if has(UNET) and has(BIGG_OF_REFINER) and not has(BIGG_OF_BASE):
        return "refiner"
    if any(key.startswith(("lora_unet_", "lora_te")) or ".lora_" in key for key in keys):
        raise ValueError("it is a LoRA, not a checkpoint (LoRA files go into SDXL_LORA_DIR)")
    if has("cond_stage_model."):
        raise ValueError("it is a Stable Diffusion 1.x/2.x checkpoint, not SDXL")
    if not has(UNET):
        raise ValueError(f"it holds no UNet ({UNET}*): not a checkpoint")
    raise ValueError("it has a UNet but not SDXL's text encoders")


def inpainting_text_to_image(name: str | None) -> str:
    """Why an inpainting model renders nothing from a prompt alone, for the client."""
    named = f"model '{name}'" if name is not None else "this server's default model"
    return (
        f"{named} is an inpainting model: it edits pictures (POST /v1/images/edits, with or "
        "without a mask, and /v1/images/variations) and cannot render from a prompt alone; "
        "pick a text-to-image model for generations"
    )


def inpainting_header(header: dict[str, Any]) -> bool:
    """Whether a checkpoint's tensor table (read_header) has an inpainting UNet."""
    try:
        first, out = header[UNET_IN]["shape"], header[UNET_OUT]["shape"]
        return int(first[1]) == 2 * int(out[0]) + 1
    except (KeyError, IndexError, TypeError, ValueError):
        return False


def inpainting_folder(folder: Path) -> bool:
    """Whether a diffusers folder's UNet (unet/config.json) takes the inpainting input."""
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
        return int(unet["in_channels"]) == 2 * int(unet.get("out_channels", 4)) + 1
    except (OSError, ValueError, KeyError, TypeError):
        return False


def folder_layout(folder: Path) -> Layout:
    """Base or refiner, from a diffusers folder's model_index.json; ValueError else."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
        class_name = index["_class_name"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError("its model_index.json is unreadable") from None
    layout = PIPELINE_LAYOUTS.get(class_name)
    if layout is None:
        raise ValueError(f"it is a {class_name} folder, not an SDXL pipeline")
    if layout == "refiner" and (index.get("text_encoder") or [None])[0] is not None:
        # An SDXL img2img pipeline with both text encoders is a base saved as img2img.
        return "base"
    return layout


def _folder_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def read_model(name: str, path: Path) -> ModelEntry:
    """The model at `path` (a folder or a file), with its sidecar; its `problem` says why it
    cannot render, if it cannot."""
    is_folder = path.is_dir()
    fmt: Format = "diffusers" if is_folder else "single_file"
    layout: Layout | None = None
    problem: str | None = None
    inpainting = False
    size = 0
    try:
        size = _folder_size(path) if is_folder else path.stat().st_size
        if is_folder:
            layout = folder_layout(path)
            inpainting = inpainting_folder(path)
        else:
            if path.suffix.lower() in PICKLE_SUFFIXES:
                raise ValueError(
                    f"{path.suffix} files are pickles, and loading one runs the code inside "
                    "it: convert it to .safetensors"
                )
            header = read_header(path)
            layout = checkpoint_layout(list(header))
            inpainting = inpainting_header(header)
        if layout == "refiner":
            problem = (
                f"model '{name}' is an SDXL refiner checkpoint: it refines a base's images and "
                "renders nothing alone (give it as SDXL_REFINER_MODEL)"
            )
    except (OSError, ValueError) as error:
        problem = f"model '{name}' is not an SDXL checkpoint this service can load: {error}"
    defaults = ModelDefaults()
    sidecar = path.parent / f"{name}.json"
    if sidecar.is_file():
        try:
            defaults = read_defaults(sidecar)
        except ValueError as error:
            problem = problem or f"model '{name}' cannot be used: {error}"
    return ModelEntry(
        name=name,
        path=path,
        format=fmt,
        layout=layout,
        size_bytes=size,
        defaults=defaults,
        problem=problem,
        inpainting=inpainting and layout == "base",
    )


class ModelCatalog(FolderCatalog[ModelEntry]):
    """The models of one folder, listed again when the folder or a file in it changes."""

    def entries(self) -> dict[str, ModelEntry]:
        """Every model by name, usable or not (its `problem` says why not)."""
        return self._current()

    def _candidates(self) -> dict[str, Path]:
        if self.folder is None or not self.folder.is_dir():
            return {}
        found: dict[str, Path] = {}
        for entry in sorted(self.folder.iterdir()):
            if entry.is_dir() and (entry / "model_index.json").is_file():
                found[entry.name] = entry
            elif entry.is_file() and entry.suffix.lower() in (".safetensors", *PICKLE_SUFFIXES):
                # A folder and a file of one name: the folder, read first, stays.
                found.setdefault(entry.stem, entry)
        return {name: path for name, path in found.items() if is_valid_name(name)}

    def _watched(self, name: str, path: Path) -> tuple[Path, ...]:
        # A sidecar's change is the model's.
        return (path, path.parent / f"{name}.json")

    def _read(self, name: str, path: Path) -> ModelEntry:
        entry = read_model(name, path)
        if entry.problem is not None:
            logger.warning("%s", entry.problem)
        return entry
