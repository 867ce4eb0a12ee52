"""The IP-Adapters in SDXL_IP_ADAPTER_DIR: which there are, their kind, their image encoder (no
torch).

The folder holds the adapters as h94/IP-Adapter publishes them: SDXL adapters in
`sdxl_models/` beside `sdxl_models/image_encoder/` (OpenCLIP ViT-bigG), the ViT-H image
encoder in `models/image_encoder/`, which the `vit-h` adapters (`ip-adapter_sdxl_vit-h`,
`ip-adapter-plus_sdxl_vit-h`, `ip-adapter-plus-face_sdxl_vit-h`) take, and h94's SD 1.5
adapters in `models/` too (listed, refused). A `.safetensors` file straight in the folder
is an adapter as well, with `image_encoder/` beside it. An adapter is named by its file's
stem. Only headers are read (tensor names and shapes, the encoder's config.json), so the
HTTP process lists and checks them without torch; the render worker loads them
(engine/ip_adapters.py). The folder is read again whenever it changes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .folder_catalog import FolderCatalog, is_valid_name

logger = logging.getLogger(__name__)

SDXL_FOLDER = "sdxl_models"
SD15_FOLDER = "models"  # h94's SD 1.5 adapters, and the ViT-H encoder the vit-h ones take
ENCODER_FOLDER = "image_encoder"
# A `vit-h` adapter's name says it takes the ViT-H encoder of `models/`.
VIT_H_MARK = "vit-h"
# Weights of an image encoder: safetensors only (a `pytorch_model.bin` is a pickle).
ENCODER_WEIGHTS = "model.safetensors"
# The cross-attention width of the UNets the adapters were trained for: SD 1.5's and SD 2's
# are refused by name; SDXL's is 2048 (the tiny preset's is its own).
OTHER_BASES = {768: "SD 1.5", 1024: "SD 2"}


@dataclass(frozen=True, kw_only=True)
class IpAdapterFile:
    name: str
    path: Path
    # "ip-adapter" (4 tokens from the pooled image embedding), "plus" (a resampler over the
    # encoder's penultimate hidden states), "full-face" (an MLP over them).
    kind: str = ""
    tokens: int = 0  # image tokens added to each cross-attention
    cross_attention_dim: int = 0
    encoder: Path | None = None  # its image encoder's folder
    encoder_name: str = ""  # "ViT-bigG" or "ViT-H" (or the config's size otherwise)
    problem: str | None = None  # why it cannot be used

    @property
    def uses_hidden_states(self) -> bool:
        """Plus and full-face adapters read the encoder's penultimate hidden states, as
        diffusers' `encode_image(output_hidden_states=True)`; the plain one its image_embeds."""
        return self.kind != "ip-adapter"

    def describe(self) -> dict[str, object]:
        card: dict[str, object] = {"name": self.name, "kind": self.kind, "tokens": self.tokens}
        if self.encoder is not None:
            card["image_encoder"] = self.encoder_name
        return card


