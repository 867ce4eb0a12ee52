"""The ControlNet models in SDXL_CONTROLNET_DIR: which there are and what each is (no torch).

A ControlNet is a diffusers folder `<name>/` (its `config.json` and
`diffusion_pytorch_model[.fp16].safetensors`) or a single `<name>.safetensors` holding a
diffusers-layout state dict (as xinsir and diffusers publish theirs). Only JSON and the
safetensors header are read here (tensor names and shapes), so the HTTP process can list
the models and refuse a request for one that cannot serve SDXL without loading anything:
an SD 1.5 ControlNet (cross-attention dim 768, no `addition_embed_type`) is listed with its
problem. Whether a model is a Union one (xinsir's ControlNet Union, diffusers'
`ControlNetUnionModel`) and how many control types it knows come from the same reading.
The render worker loads the weights (engine/controlnets.py). The folder is read again
whenever it changes: new files need no restart.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .folder_catalog import FolderCatalog, is_valid_name

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
# A folder's weights, in the order they are preferred (full precision first: the engine casts).
WEIGHTS_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
UNION_CLASS = "ControlNetUnionModel"
CONTROLNET_CLASS = "ControlNetModel"
# SD 1.5's and SD 2's cross-attention dims (SDXL's two text encoders give 2048; the tiny
# preset's less, which is why the others are named rather than SDXL's required).
NOT_SDXL_CROSS_ATTENTION_DIMS = (768, 1024)
# Tensors a diffusers-layout state dict holds, and those only a Union model has.
_CONTROLNET_KEY = "controlnet_cond_embedding.conv_in.weight"
_UNION_KEY = "task_embedding"
_ADDITION_EMBED_KEY = "add_embedding.linear_1.weight"
_CROSS_ATTENTION_SUFFIX = "attn2.to_k.weight"
# The original (lllyasviel / A1111) layout's tensor names.
_ORIGINAL_PREFIXES = ("control_model.", "input_blocks.", "zero_convs.", "input_hint_block.")


@dataclass(frozen=True, kw_only=True)
class ControlNetFile:
    name: str
    path: Path  # the folder, or the single .safetensors file
    format: str  # "diffusers" (a folder) or "safetensors" (one file)
    union: bool = False
    # A Union model's number of control types (diffusers' `num_control_type`); 0 otherwise.
    control_types: int = 0
    problem: str | None = None  # why it cannot be used (an SD 1.5 ControlNet, damage)

    @property
    def weights(self) -> Path:
        """The safetensors file the weights are in."""
        if self.format != "diffusers":
            return self.path
        for name in WEIGHTS_FILES:
            if (self.path / name).is_file():
                return self.path / name
        return self.path / WEIGHTS_FILES[0]

    def describe(self) -> dict[str, object]:
        card: dict[str, object] = {"name": self.name, "format": self.format, "union": self.union}
        if self.union:
            card["control_types"] = self.control_types
        return card


def read_controlnet(name: str, path: Path) -> ControlNetFile:
    """The ControlNet at `path` (a folder or a .safetensors file); ValueError when it is no
    SDXL ControlNet this service can load."""
    if path.is_dir():
        return _read_folder(name, path)
    keys, shapes = _header(name, path)
    if any(key.startswith(_ORIGINAL_PREFIXES) for key in keys) or _CONTROLNET_KEY not in keys:
        raise ValueError(
            f"ControlNet '{name}' is not in diffusers' layout (controlnet_cond_embedding.*); "
            "give it as a diffusers folder (config.json and its weights)"
        )
    cross = [shape[1] for key, shape in shapes.items() if key.endswith(_CROSS_ATTENTION_SUFFIX)]
    if _ADDITION_EMBED_KEY not in keys or (cross and cross[0] in NOT_SDXL_CROSS_ATTENTION_DIMS):
        dim = cross[0] if cross else "unknown"
        raise ValueError(
            f"ControlNet '{name}' is not an SDXL ControlNet (cross-attention dim {dim}, "
            "no added text-time embedding: an SD 1.5 or SD 2 one)"
        )
    union = _UNION_KEY in keys
    control_types = shapes[_UNION_KEY][0] if union else 0
    return ControlNetFile(
        name=name, path=path, format="safetensors", union=union, control_types=control_types
    )


def _read_folder(name: str, path: Path) -> ControlNetFile:
    try:
        config: dict[str, Any] = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"ControlNet '{name}' has no readable {CONFIG_FILE}") from exc
    kind = config.get("_class_name")
    if kind not in (CONTROLNET_CLASS, UNION_CLASS):
        raise ValueError(
            f"ControlNet '{name}' is a {kind or 'model of no class'}, not a ControlNetModel "
            "or ControlNetUnionModel"
        )
    cross = config.get("cross_attention_dim")
    if cross in NOT_SDXL_CROSS_ATTENTION_DIMS or not config.get("addition_embed_type"):
        raise ValueError(
            f"ControlNet '{name}' is not an SDXL ControlNet (cross-attention dim {cross}, "
            f"addition_embed_type {config.get('addition_embed_type')}: an SD 1.5 or SD 2 one)"
        )
    if not any((path / weights).is_file() for weights in WEIGHTS_FILES):
        raise ValueError(f"ControlNet '{name}' has no {WEIGHTS_FILES[0]}")
    union = kind == UNION_CLASS
    return ControlNetFile(
        name=name,
        path=path,
        format="diffusers",
        union=union,
        control_types=int(config.get("num_control_type", 6)) if union else 0,
    )


def _header(name: str, path: Path) -> tuple[set[str], dict[str, list[int]]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as tensors:
            keys = set(tensors.keys())
            shapes = {
                key: list(tensors.get_slice(key).get_shape())
                for key in keys
                if key == _UNION_KEY or key.endswith(_CROSS_ATTENTION_SUFFIX)
            }
    except Exception as exc:  # safetensors raises its own error types for damage
        raise ValueError(
            f"the file of ControlNet '{name}' is not a readable safetensors file"
        ) from exc
    return keys, shapes


class ControlNetCatalog(FolderCatalog[ControlNetFile]):
    """The ControlNets of one folder by name (the folder's or the file's, without extension)."""

    def _candidates(self) -> dict[str, Path]:
        if self.folder is None or not self.folder.is_dir():
            return {}
        found: dict[str, Path] = {}
        for entry in sorted(self.folder.iterdir(), key=lambda p: p.name):
            if entry.is_file() and entry.suffix == ".safetensors":
                found.setdefault(entry.stem, entry)
            elif entry.is_dir() and (entry / CONFIG_FILE).is_file():
                found[entry.name] = entry
        return {name: path for name, path in found.items() if is_valid_name(name)}

    def _watched(self, name: str, path: Path) -> tuple[Path, ...]:
        if path.is_dir():
            return (path / CONFIG_FILE, *(path / weights for weights in WEIGHTS_FILES))
        return (path,)

    def _read(self, name: str, path: Path) -> ControlNetFile:
        try:
            return read_controlnet(name, path)
        except ValueError as exc:
            logger.warning("ControlNet %s cannot be used: %s", name, exc)
            fmt = "diffusers" if path.is_dir() else "safetensors"
            return ControlNetFile(name=name, path=path, format=fmt, problem=str(exc))
