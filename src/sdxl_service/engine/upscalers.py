"""Upscaler models (ESRGAN, Real-ESRGAN, SwinIR, HAT, DAT, ...) through spandrel.

spandrel detects the architecture from the weights; the caller tiles. A `.pth` is read with
spandrel's restricted unpickler (tensors and plain containers only), never plain torch.load;
`.safetensors` holds no code at all. Each model is loaded on first use and kept in a small
LRU; a picture goes through it in overlapping tiles (the tile halved on out of memory, so a
2048x2048 result needs the memory of one tile, not of the picture), then Lanczos takes it to
the exact size asked (AUTOMATIC1111's order).
"""

from __future__ import annotations

import enum
import logging
import sys
import threading
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..upscaler_catalog import UPSCALER_FORMATS, UpscalerCatalog, UpscalerFile
from .resident_models import ResidentModels

logger = logging.getLogger(__name__)

# Input pixels each tile reaches past the part of it kept, on every side: more than the
# receptive field of ESRGAN-family models' first layers, so the seams do not show.
TILE_OVERLAP = 32
SMALLEST_TILE = 64
DEFAULT_TILE = 512


class UnusableUpscaler(ValueError):
    """The file is not an upscaler this service can use: spandrel does not know its
    architecture, it is damaged, or the model is not a 3-channel image upscaler."""


@dataclass(frozen=True)
class UpscalerInfo:
    architecture: str
    scale: int
    purpose: str

    def describe(self) -> dict[str, object]:
        return {"architecture": self.architecture, "scale": self.scale, "purpose": self.purpose}


def _stub_torchvision(exc: Exception) -> list[str]:
    """spandrel imports torchvision for two models that are no upscalers (LaMa inpainting,
    RestoreFormer faces). Where torchvision is missing or cannot load beside this torch (its
    CUDA build beside the CPU torch of the dev and CI machines: `make install` removes it
    there), those two get a stand-in that refuses to run, and every upscaler still loads.
    The names put in sys.modules, to take out once spandrel has imported."""
    logger.warning("torchvision does not load (%s); spandrel's LaMa and RestoreFormer are off", exc)
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]

    def unavailable(*args: object, **kwargs: object) -> Any:
        raise RuntimeError(f"torchvision does not load here: {exc}")

    functional = types.ModuleType("torchvision.transforms.functional")
    InterpolationMode = enum.Enum(
        "InterpolationMode", {"NEAREST": "nearest", "BILINEAR": "bilinear"}
    )
    functional.__dict__.update(
        InterpolationMode=InterpolationMode, rotate=unavailable, normalize=unavailable
    )
    transforms = types.ModuleType("torchvision.transforms")
    transforms.__dict__.update(functional=functional)
    package = types.ModuleType("torchvision")
    package.__dict__.update(transforms=transforms)
    stand_ins = {
        "torchvision": package,
        "torchvision.transforms": transforms,
        "torchvision.transforms.functional": functional,
    }
    sys.modules.update(stand_ins)
    return list(stand_ins)


_import_lock = threading.Lock()


def spandrel_module() -> Any:
    """spandrel, imported on first use (it imports every architecture it knows)."""
    with _import_lock:
        stand_ins: list[str] = []
        if "spandrel" not in sys.modules:
            try:
                import torchvision  # noqa: F401
            except Exception as exc:
                stand_ins = _stub_torchvision(exc)
        try:
            import spandrel
        finally:
            # spandrel holds what it took from them; nobody else may take them for torchvision
            # (transformers asks whether it is installed).
            for name in stand_ins:
                sys.modules.pop(name, None)
        return spandrel


def load_upscaler(path: Path, device: str | torch.device = "cpu") -> Any:
    """The file as spandrel's ImageModelDescriptor on `device`, in eval mode; UnusableUpscaler
    for anything else."""
    if path.suffix.lower() not in UPSCALER_FORMATS:
        raise UnusableUpscaler(f"{path.name}: upscalers are .safetensors or .pth files")
    spandrel = spandrel_module()
    try:
        model = spandrel.ModelLoader(device=device).load_from_file(path)
    except spandrel.UnsupportedModelError:
        raise UnusableUpscaler(
            f"{path.name}: spandrel does not know this model's architecture"
        ) from None
    except Exception as exc:
        raise UnusableUpscaler(f"{path.name} does not load: {exc}") from None
    if not isinstance(model, spandrel.ImageModelDescriptor):
        raise UnusableUpscaler(f"{path.name} is a {model.purpose} model, not an upscaler")
    if model.input_channels != 3 or model.output_channels != 3:
        raise UnusableUpscaler(
            f"{path.name} takes {model.input_channels} channels and makes "
            f"{model.output_channels}; upscalers here are RGB in, RGB out"
        )
    return model.eval()


def info_of(model: Any) -> UpscalerInfo:
    return UpscalerInfo(
        architecture=str(model.architecture.name), scale=int(model.scale), purpose=model.purpose
    )


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


