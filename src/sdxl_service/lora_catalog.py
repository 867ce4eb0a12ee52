"""The LoRA adapters in SDXL_LORA_DIR: which there are, their format, what they touch.

A LoRA is `<name>.safetensors` or a folder `<name>/` holding
`pytorch_lora_weights.safetensors`. Only the files' headers are read (tensor
names, through safetensors' lazy reader), so the HTTP process can list and
check them without torch; the render process loads the weights. The folder is
read again whenever it changes, so files added while the service runs are
found without a restart.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from .folder_catalog import FolderCatalog, is_valid_name
from .sidecars import ModelDefaults, read_defaults

logger = logging.getLogger(__name__)

DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"

# Tensor-name prefixes of each component, by format.
_KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
_DIFFUSERS_PREFIXES = {
    "unet": "unet.",
    "text_encoder": "text_encoder.",
    "text_encoder_2": "text_encoder_2.",
}
_REFINER_PREFIX = "refiner."


@dataclass(frozen=True, kw_only=True)
class LoraFile:
    name: str
    path: Path
    format: str  # "kohya" or "diffusers"
    components: tuple[str, ...]  # of unet, text_encoder, text_encoder_2, refiner
    problem: str | None = None  # why it cannot be used, for a file that is no LoRA
    # Its sidecar `<name>.json` in the folder: a few-step LoRA's sampler, steps, guidance.
    defaults: ModelDefaults = field(default_factory=ModelDefaults)

    def describe(self) -> dict[str, object]:
        card: dict[str, object] = {
            "name": self.name,
            "format": self.format,
            "components": list(self.components),
        }
        if defaults := self.defaults.describe():
            card["defaults"] = defaults
        return card


def read_lora_file(name: str, path: Path) -> LoraFile:
    """The LoRA at `path`; ValueError when it is no LoRA this service can read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as tensors:
            keys = list(tensors.keys())
    except Exception as exc:  # safetensors raises its own error types for damage
        raise ValueError(f"the file of LoRA '{name}' is not a readable safetensors file") from exc
    fmt, components = _format_of(name, keys)
    return LoraFile(name=name, path=path, format=fmt, components=components)


# LyCORIS' other adapter kinds, by the names of their tensors (kohya layout): their weights
# are products of factors, not the two matrices of a LoRA, and diffusers loads neither.
_LYCORIS_KINDS = {".hada_w1_a": "LoHa", ".lokr_w1": "LoKr"}


def _format_of(name: str, keys: list[str]) -> tuple[str, tuple[str, ...]]:
    for marker, kind in _LYCORIS_KINDS.items():
        if any(marker in key for key in keys):
            raise ValueError(
                f"LoRA '{name}' is a LyCORIS {kind} file, a format this service does not "
                "support (LoRA files are)"
            )
    for fmt, prefixes in (("kohya", _KOHYA_PREFIXES), ("diffusers", _DIFFUSERS_PREFIXES)):
        components = [
            c for c, prefix in prefixes.items() if any(k.startswith(prefix) for k in keys)
        ]
        if components:
            if any(key.startswith(_REFINER_PREFIX) for key in keys):
                components.append("refiner")
            return fmt, tuple(components)
    raise ValueError(f"LoRA '{name}' holds no UNet or text-encoder LoRA weights")


class LoraCatalog(FolderCatalog[LoraFile]):
    """The LoRAs of one folder, listed again when the folder changes."""

    def available(self) -> dict[str, LoraFile]:
        """Every readable LoRA by name."""
        return {name: entry for name, entry in self._current().items() if entry.problem is None}

    def short_hash(self, entry: LoraFile) -> str | None:
        """`Lora hashes`' name of the file (FolderCatalog.file_short_hash)."""
        return self.file_short_hash(entry.path)

    def _candidates(self) -> dict[str, Path]:
        if self.folder is None or not self.folder.is_dir():
            return {}
        found: dict[str, Path] = {}
        for entry in sorted(self.folder.iterdir()):
            if entry.is_file() and entry.suffix == ".safetensors":
                found[entry.stem] = entry
            elif entry.is_dir() and (entry / DIFFUSERS_WEIGHTS).is_file():
                found[entry.name] = entry / DIFFUSERS_WEIGHTS
        return {name: path for name, path in found.items() if is_valid_name(name)}

    def _watched(self, name: str, path: Path) -> tuple[Path, ...]:
        return (path, self._sidecar(name))

    def _sidecar(self, name: str) -> Path:
        assert self.folder is not None  # a LoRA catalog always has its folder
        return self.folder / f"{name}.json"

    def _read(self, name: str, path: Path) -> LoraFile:
        try:
            lora = read_lora_file(name, path)
            sidecar = self._sidecar(name)
            if sidecar.is_file():
                lora = replace(lora, defaults=read_defaults(sidecar))
            return lora
        except ValueError as exc:
            logger.warning("LoRA %s cannot be used: %s", name, exc)
            return LoraFile(name=name, path=path, format="", components=(), problem=str(exc))