class IpAdapterCatalog(FolderCatalog[IpAdapterFile]):
    """The IP-Adapter files of one folder by name, read again when the folder changes."""

    def available(self) -> dict[str, IpAdapterFile]:
        return {name: entry for name, entry in self._current().items() if entry.problem is None}

    def _candidates(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        if self.folder is None or not self.folder.is_dir():
            return found
        # sdxl_models/ first: a name there wins over the same name elsewhere.
        for folder in (self.folder / SDXL_FOLDER, self.folder, self.folder / SD15_FOLDER):
            if not folder.is_dir():
                continue
            for path in sorted(folder.iterdir(), key=lambda p: p.name):
                if path.suffix != ".safetensors" or not path.is_file():
                    continue
                if is_valid_name(path.stem) and path.stem not in found:
                    found[path.stem] = path
        return found

    def _watched(self, name: str, path: Path) -> tuple[Path, ...]:
        encoder = self._encoder_folder(name, path)
        return (path, encoder / "config.json", encoder / ENCODER_WEIGHTS)

    def _encoder_folder(self, name: str, path: Path) -> Path:
        assert self.folder is not None  # candidates come from the folder
        if VIT_H_MARK in name.lower():
            return self.folder / SD15_FOLDER / ENCODER_FOLDER
        return path.parent / ENCODER_FOLDER

    def _read(self, name: str, path: Path) -> IpAdapterFile:
        try:
            return read_ip_adapter(name, path, self._encoder_folder(name, path))
        except ValueError as exc:
            logger.warning("IP-Adapter %s cannot be used: %s", name, exc)
            return IpAdapterFile(name=name, path=path, problem=str(exc))


def read_ip_adapter(name: str, path: Path, encoder: Path) -> IpAdapterFile:
    """The adapter at `path` with the encoder in `encoder`; ValueError when it cannot be used."""
    shapes = _shapes(name, path)
    projection = {
        key.removeprefix("image_proj."): shape
        for key, shape in shapes.items()
        if key.startswith("image_proj.")
    }
    if not projection or not any(key.startswith("ip_adapter.") for key in shapes):
        raise ValueError(f"'{name}' holds no IP-Adapter weights (image_proj and ip_adapter)")
    to_k = shapes.get("ip_adapter.1.to_k_ip.weight")
    if to_k is None or len(to_k) != 2:
        raise ValueError(f"'{name}' holds no IP-Adapter attention weights (ip_adapter.1.to_k_ip)")
    cross_attention_dim = to_k[1]
    if cross_attention_dim in OTHER_BASES:
        raise ValueError(
            f"'{name}' is an {OTHER_BASES[cross_attention_dim]} IP-Adapter; this service takes "
            "SDXL ones (h94/IP-Adapter's sdxl_models)"
        )
    # The encoder width each projection reads, to check it against the encoder's config.
    if "proj.weight" in projection:
        kind, tokens = "ip-adapter", projection["proj.weight"][0] // cross_attention_dim
        reads, width = "projection_dim", projection["proj.weight"][1]
    elif "proj.3.weight" in projection:
        kind, tokens = "full-face", 257  # 256 CLIP patch tokens and the class token
        reads, width = "hidden_size", projection["proj.0.weight"][1]
    elif "latents" in projection and "proj_in.weight" in projection:
        kind, tokens = "plus", projection["latents"][1]
        reads, width = "hidden_size", projection["proj_in.weight"][1]
    else:
        raise ValueError(
            f"'{name}' is a FaceID IP-Adapter, which reads InsightFace face embeddings this "
            "service does not compute"
        )
    config = _encoder_config(name, encoder)
    if config.get(reads) != width:
        raise ValueError(
            f"'{name}' reads image features of width {width} but its image encoder "
            f"({encoder.parent.name}/{encoder.name}) gives {config.get(reads)}; the vit-h "
            f"adapters need '{VIT_H_MARK}' in their name"
        )
    return IpAdapterFile(
        name=name,
        path=path,
        kind=kind,
        tokens=int(tokens),
        cross_attention_dim=int(cross_attention_dim),
        encoder=encoder,
        encoder_name=_encoder_name(config),
    )


def _shapes(name: str, path: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as tensors:
            return {key: list(tensors.get_slice(key).get_shape()) for key in tensors.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types for damage
        raise ValueError(f"the file of '{name}' is not a readable safetensors file") from exc


def _encoder_config(name: str, encoder: Path) -> dict[str, object]:
    where = f"{encoder.parent.name}/{encoder.name}"
    if not (encoder / ENCODER_WEIGHTS).is_file():
        raise ValueError(
            f"the image encoder of '{name}' is missing: {where}/ with config.json and "
            f"{ENCODER_WEIGHTS} (h94/IP-Adapter's layout)"
        )
    try:
        config = json.loads((encoder / "config.json").read_text())
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict):
        raise ValueError(f"the image encoder of '{name}' has no readable {where}/config.json")
    return config


def _encoder_name(config: dict[str, object]) -> str:
    # ViT-bigG/14 is 1664 wide, ViT-H/14 1280: the two h94 ships.
    width = config.get("hidden_size")
    return {1664: "ViT-bigG", 1280: "ViT-H"}.get(width if isinstance(width, int) else 0) or (
        f"CLIP vision, width {width}"
    )