@torch.inference_mode()
def upscale_tensor(model: Any, image: torch.Tensor, tile: int) -> torch.Tensor:
    """(1, 3, H, W) in [0, 1] on the model's device -> (1, 3, H*scale, W*scale), float32 on
    the CPU, through the model in tiles of at most `tile` input pixels a side, each reaching
    TILE_OVERLAP pixels further on every side; only each tile's own part is kept."""
    _, _, height, width = image.shape
    scale = int(model.scale)
    out = torch.empty((1, 3, height * scale, width * scale), dtype=torch.float32)
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            bottom, right = min(top + tile, height), min(left + tile, width)
            y0, x0 = max(0, top - TILE_OVERLAP), max(0, left - TILE_OVERLAP)
            y1, x1 = min(height, bottom + TILE_OVERLAP), min(width, right + TILE_OVERLAP)
            result = model(image[:, :, y0:y1, x0:x1])
            kept = result[
                :,
                :,
                (top - y0) * scale : (bottom - y0) * scale,
                (left - x0) * scale : (right - x0) * scale,
            ]
            out[:, :, top * scale : bottom * scale, left * scale : right * scale] = (
                kept.float().cpu()
            )
    return out


def picture_tensor(
    picture: Image.Image, device: str | torch.device, dtype: torch.dtype
) -> torch.Tensor:
    array = np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).to(device=device, dtype=dtype)


def tensor_picture(tensor: torch.Tensor) -> Image.Image:
    array = (tensor[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(array, "RGB")


def model_dtype(model: Any, device: str | torch.device) -> torch.dtype:
    """float16 on CUDA where the architecture supports it (spandrel's flag), float32 else."""
    if torch.device(device).type == "cuda" and model.supports_half:
        return torch.float16
    return torch.float32


class UpscalerModels:
    """The upscaler models of SDXL_UPSCALER_DIR on one device: loaded on first use and kept,
    the least recently used unloaded past `cache` of them. Thread-safe."""

    def __init__(
        self,
        folder: Path | None,
        device: str | torch.device = "cpu",
        *,
        cache: int = 2,
        tile: int = DEFAULT_TILE,
    ) -> None:
        self.catalog = UpscalerCatalog(folder)
        self.device = device
        self.cache = cache
        self.tile = tile
        self._lock = threading.RLock()
        self._resident: ResidentModels[Any] = ResidentModels("upscaler", str(device))
        # Descriptions by file stamp, loaded on the CPU: GET /v1/models lists them.
        self._described: dict[tuple[Path, float, int], dict[str, object]] = {}

    @staticmethod
    def _stamp(entry: UpscalerFile) -> tuple[Path, float, int]:
        stat = entry.path.stat()
        return entry.path, stat.st_mtime, stat.st_size

    def entry(self, name: str) -> UpscalerFile:
        entry = self.catalog.find(name)
        if entry is None:
            raise UnusableUpscaler(f"there is no upscaler {name!r} in SDXL_UPSCALER_DIR")
        return entry

    def model(self, name: str) -> Any:
        """The upscaler `name` on this device, loaded on first use (again when its file changed)."""
        entry = self.entry(name)
        stamp = self._stamp(entry)
        with self._lock:
            model = self._resident.get(name, stamp, lambda: self._load(entry))
            self._resident.evict(keep={name}, capacity=self.cache)
            return model

    def _load(self, entry: UpscalerFile) -> Any:
        model = load_upscaler(entry.path, self.device)
        return model.to(model_dtype(model, self.device))

    def describe(self) -> dict[str, dict[str, object]]:
        """Every upscaler of the folder: its file's format and spandrel's architecture and
        scale, or its `problem`; each file loaded once on the CPU (again when it changes)."""
        cards: dict[str, dict[str, object]] = {}
        for name, entry in sorted(self.catalog.snapshot().items()):
            try:
                stamp = self._stamp(entry)
            except OSError:
                continue
            with self._lock:
                described = self._described.get(stamp)
            if described is None:
                try:
                    described = info_of(load_upscaler(entry.path, "cpu")).describe()
                except UnusableUpscaler as exc:
                    described = {"problem": str(exc)}
                with self._lock:
                    self._described[stamp] = described
            cards[name] = {**entry.describe(), **described}
        return cards

    def upscale(self, name: str, picture: Image.Image, width: int, height: int) -> Image.Image:
        """`picture` through upscaler `name` (its own scale), then Lanczos to width x height."""
        model = self.model(name)
        image = picture_tensor(picture, self.device, model_dtype(model, self.device))
        tile = self.tile
        while True:
            try:
                upscaled = upscale_tensor(model, image, tile)
                break
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not _is_out_of_memory(exc) or tile <= SMALLEST_TILE:
                    raise
                tile = max(SMALLEST_TILE, tile // 2)
                logger.warning("upscaler %s ran out of memory; tiles of %d px now", name, tile)
                if torch.device(self.device).type == "cuda":
                    torch.cuda.empty_cache()
        result = tensor_picture(upscaled)
        if result.size != (width, height):
            result = result.resize((width, height), Image.Resampling.LANCZOS)
        return result
